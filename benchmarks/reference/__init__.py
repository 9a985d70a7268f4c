"""A small class-conditional pixel-space DiT trained on real MNIST digits, its classifier, and data.

The reference model exists so that BlockDance can be measured on a *trained* Diffusion
Transformer (features with real spatio-temporal structure) without downloading weights.
See README.md in this folder for the model card.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load_dataset_classifier(dataset: str, path: str | Path, device: Any = "cpu") -> Any:
    """The feature classifier of a reference data set (``mnist`` or ``colour``), in eval mode:
    ``features`` for FID, logits for class accuracy."""
    if dataset == "mnist":
        from benchmarks.reference.classifier import load_classifier
    elif dataset == "colour":
        from benchmarks.reference.colour.classifier import load_classifier  # type: ignore[assignment]
    else:
        raise ValueError(f"expected dataset 'mnist' or 'colour', got {dataset!r}")
    return load_classifier(path, device)
