"""Real colour images that ship in a package: Noto Color Emoji at 32x32, labelled by emoji group.

The glyphs are the colour bitmaps (CBDT, 136x128) of the Noto Color Emoji font from the Debian
package ``fonts-noto-color-emoji`` (SIL Open Font License 1.1). Their classes are the nine
Unicode emoji groups, read from ``emoji-test.txt`` in the Debian package ``unicode-data``
(Unicode license). Only fully-qualified emoji in the default (yellow / unspecified) skin tone are
used: the skin-tone variants are the same drawings recoloured (see README.md).

Each glyph is drawn with Pillow (raqm layout, so ZWJ sequences and flags form one glyph) on a
transparent canvas, cropped to its alpha bounding box, centred in a square with a small margin,
composited on white and downsampled to 32x32 with a Lanczos filter. Rendering takes a few
seconds; the result is cached as an npz (keyed by the font's and the emoji list's SHA-256 and a
render version), so it happens once per machine. Machines without the font (the GPU machine)
read an npz written by ``python -m benchmarks.reference.colour.data --export PATH.npz``.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from benchmarks.reference.data import checked_labels

logger = logging.getLogger(__name__)

IMAGE_SIZE = 32
CHANNELS = 3
#: The Unicode emoji groups, in emoji-test.txt order (the "Component" group is left out).
GROUPS: tuple[str, ...] = (
    "Smileys & Emotion",
    "People & Body",
    "Animals & Nature",
    "Food & Drink",
    "Travel & Places",
    "Activities",
    "Objects",
    "Symbols",
    "Flags",
)
NUM_CLASSES = len(GROUPS)
#: diffusers' ``LabelEmbedding`` appends one extra row for the "no class" label used by CFG.
NULL_CLASS = NUM_CLASSES
SPLIT_SEED = 0
#: Fraction of each class held out (rounded): 186 of the 1,870 images.
HELD_OUT_FRACTION = 0.1

FONT_APT_PACKAGE = "fonts-noto-color-emoji"
FONT_PATH = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_TEST_APT_PACKAGE = "unicode-data"
EMOJI_TEST_PATH = Path("/usr/share/unicode/emoji/emoji-test.txt")
#: The size at which the CBDT font's bitmaps are stored (Pillow only loads that strike).
FONT_SIZE = 109
#: Bump when the rendering changes, so cached npz files are re-rendered.
RENDER_VERSION = 1
#: The render cache; ``BD_COLOUR_CACHE`` overrides it. The folder is git-ignored.
DEFAULT_CACHE = Path(
    os.environ.get(
        "BD_COLOUR_CACHE",
        Path(__file__).resolve().parents[1] / "checkpoints" / "colour" / "emoji32.npz",
    )
)
#: Fitzpatrick skin-tone modifiers U+1F3FB..U+1F3FF.
_SKIN_TONES = frozenset(range(0x1F3FB, 0x1F400))
_MARGIN = 1  # pixels of white around the glyph at 32x32


@dataclass(frozen=True)
class EmojiEntry:
    """One fully-qualified emoji from emoji-test.txt."""

    text: str  #: the code point sequence as a string
    group: int  #: index into GROUPS
    name: str  #: CLDR short name, e.g. "grinning face"


def _require(path: Path, apt_package: str, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(
            f"{what} not found at {path}: install the Debian package {apt_package} "
            f"(apt-get install -y {apt_package}), or pass an npz written by "
            "`python -m benchmarks.reference.colour.data --export PATH.npz` where it is installed"
        )
    return path


def font_available(font_path: Path = FONT_PATH, emoji_test_path: Path = EMOJI_TEST_PATH) -> bool:
    """Whether both the font and emoji-test.txt are installed (so the data can be rendered)."""
    return font_path.exists() and emoji_test_path.exists()


def parse_emoji_test(path: Path = EMOJI_TEST_PATH, skin_tones: bool = False) -> list[EmojiEntry]:
    """Fully-qualified emoji of the nine groups, in file order (skin-tone variants left out)."""
    entries: list[EmojiEntry] = []
    group: int | None = None
    for line in (
        _require(path, EMOJI_TEST_APT_PACKAGE, "emoji-test.txt")
        .read_text(encoding="utf-8")
        .splitlines()
    ):
        if line.startswith("# group:"):
            name = line.split(":", 1)[1].strip()
            group = GROUPS.index(name) if name in GROUPS else None
            continue
        if not line.strip() or line.startswith("#") or group is None:
            continue
        code_points, rest = line.split(";", 1)
        status, _, comment = rest.partition("#")
        if status.strip() != "fully-qualified":
            continue
        cps = [int(cp, 16) for cp in code_points.split()]
        if not skin_tones and _SKIN_TONES.intersection(cps):
            continue
        # comment: " 😀 E1.0 grinning face"
        name = comment.strip().split(" ", 2)[-1]
        entries.append(EmojiEntry("".join(map(chr, cps)), group, name))
    if not entries:
        raise ValueError(f"expected emoji entries in {path}, found none")
    return entries


def render_glyph(font: ImageFont.FreeTypeFont, text: str, size: int = IMAGE_SIZE) -> np.ndarray:
    """One emoji as uint8 [size, size, 3] RGB on white, glyph cropped, centred and downsampled.

    Raises ValueError if the font draws nothing, or draws the sequence as several glyphs side by
    side (a sequence the font does not support).
    """
    canvas = Image.new("RGBA", (4 * FONT_SIZE, 2 * FONT_SIZE), (255, 255, 255, 0))
    ImageDraw.Draw(canvas).text(
        (FONT_SIZE // 4, FONT_SIZE // 4), text, font=font, embedded_color=True
    )
    bbox = canvas.getchannel("A").getbbox()
    if bbox is None:
        raise ValueError(f"the font draws nothing for {text!r}")
    left, top, right, bottom = bbox
    width, height = right - left, bottom - top
    if width > 1.5 * FONT_SIZE:
        raise ValueError(f"the font draws {text!r} as several glyphs ({width} px wide)")
    side = max(width, height)
    # Margin: the glyph fills (size - 2 * _MARGIN) pixels of the output.
    padded = round(side * size / (size - 2 * _MARGIN))
    square = Image.new("RGBA", (padded, padded), (255, 255, 255, 0))
    square.paste(canvas.crop(bbox), ((padded - width) // 2, (padded - height) // 2))
    white = Image.new("RGBA", square.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, square).convert("RGB")
    return np.asarray(rgb.resize((size, size), Image.Resampling.LANCZOS), dtype=np.uint8)


def render_dataset(
    font_path: Path = FONT_PATH, emoji_test_path: Path = EMOJI_TEST_PATH
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Render every emoji: ``(images uint8 [N, 32, 32, 3], labels int64 [N], names)``."""
    entries = parse_emoji_test(emoji_test_path)
    font = ImageFont.truetype(
        str(_require(font_path, FONT_APT_PACKAGE, "Noto Color Emoji")), FONT_SIZE
    )
    images, labels, names = [], [], []
    for entry in entries:
        try:
            images.append(render_glyph(font, entry.text))
        except ValueError as e:
            logger.warning("skipping %s: %s", entry.name, e)
            continue
        labels.append(entry.group)
        names.append(entry.name)
    return np.stack(images), np.asarray(labels, dtype=np.int64), names


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _source_key(font_path: Path, emoji_test_path: Path) -> str:
    return f"v{RENDER_VERSION}:{_sha256(font_path)}:{_sha256(emoji_test_path)}"


