"""Every pair of option values at least once: model x CFG mode x schedule (copy, forecast 1 or 2)
x loop (automatic, counted option, counted ``generation`` block) x compile-once x dynamic shapes x
batch x cache block, golden against the independent eager reference (tests/reference.py) over
two generations. ``tests/test_intersections.py`` crosses loops, schedules (with Ada's policies,
which are made for one model's layout) and cache kinds on one model; this covers where the rest
meet, in a few dozen runs instead of the thousands of the full product (a covering array built
greedily, in a fixed order: the same cells every run). aot_eager; ``slow``."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Sequence
from typing import Any

import pytest
import torch
import zoo
from bd_testing import TOL, model_timesteps, pattern
from reference import paper_plan, progress_plan, progress_values, run_reference_loop
from torch._dynamo.utils import counters

import bd_compile

STEPS, WINDOW, INTERVAL = 10, (0.2, 0.95), 2
FACTORS: dict[str, tuple[Any, ...]] = {
    "model": zoo.NAMES,
    "cfg": ("batched", "sequential", "none"),
    "schedule": ("copy", "forecast-1", "forecast-2"),
    "loop": ("automatic", "counted-option", "counted-block"),
    "compile_once": (True, False),
    "dynamic": (False, True),
    "batch": (1, 2),
    "cache_block": ("default", "first"),
}


def covering(factors: dict[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Cells that together hold every pair of values of two factors: each new cell is the
    candidate of the full product covering the most pairs not yet covered (the first such
    one in product order)."""
    names = list(factors)
    missing = {
        ((a, x), (b, y))
        for a, b in itertools.combinations(names, 2)
        for x in factors[a]
        for y in factors[b]
    }
    product = [
        dict(zip(names, values, strict=True)) for values in itertools.product(*factors.values())
    ]

    def pairs(cell: dict[str, Any]) -> frozenset[tuple[tuple[str, Any], tuple[str, Any]]]:
        return frozenset(((a, cell[a]), (b, cell[b])) for a, b in itertools.combinations(names, 2))

    candidates = [(cell, pairs(cell)) for cell in product]
    cells = []
    while missing:
        best, covered = max(candidates, key=lambda c: len(c[1] & missing))
        cells.append(best)
        missing -= covered
    return cells


CELLS = covering(FACTORS)


def test_the_cells_cover_every_pair_and_are_few() -> None:
    names = list(FACTORS)
    for a, b in itertools.combinations(names, 2):
        seen = {(c[a], c[b]) for c in CELLS}
        assert seen == set(itertools.product(FACTORS[a], FACTORS[b])), (a, b)
    assert len(CELLS) <= 40


@pytest.mark.slow
@pytest.mark.parametrize("cell", CELLS, ids=lambda c: "-".join(map(str, c.values())))
def test_cell_matches_the_reference(cell: dict[str, Any]) -> None:
    case = zoo.get(cell["model"])
    ts = model_timesteps(case, STEPS)
    k = 0 if cell["cache_block"] == "first" else bd_compile.default_cache_block(len(case.blocks()))
    options: dict[str, Any] = {
        "inner": "aot_eager",
        "compile_once": cell["compile_once"],
        "interval": INTERVAL,
        "window": WINDOW,
        "cache_block": k,
    }
    branches = 2 if cell["cfg"] == "sequential" else 1  # model calls per step
    if cell["loop"] == "counted-option":
        options.update(timesteps=ts, branches=branches)
    forecast = int(cell["schedule"][-1]) if cell["schedule"].startswith("forecast") else 0
    options["forecast"] = forecast
    if cell["loop"] == "automatic":
        plan = progress_plan(ts, WINDOW, INTERVAL)
    else:
        plan = paper_plan(STEPS, WINDOW, INTERVAL)
    compiled = torch.compile(
        case.model, backend="blockdance", options=options, dynamic=cell["dynamic"] or None
    )
    got = []
    for seed in (0, 1):
        block = (
            bd_compile.generation(compiled, timesteps=ts, branches=branches)
            if cell["loop"] == "counted-block"
            else contextlib.nullcontext()
        )
        with block:
            got.append(
                zoo.run_loop(case, compiled, STEPS, cfg=cell["cfg"], seed=seed, batch=cell["batch"])
            )
    c = counters["blockdance"]
    assert c["graphs_rewritten"] >= 1 and c["fallbacks"] == 0, dict(c)
    assert c["reuse_steps"] == 2 * branches * sum(plan) > 0, dict(c)
    assert [g.pattern for g in bd_compile.stats(compiled).generations] == [pattern(plan)] * 2
    for result, seed in zip(got, (0, 1), strict=True):
        ref, _ = run_reference_loop(
            case, k, plan, STEPS, cell["cfg"], seed=seed, batch=cell["batch"],
            forecast=forecast, progress=progress_values(ts),
        )  # fmt: skip
        torch.testing.assert_close(result.latents, ref.latents, **TOL)
