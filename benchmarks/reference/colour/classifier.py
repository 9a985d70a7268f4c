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

import argparse
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from benchmarks.reference.classifier import accuracy, fit
from benchmarks.reference.colour.data import CHANNELS, NUM_CLASSES, ColourSplit, load_colour_split

logger = logging.getLogger(__name__)

DEFAULT_PATH = Path(__file__).resolve().parent / "classifier.safetensors"


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


class ColourClassifier(nn.Module):
    """Six 3x3 conv layers (32 -> 16 -> 8 -> 4 px), then a ``feature_dim`` embedding and logits.

    About 0.55M parameters with the defaults. Inputs are [N, 3, 32, 32] in [-1, 1].
    """

    def __init__(self, width: int = 32, feature_dim: int = 128, dropout: float = 0.3) -> None:
        super().__init__()
        self.width = width
        self.feature_dim = feature_dim
        self.body = nn.Sequential(
            _conv(CHANNELS, width),
            _conv(width, width),
            nn.MaxPool2d(2),  # 16x16
            _conv(width, 2 * width),
            _conv(2 * width, 2 * width),
            nn.MaxPool2d(2),  # 8x8
            _conv(2 * width, 4 * width),
            _conv(4 * width, 4 * width),
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
    """Random small affine warps of images in [-1, 1]: rotate +-10 deg, scale 0.9-1.1, shift +-2 px.

    No flips (many emoji hold text or asymmetric symbols). Pixels moved in from outside are white
    (+1), the background of the rendered emoji.
    """
    n = x.shape[0]
    rand = torch.rand((n, 4), generator=generator, device=x.device)
    angle = (rand[:, 0] * 2 - 1) * math.radians(10.0)
    scale = 0.9 + 0.2 * rand[:, 1]
    shift = (rand[:, 2:] * 2 - 1) * (2.0 * 2 / x.shape[-1])  # 2 px in normalised coordinates
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], -1), torch.stack([sin, cos, shift[:, 1]], -1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # Warp (1 - x), which is 0 on white, so that zero padding means white.
    warped = F.grid_sample(
        1.0 - x, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return 1.0 - warped


def train_classifier(
    split: ColourSplit,
    epochs: int = 25,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> ColourClassifier:
    """Train on ``split``'s train images only (AdamW, one-cycle lr, augmentation), with the
    MNIST classifier's loop (``benchmarks.reference.classifier.fit``).

    Returns the model in eval mode.
    """
    torch.manual_seed(seed)
    model = ColourClassifier().to(device)
    return fit(model, split, augment, epochs, batch_size, lr, seed)


def save_classifier(model: ColourClassifier, path: str | Path, held_out_accuracy: float) -> Path:
    """Write the weights (and the architecture in the metadata) with safetensors."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {
        "width": str(model.width),
        "feature_dim": str(model.feature_dim),
        "held_out_accuracy": f"{held_out_accuracy:.4f}",
    }
    save_file(state, str(out), metadata=metadata)
    return out


def load_classifier(
    path: str | Path = DEFAULT_PATH, device: str | torch.device = "cpu"
) -> ColourClassifier:
    """Load weights written by :func:`save_classifier`; returns the model in eval mode."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    model = ColourClassifier(
        width=int(meta.get("width", 32)), feature_dim=int(meta.get("feature_dim", 128))
    )
    model.load_state_dict(load_file(str(path)))
    return model.to(device).eval()


def main(argv: list[str] | None = None) -> None:
    """Command line: train on the train split, report held-out accuracy, write safetensors."""
    parser = argparse.ArgumentParser(description="Train the colour (emoji) feature classifier.")
    parser.add_argument("--out", type=Path, default=DEFAULT_PATH)
    parser.add_argument("--data", type=Path, default=None, help="npz instead of the font")
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    split = load_colour_split(args.data)
    t0 = time.perf_counter()
    model = train_classifier(split, args.epochs, args.batch_size, args.lr, args.seed, args.device)
    acc = accuracy(model, split.held_out_images, split.held_out_labels)
    out = save_classifier(model, args.out, acc)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"held-out accuracy {acc:.4f} on {split.held_out_labels.numel()} images; "
        f"{n_params / 1e6:.3f}M params; {time.perf_counter() - t0:.0f}s; wrote {out} "
        f"({out.stat().st_size / 1e6:.2f} MB)"
    )


if __name__ == "__main__":
    main()