def export_npz(
    path: str | Path, font_path: Path = FONT_PATH, emoji_test_path: Path = EMOJI_TEST_PATH
) -> Path:
    """Render the data set and write it as an npz (images, labels, names, source key)."""
    _require(font_path, FONT_APT_PACKAGE, "Noto Color Emoji")
    _require(emoji_test_path, EMOJI_TEST_APT_PACKAGE, "emoji-test.txt")
    images, labels, names = render_dataset(font_path, emoji_test_path)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez_compressed(
        tmp,
        images=images,
        labels=labels,
        names=np.asarray(names),
        source=np.asarray(_source_key(font_path, emoji_test_path)),
    )
    os.replace(tmp, out)
    return out


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray, str]:
    with np.load(path) as npz:
        missing = {"images", "labels"} - set(npz.files)
        if missing:
            raise ValueError(
                f"expected arrays 'images' and 'labels' in {path}, missing {sorted(missing)}"
            )
        source = str(npz["source"]) if "source" in npz.files else ""
        return npz["images"], npz["labels"], source


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, 32, 32, 3] -> float32 [N, 3, 32, 32] in [-1, 1]."""
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[-1] != CHANNELS:
        raise ValueError(f"expected images of shape [N, H, W, {CHANNELS}], got {arr.shape}")
    x = torch.from_numpy(arr.astype(np.float32)).permute(0, 3, 1, 2).contiguous()
    return x / 127.5 - 1.0


def tensor_to_uint8(images: torch.Tensor) -> np.ndarray:
    """Inverse of :func:`images_to_tensor`: [N, 3, H, W] in [-1, 1] -> uint8 [N, H, W, 3]."""
    pixels = ((images.detach().float().cpu().clamp(-1.0, 1.0) + 1.0) * 127.5).round()
    return pixels.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def load_colour(
    npz_path: str | Path | None = None, cache: Path = DEFAULT_CACHE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load the emoji images.

    Args:
        npz_path: an npz from :func:`export_npz`, read as is (no font needed). When ``None`` the
            images are rendered from the installed font, or read from ``cache`` if it was rendered
            from the same font and emoji list.
        cache: where rendered images are cached.

    Returns:
        ``(images, labels)``: float32 [N, 3, 32, 32] in [-1, 1], and int64 [N] in 0..8.
    """
    if npz_path is not None:
        images, labels, _ = _read_npz(Path(npz_path))
    else:
        _require(FONT_PATH, FONT_APT_PACKAGE, "Noto Color Emoji")
        _require(EMOJI_TEST_PATH, EMOJI_TEST_APT_PACKAGE, "emoji-test.txt")
        key = _source_key(FONT_PATH, EMOJI_TEST_PATH)
        if cache.exists() and _read_npz(cache)[2] == key:
            images, labels, _ = _read_npz(cache)
        else:
            logger.info("rendering Noto Color Emoji to %s", cache)
            images, labels, _ = _read_npz(export_npz(cache))
    return checked_labels(images_to_tensor(images), labels, NUM_CLASSES)


