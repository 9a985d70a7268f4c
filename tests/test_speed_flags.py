"""benchmarks.speed's flags: parsing, scenario selection and the rows ``--cudagraphs`` adds
(no generation runs: ``torch.compile`` is lazy)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from benchmarks import speed


def test_defaults_keep_the_cpu_benchmark() -> None:
    args = speed.parse_args([])
    assert (args.device, args.dtype, args.blocks, args.width, args.latent) == (
        "cpu",
        "float32",
        28,
        384,
        32,
    )
    assert not (args.cudagraphs or args.counted or args.no_compile_times)
    assert [s.key for s in speed.select_scenarios(args.scenarios)] == ["dpm30", "ddim50"]


def test_scenarios_by_short_name() -> None:
    args = speed.parse_args(["--scenarios", "ddim50", "dpm30", "ddim50"])
    assert [s.name for s in speed.select_scenarios(args.scenarios)] == [
        "DDIM 50",
        "DPM-Solver++ 30",
    ]
    with pytest.raises(SystemExit):
        speed.parse_args(["--scenarios", "euler20"])
    with pytest.raises(ValueError, match="dpm30"):
        speed.select_scenarios(["euler20"])


def test_quick_and_flags() -> None:
    args = speed.parse_args(["--quick", "--cudagraphs", "--counted", "--no-compile-times"])
    assert (args.blocks, args.width, args.latent, args.repeats, args.tag) == (
        12,
        128,
        16,
        1,
        "quick",
    )
    assert args.cudagraphs and args.counted and args.no_compile_times


def test_cudagraph_rows() -> None:
    args = speed.parse_args(["--cudagraphs", "--intervals", "2", "3"])
    model = torch.nn.Linear(2, 2)
    methods = speed.build_methods(args, model)
    assert list(methods) == [
        "eager",
        "inductor",
        "inductor + CUDA graphs",
        "blockdance N=2",
        "blockdance N=3",
        "blockdance N=2 + CUDA graphs",
        "blockdance N=3 + CUDA graphs",
    ]
    # one compiled blockdance model per mode, switched between N per row
    assert list(speed.blockdance_models(methods)) == [
        "blockdance N=2",
        "blockdance N=2 + CUDA graphs",
    ]
    assert methods["blockdance N=3"].model is methods["blockdance N=2"].model
    assert speed.warm_up_methods(args, methods) == methods
    plain = speed.parse_args(["--intervals", "2", "3"])
    assert list(speed.warm_up_methods(plain, speed.build_methods(plain, model))) == [
        "eager",
        "inductor",
        "blockdance N=2",
    ]


def test_warm_only_compiles_and_writes_no_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(speed, "RESULTS", tmp_path)
    tiny = ["--blocks", "2", "--width", "64", "--latent", "8", "--repeats", "1"]
    speed.main([*tiny, "--intervals", "2", "--scenarios", "dpm30", "--warm-only", "--tag", "w"])
    out = capsys.readouterr().out
    assert "warm-up blockdance N=2" in out and "nothing timed" in out
    assert "rep 0" not in out
    assert list(tmp_path.iterdir()) == []


def test_variants_clocked_clocks_every_graph_call_of_a_blockdance_model() -> None:
    """benchmarks.step_split's inside/outside split and benchmarks.overhead's runtime share are
    only as good as ``variants_clocked``: every call of a compiled variant lands in its list
    (cache steps call ``compute_fn`` directly), and the runtime gets its functions back."""
    import zoo
    from bd_testing import assert_rewritten_and_reused

    import bd_compile
    from bd_compile.api import runtimes_of
    from benchmarks.common import variants_clocked

    case = zoo.get("zoo_dit")
    model = torch.compile(case.model, backend="blockdance", options={"inner": "aot_eager"})
    zoo.run_loop(case, model, 8, cfg="batched")  # compiles compute and reuse
    (rt,) = runtimes_of(model)
    before = (dict(rt.compiled), rt.compute_fn)
    seconds: dict[str, list[float]] = {"compute": [], "reuse": []}
    with variants_clocked(model, seconds.__getitem__):
        zoo.run_loop(case, model, 8, cfg="batched")
    assert_rewritten_and_reused()
    g = bd_compile.stats(model).last
    assert (len(seconds["compute"]), len(seconds["reuse"])) == (
        g.calls - g.reused_calls,
        g.reused_calls,
    )
    assert g.reused_calls > 0 and all(s > 0 for s in seconds["compute"] + seconds["reuse"])
    assert (rt.compiled, rt.compute_fn) == before


def test_overhead_median_ci_narrows_with_more_calls() -> None:
    """benchmarks.overhead's interval of the median: around the median, seeded (the same table
    from the same data), and narrower for 16x the calls (what ``--repeats`` buys)."""
    from benchmarks.overhead import median_ci

    rng = np.random.default_rng(1)
    few, many = rng.normal(50, 100, 50).tolist(), rng.normal(50, 100, 800).tolist()
    lo, hi = median_ci(few)
    assert lo < statistics.median(few) < hi
    assert median_ci(few) == (lo, hi)
    lo_many, hi_many = median_ci(many)
    assert lo_many < 50 < hi_many
    assert hi_many - lo_many < 0.5 * (hi - lo)


def test_write_json_names_the_files_by_tag(tmp_path: Path) -> None:
    """The benchmarks' results files: ``<name>[-<tag>].json`` next to the table's ``.md``, a tag
    with dots kept whole (``with_suffix`` would cut ``n2.5`` to ``n2``)."""
    from benchmarks.common import write_json

    out = tmp_path / "results"
    assert write_json(out, "overhead", "", {"a": 1}) == out / "overhead.md"
    assert write_json(out, "overhead", "n2.5", {"a": 2}) == out / "overhead-n2.5.md"
    assert json.loads((out / "overhead-n2.5.json").read_text()) == {"a": 2}
    assert sorted(p.name for p in out.iterdir()) == ["overhead-n2.5.json", "overhead.json"]


@pytest.mark.slow  # compiles a 2-block model five times through inductor (cache hits after one)
def test_skip_module_guards_reaches_every_method(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--skip-module-guards``: every compared model gets the guard filter. torch pops it out
    of the options dict it is given, so options shared between two ``torch.compile`` calls
    filter only the first one's guards (the bug this catches: a benchmark of filtered inductor
    against unfiltered blockdance)."""
    import argparse

    from benchmarks import overhead

    filtered: list[int] = []

    def recording(guards: list[Any]) -> list[bool]:
        filtered.append(len(guards))
        return torch.compiler.skip_guard_on_all_nn_modules_unsafe(guards)

    def options(skip: bool) -> dict[str, Any]:
        return {"guard_filter_fn": recording} if skip else {}

    monkeypatch.setattr(overhead, "guard_options", options)
    args = argparse.Namespace(blocks=2, width=64, latent=4, steps=4, interval=2, device="cpu")
    model, calls = overhead.build_model(args), overhead.Calls(args)
    methods = overhead.compiled_methods(model, calls, args.interval, skip_module_guards=True)
    for m in methods.values():
        calls.call(m, 0)
    assert len(filtered) == len(methods) == 5
