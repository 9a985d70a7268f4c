"""The quality report's pieces that need no benchmark run: which model its title names, and the
Pareto front its figure labels (tests/test_quality_quick.py runs the whole report, slow)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from benchmarks.quality.verdicts import Entry, pareto_front
from benchmarks.quality.writing import model_title

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


@pytest.mark.parametrize(
    ("meta", "title"),
    [
        (
            {"dataset": "mnist", "model": "/x/bd_compile/data/reference_model"},
            "reference MNIST DiT",
        ),
        ({"model": "/x/benchmarks/reference/model"}, "reference MNIST DiT"),  # before --dataset
        (
            {"dataset": "colour", "model": "/x/benchmarks/reference/colour/model"},
            "reference colour emoji DiT",
        ),
        ({"dataset": "colour", "model": "/tmp/t/model"}, "colour emoji DiT `/tmp/t/model`"),
    ],
)
def test_report_title_names_the_model_the_quality_part_ran(meta: dict, title: str) -> None:
    assert model_title(meta) == title


def test_committed_colour_report_is_titled_with_the_colour_model() -> None:
    meta = json.loads((RESULTS / "quality_metrics-colour.json").read_text())
    assert model_title(meta) == "reference colour emoji DiT"
    assert "(reference colour emoji DiT)" in (RESULTS / "quality-colour.md").read_text()


def _entry(name: str, speed: float, psnr: float) -> Entry:
    return Entry(
        {"method": name, "family": "blockdance", "flop_bound": str(speed), "psnr": str(psnr)}, None
    )


def test_pareto_front_keeps_only_rows_nothing_beats_on_both_axes_by_speed() -> None:
    rows = [_entry("a", 1.2, 40), _entry("b", 1.5, 35), _entry("c", 1.4, 30), _entry("d", 1.5, 20)]
    rows.append(_entry("no psnr", 3.0, float("nan")))
    front = pareto_front(rows, measured=False, metric="psnr")
    assert [e.name for e in front] == ["a", "b"]


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="no matplotlib")
def test_pareto_plot_draws_one_panel_per_sampler(tmp_path: Path) -> None:
    from benchmarks.quality.figures import pareto_plot

    groups = {
        "DDIM 8": [_entry("N=2", 1.3, 40), _entry("N=3", 1.5, 35)],
        "DPM-Solver++ 6": [_entry("N=2", 1.2, 38)],
    }
    path = tmp_path / "pareto.png"
    pareto_plot(groups, measured=False, path=path, title="tiny")
    assert path.stat().st_size > 0
