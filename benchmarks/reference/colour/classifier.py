"""A small CNN on the 32x32 emoji whose penultimate layer is the feature space for colour FID.

The colour counterpart of ``benchmarks/reference/classifier.py`` (same structure: conv body, a
128-d embedding used for FID, a linear head for the class accuracy of samples), trained on the
train split of :mod:`benchmarks.reference.colour.data` only, never on the held-out images.
Inception-v3 features would need downloaded weights and 299 px inputs; this one is a 2.2 MB
safetensors file (0.55M parameters, fp32). Predicting the emoji *group* is a semantic task (a red
heart is in Smileys & Emotion, the heart suit in Activities; a bell is an Object, the bellhop bell
in Travel & Places), so expect a held-out accuracy well below the MNIST classifier's.

Train it (25 epochs of 26 steps; one epoch took 20 s on one CPU thread of a busy 2-core
machine, so about 4-8 minutes) with::

    python -m benchmarks.reference.colour.classifier --num-threads 1 \\
        --out benchmarks/reference/colour/classifier.safetensors
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from benchmarks.reference import classifier_common
from benchmarks.reference.classifier_common import conv, fit, save_classifier
from benchmarks.reference.colour.data import CHANNELS, NUM_CLASSES, ColourSplit, load_colour_split

__all__ = [
    "DEFAULT_PATH",
    "ColourClassifier",
    "augment",
    "load_classifier",
    "save_classifier",
    "train_classifier",
]

DEFAULT_PATH = Path(__file__).resolve().parent / "classifier.safetensors"


class ColourClassifier(nn.Module):
    """Six 3x3 conv layers (32 -> 16 -> 8 -> 4 px), then a ``feature_dim`` embedding and logits.

    About 0.55M parameters with the defaults. Inputs are [N, 3, 32, 32] in [-1, 1].
    """

    def __init__(self, width: int = 32, feature_dim: int = 128, dropout: float = 0.3) -> None:
        super().__init__()
        self.width = width
        self.feature_dim = feature_dim
        self.body = nn.Sequential(
            conv(CHANNELS, width),
            conv(width, width),
            nn.MaxPool2d(2),  # 16x16
            conv(width, 2 * width),
            conv(2 * width, 2 * width),
            nn.MaxPool2d(2),  # 8x8
            conv(2 * width, 4 * width),
            conv(4 * width, 4 * width),
            nn.MaxPool2d(2),  # 4x4
            nn.Flatten(),
        )
        self.embed = nn.Linear(4 * width * 4 * 4, feature_dim)
        self.head = nn.Sequential(
            nn.ReLU(), nn.Dropout(dropout), nn.Linear(feature_dim, NUM_CLASSES)
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate embedding (before its ReLU), float [N, feature_dim]; used for FID.

        Call on a model in eval mode; :func:`load_classifier` returns one.
        """
        return self.embed(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits [N, 9]."""
        return self.head(self.features(x))


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random small affine warps of images in [-1, 1] (``classifier_common.random_affine``);
    pixels moved in from outside are white (+1), the background of the rendered emoji."""
    return classifier_common.random_affine(x, generator, background=1.0)


def train_classifier(
    split: ColourSplit,
    epochs: int = 25,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> ColourClassifier:
    """Train on ``split``'s train images only (AdamW, one-cycle lr, augmentation), with the
    shared loop (``benchmarks.reference.classifier_common.fit``).

    Returns the model in eval mode.
    """
    torch.manual_seed(seed)
    model = ColourClassifier().to(device)
    return fit(model, split, augment, epochs, batch_size, lr, seed)


def load_classifier(
    path: str | Path = DEFAULT_PATH, device: str | torch.device = "cpu"
) -> ColourClassifier:
    """Load weights written by :func:`save_classifier`; returns the model in eval mode."""
    return classifier_common.load_classifier(ColourClassifier, path, device)


def main(argv: list[str] | None = None) -> None:
    """Command line: train on the train split, report held-out accuracy, write safetensors."""
    classifier_common.main(
        argv,
        description="Train the colour (emoji) feature classifier.",
        default_path=DEFAULT_PATH,
        epochs=25,
        data_help="npz instead of the font",
        load_split=load_colour_split,
        train=train_classifier,
    )


if __name__ == "__main__":
    main()
