"""What the two reference classifiers (MNIST digits, colour emoji) share: the conv block, the
affine augmentation, the training loop (:func:`fit`), prediction, the safetensors file with the
architecture in its metadata, and the command line. ``benchmarks/reference/classifier.py`` and
``benchmarks/reference/colour/classifier.py`` hold only their network, background and defaults.
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

logger = logging.getLogger(__name__)

ModelT = TypeVar("ModelT", bound=nn.Module)


def conv(cin: int, cout: int) -> nn.Sequential:
    """3x3 convolution (no bias), BatchNorm, ReLU."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


def random_affine(x: torch.Tensor, generator: torch.Generator, background: float) -> torch.Tensor:
    """Random small affine warps of images in [-1, 1]: rotate +-10 deg, scale 0.9-1.1, shift +-2 px.

    No flips (a flipped digit or emoji is a different symbol). Pixels moved in from outside take
    ``background`` (-1 black, +1 white): the warp is of ``x - background``, zero padded.
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
        x - background, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return warped + background


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
    logging held-out accuracy per epoch.

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


def save_classifier(model: nn.Module, path: str | Path, held_out_accuracy: float) -> Path:
    """Write the weights (and the architecture, ``width`` and ``feature_dim``, in the metadata)
    with safetensors."""
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
    cls: Callable[..., ModelT], path: str | Path, device: str | torch.device = "cpu"
) -> ModelT:
    """A ``cls(width=..., feature_dim=...)`` with the weights :func:`save_classifier` wrote, in
    eval mode on ``device``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    model = cls(width=int(meta.get("width", 32)), feature_dim=int(meta.get("feature_dim", 128)))
    model.load_state_dict(load_file(str(path)))
    return model.to(device).eval()


def main(
    argv: list[str] | None,
    *,
    description: str,
    default_path: Path,
    epochs: int,
    data_help: str,
    load_split: Callable[[Path | None], Any],
    train: Callable[..., nn.Module],
) -> None:
    """The command line of either classifier: train on the train split, report held-out
    accuracy, write safetensors. ``train(split, epochs, batch_size, lr, seed, device)``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=default_path)
    parser.add_argument("--data", type=Path, default=None, help=data_help)
    parser.add_argument("--epochs", type=int, default=epochs)
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
    model = train(split, args.epochs, args.batch_size, args.lr, args.seed, args.device)
    acc = accuracy(model, split.held_out_images, split.held_out_labels)
    out = save_classifier(model, args.out, acc)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"held-out accuracy {acc:.4f} on {split.held_out_labels.numel()} images; "
        f"{n_params / 1e6:.3f}M params; {time.perf_counter() - t0:.0f}s; wrote {out} "
        f"({out.stat().st_size / 1e6:.2f} MB)"
    )
