"""BlockDance-Ada on the reference models: eager per-sample rollouts, REINFORCE training and the
evaluation against the static schedule."""
