"""The colour reference data: Noto Color Emoji rendered to 32x32 RGB, labelled by emoji group."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import ImageFont

from benchmarks.reference.colour import data as colour_data
from benchmarks.reference.colour.data import (
    FONT_SIZE,
    GROUPS,
    HELD_OUT_FRACTION,
    IMAGE_SIZE,
    NUM_CLASSES,
    font_available,
    load_colour,
    load_colour_split,
    parse_emoji_test,
    render_glyph,
    split_indices,
    tensor_to_uint8,
)

needs_font = pytest.mark.skipif(
    not font_available(),
    reason="Noto Color Emoji or emoji-test.txt absent: "
    "apt-get install -y fonts-noto-color-emoji unicode-data",
)


@pytest.fixture(scope="module")
def emoji() -> tuple[torch.Tensor, torch.Tensor]:
    return load_colour()  # rendered once per machine, then read from the npz cache


@needs_font
def test_images_are_32x32_rgb_in_range_with_nine_group_labels(
    emoji: tuple[torch.Tensor, torch.Tensor],
) -> None:
    images, labels = emoji
    assert images.dtype == torch.float32 and labels.dtype == torch.int64
    assert images.shape[1:] == (3, IMAGE_SIZE, IMAGE_SIZE) and images.shape[0] == labels.shape[0]
    assert images.shape[0] > 1500  # 1,870 with unicode-data 15.0
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert set(labels.tolist()) == set(range(NUM_CLASSES)) and len(GROUPS) == NUM_CLASSES
    # Composited on white: the corners are background, and the images are in colour.
    assert images[:, :, 0, 0].mean() > 0.95
    assert (images.amax(1) - images.amin(1)).mean() > 0.1


@needs_font
def test_entries_are_fully_qualified_default_tone_emoji() -> None:
    entries = parse_emoji_test()
    texts = [e.text for e in entries]
    assert len(set(texts)) == len(texts)
    assert not any(0x1F3FB <= ord(ch) <= 0x1F3FF for t in texts for ch in t)  # no skin tones
    grinning = next(e for e in entries if e.text == "\U0001f600")
    assert grinning.group == GROUPS.index("Smileys & Emotion") and grinning.name == "grinning face"
    assert len(parse_emoji_test(skin_tones=True)) > len(entries)


@needs_font
def test_flag_sequence_renders_as_one_glyph() -> None:
    font = ImageFont.truetype(str(colour_data.FONT_PATH), FONT_SIZE)
    img = render_glyph(font, "\U0001f1fa\U0001f1f8")  # regional indicators U + S
    assert img.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and img.dtype == np.uint8
    assert img.min() < 128  # something was drawn


@needs_font
def test_split_is_deterministic_stratified_and_disjoint(
    emoji: tuple[torch.Tensor, torch.Tensor],
) -> None:
    _, labels = emoji
    train, held = split_indices(labels)
    train2, held2 = split_indices(labels)
    assert torch.equal(train, train2) and torch.equal(held, held2)
    assert not set(train.tolist()) & set(held.tolist())
    assert len(train) + len(held) == len(labels)
    for cls in range(NUM_CLASSES):
        n = int((labels == cls).sum())
        assert int((labels[held] == cls).sum()) == round(HELD_OUT_FRACTION * n)
    assert not torch.equal(split_indices(labels, seed=1)[1], held)
    split = load_colour_split()
    assert split.train_images.shape[0] == len(train) and split.held_out_labels.shape == (len(held),)


#: three rendered emoji (export_npz's format), committed so that this runs without the font;
#: made by ``PYTHONPATH=. python tests/data/make_colour_sample.py``
SAMPLE_NPZ = Path(__file__).resolve().parent / "data" / "emoji32_sample.npz"


def test_npz_round_trip_needs_no_font(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(colour_data, "FONT_PATH", tmp_path / "absent.ttf")  # as if not installed
    monkeypatch.setattr(colour_data, "EMOJI_TEST_PATH", tmp_path / "absent.txt")
    with np.load(SAMPLE_NPZ) as npz:
        raw, raw_labels = npz["images"], npz["labels"]
    images, labels = load_colour(SAMPLE_NPZ)
    assert images.shape == (3, 3, IMAGE_SIZE, IMAGE_SIZE) and images.dtype == torch.float32
    assert labels.tolist() == [0, 3, 8] and labels.dtype == torch.int64
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert images[:, :, 0, 0].mean() > 0.95  # composited on white
    assert np.array_equal(tensor_to_uint8(images), raw) and np.array_equal(labels, raw_labels)
    path = tmp_path / "emoji.npz"
    np.savez(path, images=tensor_to_uint8(images), labels=labels.numpy())
    x, y = load_colour(path)
    assert torch.equal(x, images) and torch.equal(y, labels)


def test_missing_font_names_the_apt_package(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(colour_data, "FONT_PATH", tmp_path / "absent.ttf")
    with pytest.raises(FileNotFoundError, match="apt-get install -y fonts-noto-color-emoji"):
        load_colour(cache=tmp_path / "cache.npz")
