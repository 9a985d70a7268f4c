"""benchmarks/peers_gpu.py cannot rot: its --tiny path (the GPU run's code on a 2 + 2-block
Flux on CPU, Dynamo's eager backend) writes every row, and a tight budget skips rows instead of
overrunning."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from benchmarks import peers_gpu

HAS_CACHE_DIT = importlib.util.find_spec("cache_dit") is not None


def _rows(results: Path) -> dict[str, dict]:
    data = json.loads((results / "peers-gpu-tiny.json").read_text())
    return {r["method"]: r for r in data["rows"]}


def test_tiny_run_times_every_method_at_the_computed_fraction_it_claims(tmp_path: Path) -> None:
    # every method must run: a budget far above the ~20 s this takes alone (--tiny's 60 s
    # default skipped methods on a loaded machine; the budget has its own test below)
    argv = ["--tiny", "--compiler", "eager", "--repeats", "1", "--budget-s", "900"]
    assert peers_gpu.main([*argv, "--results", str(tmp_path)]) == 0
    md = (tmp_path / "peers-gpu-tiny.md").read_text()
    rows = _rows(tmp_path)
    assert set(rows) == {m.name for m in peers_gpu.plan(peers_gpu.TINY)}
    for name, r in rows.items():
        if name.startswith("cache-dit") and not HAS_CACHE_DIT:
            assert r["status"].startswith("not run"), r
            continue
        assert r["status"] == "ok", r
        assert f"| {name} | ok |" in md
        assert r["gen_s"] > 0 and r["recompiles_timed"] == 0, r
    assert rows["inductor"]["computed_fraction"] == 1.0
    for n in (2, 3, 4):
        bd = rows[f"BlockDance N={n}"]
        assert "R" in bd["pattern"] and bd["computed_fraction"] < 1.0, bd
        if HAS_CACHE_DIT:  # the same steps, blocks of about the same FLOP share
            cd = rows[f"cache-dit (BlockDance N={n}'s steps)"]
            assert cd["pattern"] == bd["pattern"], (cd, bd)
            assert abs(cd["computed_fraction"] - bd["computed_fraction"]) < 0.05, (cd, bd)
    calibrated = rows["BlockDance calibrated +forecast 1 N=2"]
    assert calibrated["computed_fraction"] < rows["BlockDance N=2"]["computed_fraction"]


def test_a_tight_budget_skips_methods_and_still_writes_the_table(tmp_path: Path) -> None:
    argv = ["--tiny", "--compiler", "eager", "--repeats", "2", "--budget-s", "0.01"]
    assert peers_gpu.main([*argv, "--results", str(tmp_path)]) == 0
    rows = _rows(tmp_path)
    assert rows["inductor"]["status"] == "ok"  # the baseline always runs
    assert all(
        r["status"].startswith("skipped: budget") for n, r in rows.items() if n != "inductor"
    )
    assert rows["inductor"]["repeats"] == 1  # one round, not two