def split_indices(
    labels: torch.Tensor, held_out_fraction: float = HELD_OUT_FRACTION, seed: int = SPLIT_SEED
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified, deterministic split: ``round(fraction * n)`` random images per class held out.

    Returns ``(train_idx, held_out_idx)``, both sorted int64 index tensors.
    """
    gen = torch.Generator().manual_seed(seed)
    train: list[torch.Tensor] = []
    held_out: list[torch.Tensor] = []
    for cls in range(NUM_CLASSES):
        idx = torch.nonzero(labels == cls).flatten()
        k = round(held_out_fraction * idx.numel())
        if not 0 < k < idx.numel():
            raise ValueError(f"cannot hold out {k} of the {idx.numel()} images of class {cls}")
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        held_out.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(held_out).sort().values


@dataclass(frozen=True)
class ColourSplit:
    """The train and held-out parts of the emoji (images in [-1, 1], int64 labels)."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    held_out_images: torch.Tensor
    held_out_labels: torch.Tensor


def load_colour_split(npz_path: str | Path | None = None, seed: int = SPLIT_SEED) -> ColourSplit:
    """:func:`load_colour` followed by :func:`split_indices` (1,684 train / 186 held-out)."""
    images, labels = load_colour(npz_path)
    train_idx, held_idx = split_indices(labels, seed=seed)
    return ColourSplit(images[train_idx], labels[train_idx], images[held_idx], labels[held_idx])


def write_preview(
    path: Path, images: torch.Tensor, labels: torch.Tensor, per_class: int = 16, scale: int = 2
) -> Path:
    """A PNG with the first ``per_class`` images of each class in a row (classes top to bottom)."""
    pad = 2
    cell = IMAGE_SIZE + pad
    grid = np.full((NUM_CLASSES * cell + pad, per_class * cell + pad, 3), 255, dtype=np.uint8)
    pixels = tensor_to_uint8(images)
    for cls in range(NUM_CLASSES):
        for j, i in enumerate(torch.nonzero(labels == cls).flatten()[:per_class].tolist()):
            top, left = pad + cls * cell, pad + j * cell
            grid[top : top + IMAGE_SIZE, left : left + IMAGE_SIZE] = pixels[i]
    img = Image.fromarray(grid).resize(
        (grid.shape[1] * scale, grid.shape[0] * scale), Image.Resampling.NEAREST
    )
    img.save(path)
    return path


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m benchmarks.reference.colour.data [--export PATH.npz]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--export", type=Path, help="npz file to write (default: the cache)")
    parser.add_argument("--preview", type=Path, help="also write a PNG of 16 images per class")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = export_npz(args.export if args.export is not None else DEFAULT_CACHE)
    images, labels = load_colour(out)
    train_idx, held_idx = split_indices(labels)
    print(
        f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB): {images.shape[0]} images, "
        f"{len(train_idx)} train / {len(held_idx)} held-out"
    )
    for cls, name in enumerate(GROUPS):
        n = int((labels == cls).sum())
        h = int((labels[held_idx] == cls).sum())
        print(f"  {cls}  {name:<18} {n:5d}  ({n - h} train, {h} held-out)")
    if args.preview is not None:
        print(f"wrote {write_preview(args.preview, images, labels)}")


if __name__ == "__main__":
    main()
