"""Find the graph input that carries the timestep; runs first, so a graph without one falls
back before any rewriting is paid for.

Dynamo names a forward argument ``timestep`` as the placeholder ``l_timestep_`` (or
``l_kwargs_timestep_`` when a decorator wraps the forward in ``**kwargs``); ``user_input_name``
recovers the argument name users know.
"""

from __future__ import annotations

import re

import torch.fx as fx

from passes.find_cached_region import RegionError

#: Argument names tried, in order, when the user does not name one (``timestep_input``).
TIMESTEP_NAMES = ("timestep", "timesteps", "t", "time", "sigma", "sigmas")


def user_input_name(placeholder: fx.Node) -> str:
    """``l_kwargs_timestep_`` -> ``timestep``: the forward's own argument name."""
    return re.sub(r"^l_(kwargs_)?", "", placeholder.name.lower()).rstrip("_")


def find_timestep_input(gm: fx.GraphModule, requested: str | None) -> int:
    """Index (among the placeholders) of the input that carries the timestep.

    Raises ``RegionError`` naming the inputs it saw when none matches.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    wanted = (requested.lower(),) if requested else TIMESTEP_NAMES
    for want in wanted:
        for i, n in enumerate(placeholders):
            if user_input_name(n) == want:
                return i
    user = [user_input_name(n) for n in placeholders if not n.name.lower().startswith("l_self_")]
    raise RegionError(
        f"no timestep input: expected a forward argument named one of {list(wanted)}, got "
        f"{user}; pass options={{'timestep_input': <argument name>}}"
    )
