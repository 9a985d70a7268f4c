"""benchmarks.cold_compile's report: medians over repeats, ranges, the ratio to regional."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import cold_compile


def run(cold: float) -> dict[str, float]:
    return {"cold_compile_s": cold, "cold_run_s": 1.0, "warm_compile_s": 2.0, "warm_run_s": 1.0}


def test_the_report_gives_medians_their_range_and_the_ratio_of_medians(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cold_compile, "RESULTS", tmp_path)
    rows = {
        "pixart28": {
            "regional": cold_compile.summarize([run(14.0), run(20.0), run(16.0)]),
            "blockdance": cold_compile.summarize([run(26.0), run(24.0), run(40.0)]),
        }
    }
    assert rows["pixart28"]["regional"]["cold_compile_s"] == 16.0
    text = cold_compile.write(rows, steps=10, repeats=3, tag="t").read_text()
    assert "| pixart28 | regional | 16.0 (14.0-20.0) | 1.00 |" in text
    assert "| pixart28 | blockdance | 26.0 (24.0-40.0) | 1.62 |" in text
    assert "Median of 3 repeats" in text
    assert "--models pixart28 --configs regional blockdance --repeats 3 --tag t`" in text
    assert (tmp_path / "cold_compile-t.json").is_file()


def test_one_repeat_prints_plain_numbers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cold_compile, "RESULTS", tmp_path)
    rows = {"reference12": {"regional": cold_compile.summarize([run(15.0)])}}
    text = cold_compile.write(rows, steps=10, repeats=1, tag="").read_text()
    assert "| reference12 | regional | 15.0 | 1.00 | 2.0 | 1.00 |" in text
    assert "One measurement each" in text


def test_repeats_must_be_positive() -> None:
    with pytest.raises(SystemExit):
        cold_compile.main(["--repeats", "0"])
