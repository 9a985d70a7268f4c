"""Every option with every other: {automatic, counted option, counted ``generation`` block} x
{copy, forecast 1, forecast 2, BlockDance-Ada policy} x {plain caches, CUDA-graph owned caches},
golden against the independent eager reference (tests/reference.py), two generations each.

CUDA graphs are faked on CPU: inductor's ``compile_fx`` is replaced by one that runs the graph
eagerly and writes every output into one static buffer per output, the same memory on every
call, as a CUDA-graph replay does. A runtime that kept such an output (a cache, a forecast's
history) without copying it would read the next replay's values.

Each cell asserts that the graph was rewritten, nothing fell back and the reuse count before it
compares outputs. A diagonal (every loop mode, every schedule and both cache kinds at least
once) is in the fast subset; the rest is ``slow``.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch._inductor.compile_fx
import zoo
from ada_testing import bias_policy, policy_plan
from bd_testing import AOT, TOL, assert_rewritten_and_reused, cache_block, model_timesteps, pattern
from reference import paper_plan, progress_plan, progress_values, run_reference_loop
from torch._dynamo.utils import counters

import bd_compile

STEPS, WINDOW, INTERVAL = 12, (0.2, 0.95), 3
COMPUTE_BINS = [True, False, False, True, False, True, False, True]
LOOPS = ("automatic", "counted-option", "counted-block")
SCHEDULES = ("copy", "forecast-1", "forecast-2", "policy")
CACHES = ("plain", "cuda-graph")
FAST = {
    ("automatic", "copy", "plain"),
    ("counted-option", "forecast-1", "cuda-graph"),
    ("counted-block", "forecast-2", "plain"),
    ("automatic", "policy", "cuda-graph"),
    ("counted-block", "copy", "cuda-graph"),
    ("counted-option", "policy", "plain"),
}


def _static_outputs(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` whose tensor outputs land in buffers allocated once (a CUDA-graph replay)."""
    buffers: list[Any] = []

    def replay(*args: Any) -> Any:
        out = fn(*args)
        values = list(out) if isinstance(out, (tuple, list)) else [out]
        if not buffers:
            buffers.extend(v.clone() if isinstance(v, torch.Tensor) else None for v in values)
        result = []
        for buf, v in zip(buffers, values, strict=True):
            if isinstance(v, torch.Tensor):
                buf.copy_(v)
                result.append(buf)
            else:
                result.append(v)
        return tuple(result) if isinstance(out, (tuple, list)) else result[0]

    return replay


@pytest.fixture
def fake_cuda_graphs(monkeypatch: pytest.MonkeyPatch) -> None:
    def compile_fx(gm: torch.fx.GraphModule, example_inputs: list[Any], **kw: Any) -> Any:
        if (kw.get("config_patches") or {}).get("triton.cudagraphs"):
            return _static_outputs(gm.forward)
        return gm.forward

    monkeypatch.setattr(torch._inductor.compile_fx, "compile_fx", compile_fx)


def _cells() -> Iterator[Any]:
    for cell in itertools.product(LOOPS, SCHEDULES, CACHES):
        marks = () if cell in FAST else (pytest.mark.slow,)
        yield pytest.param(*cell, marks=marks, id="-".join(cell))


@pytest.mark.parametrize(("loop", "schedule", "caches"), list(_cells()))
def test_intersection_matches_the_reference(
    loop: str, schedule: str, caches: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    case = zoo.get("zoo_dit")
    ts = model_timesteps(case, STEPS)
    counted = loop != "automatic"
    options: dict[str, Any] = {"window": WINDOW, "interval": INTERVAL}
    if caches == "cuda-graph":
        request.getfixturevalue("fake_cuda_graphs")
        options["inner_options"] = {"triton.cudagraphs": True}
    else:
        options.update(AOT)
    if loop == "counted-option":
        options["timesteps"] = ts
    forecast = int(schedule.split("-")[1]) if schedule.startswith("forecast") else 0
    if forecast:
        options["forecast"] = forecast
    if schedule == "policy":
        options["policy"] = bias_policy(tmp_path, case, COMPUTE_BINS)
        plan = policy_plan(ts, COMPUTE_BINS)
    else:
        plan = (
            paper_plan(STEPS, WINDOW, INTERVAL) if counted else progress_plan(ts, WINDOW, INTERVAL)
        )
    compiled = torch.compile(case.model, backend="blockdance", options=options)

    def block() -> contextlib.AbstractContextManager[None]:
        if loop == "counted-block":
            return bd_compile.generation(compiled, timesteps=ts)
        return contextlib.nullcontext()

    got = []
    for seed in (0, 1):
        with block():
            got.append(zoo.run_loop(case, compiled, STEPS, cfg="batched", seed=seed))
    assert counters["blockdance"]["graphs_rewritten"] == 1
    assert_rewritten_and_reused(2 * sum(plan))
    assert bd_compile.runtimes_of(compiled)[0].own_cache is (caches == "cuda-graph")
    assert [g.pattern for g in bd_compile.stats(compiled).generations] == [pattern(plan)] * 2
    k = cache_block(case)
    for result, seed in zip(got, (0, 1), strict=True):
        ref, _ = run_reference_loop(
            case, k, plan, STEPS, "batched", seed=seed, forecast=forecast,
            progress=progress_values(ts),
        )  # fmt: skip
        torch.testing.assert_close(result.latents, ref.latents, **TOL)
        if forecast:  # it did extrapolate: a copy would differ
            copy, _ = run_reference_loop(case, k, plan, STEPS, "batched", seed=seed)
            assert (result.latents - copy.latents).abs().max() > 1e-4
