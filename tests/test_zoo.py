"""Pins the test zoo, the sampling loop and the eager BlockDance reference themselves.

Golden tests of the backend compare against `reference.py`; these tests make sure that
reference is worth comparing against: it is exact when it caches nothing, it changes the
result when it does cache, it skips the blocks it claims to skip, and it keeps CFG branches
apart.
"""

from __future__ import annotations

from typing import Any

import pytest
import reference
import torch
import torch._dynamo
import zoo
from torch import nn
from torch._dynamo.testing import CompileCounter

STEPS = 10
# 10 steps, window (0.25, 0.95) -> range(3, 10); reuse steps 4, 6, 8.
PLAN = reference.paper_plan(STEPS, (0.25, 0.95), 2)
FLOW_CASES = {"sd3", "flux"}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _cache_block(case: zoo.ZooCase) -> int:
    return len(case.blocks()) // 2


@pytest.fixture(params=zoo.NAMES)
def case(request: pytest.FixtureRequest) -> zoo.ZooCase:
    return zoo.get(request.param)


# --- the zoo ---------------------------------------------------------------------------------


def test_case_is_one_graph_under_fullgraph_and_matches_eager(case: zoo.ZooCase) -> None:
    kw = case.example_inputs(batch=2)
    with torch.no_grad():
        expected = case.output(case.model(**kw))
        torch._dynamo.reset()
        got = case.output(torch.compile(case.model, backend="eager", fullgraph=True)(**kw))
        torch.testing.assert_close(got, expected, rtol=0, atol=0)

        torch._dynamo.reset()
        counter = CompileCounter()
        compiled = torch.compile(case.model, backend=counter, fullgraph=True)
        torch.testing.assert_close(case.output(compiled(**kw)), expected, rtol=0, atol=0)
        # Another timestep value and the other branch's conditioning: same graph.
        sched = case.make_scheduler()
        sched.set_timesteps(10)
        latents = torch.randn((2, *case.latent_shape))
        other = case.inputs(latents, sched.timesteps[7], zoo.UNCOND)
        torch.testing.assert_close(
            case.output(compiled(**other)), case.output(case.model(**other)), rtol=0, atol=0
        )
    torch._dynamo.reset()
    assert counter.frame_count == 1


def test_blocks_are_listed_in_execution_order_and_each_runs_once(case: zoo.ZooCase) -> None:
    blocks = case.blocks()
    order: list[int] = []
    handles = [
        b.register_forward_pre_hook(lambda _m, _a, i=i: order.append(i))
        for i, b in enumerate(blocks)
    ]
    try:
        with torch.no_grad():
            case.model(**case.example_inputs())
    finally:
        for h in handles:
            h.remove()
    assert order == list(range(len(blocks)))
    assert len(blocks) >= 4


def test_model_timestep_has_the_pipeline_dtype_and_shape(case: zoo.ZooCase) -> None:
    kw = case.example_inputs(batch=3)
    t = kw[case.timestep_kwarg]
    assert t.shape == (3,)
    assert t.dtype == (torch.float32 if case.name in FLOW_CASES else torch.int64)
    if case.name == "flux":
        assert 0.0 < t[0].item() <= 1.0  # FluxPipeline passes t / 1000


@pytest.mark.parametrize("cfg", ["none", "batched", "sequential"])
def test_run_loop_is_deterministic_and_calls_the_model_as_configured(cfg: Any) -> None:
    case = zoo.get("pixart")
    calls: list[tuple[int, int | None]] = []

    def record(info: zoo.CallInfo) -> None:
        calls.append((info.step, info.branch))

    a = zoo.run_loop(case, case.model, STEPS, cfg=cfg, seed=3, batch=2, before_call=record)
    b = zoo.run_loop(case, case.model, STEPS, cfg=cfg, seed=3, batch=2)
    torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=0)
    assert torch.isfinite(a.latents).all()
    assert len(a.timesteps) == STEPS and a.timesteps == sorted(a.timesteps, reverse=True)
    branches: dict[str, list[int | None]] = {"none": [0], "batched": [None], "sequential": [0, 1]}
    per_step = branches[cfg]
    assert calls == [(i, br) for i in range(STEPS) for br in per_step]
    width = 4 if cfg == "batched" else 2
    assert all(t.shape == (width,) and t.dtype == torch.int64 for t in a.model_timesteps)


def test_flow_loop_accepts_explicit_timesteps() -> None:
    case = zoo.get("sd3")
    ts = [1000.0, 750.0, 500.0, 250.0]
    out = zoo.run_loop(case, case.model, 4, cfg="none", timesteps=ts)
    assert out.timesteps == ts
    with pytest.raises(ValueError, match="timesteps="):
        zoo.run_loop(zoo.get("dit"), zoo.get("dit").model, 4, cfg="none", timesteps=ts)


# --- the reference ---------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", ["none", "batched", "sequential"])
def test_reference_with_all_compute_plan_equals_plain_loop(case: zoo.ZooCase, cfg: Any) -> None:
    plain = zoo.run_loop(case, case.model, STEPS, cfg=cfg, seed=1)
    ref, ctrl = reference.run_reference_loop(
        case, _cache_block(case), [False] * STEPS, STEPS, cfg, seed=1
    )
    torch.testing.assert_close(ref.latents, plain.latents, rtol=0, atol=0)
    assert ctrl.reuse_calls == 0 and ctrl.compute_calls == plain.calls


def test_reference_with_caching_plan_changes_the_output_and_skips_blocks(
    case: zoo.ZooCase,
) -> None:
    cache_block = _cache_block(case)
    plain = zoo.run_loop(case, case.model, STEPS, cfg="sequential", seed=1)
    ref, ctrl = reference.run_reference_loop(case, cache_block, PLAN, STEPS, "sequential", seed=1)
    assert _rel(ref.latents, plain.latents) > 1e-4
    reuse_calls = 2 * sum(PLAN)
    assert ctrl.reuse_calls == reuse_calls and ctrl.compute_calls == 2 * STEPS - reuse_calls
    n = len(case.blocks())
    expected = [2 * STEPS - reuse_calls] * (cache_block + 1) + [2 * STEPS] * (n - cache_block - 1)
    assert ctrl.block_calls == expected


@pytest.mark.parametrize("name", ["pixart", "flux", "latte"])
def test_sequential_branches_keep_their_own_caches(name: str) -> None:
    # Sequential CFG with one cache per branch must agree with batched CFG with one cache of
    # the [cond; uncond] batch (same math, different batching); a cache shared by the two
    # sequential branches would feed cond features to the uncond call and differ by far more.
    case = zoo.get(name)
    cb = _cache_block(case)
    seq, ctrl = reference.run_reference_loop(case, cb, PLAN, STEPS, "sequential", seed=2)
    bat, _ = reference.run_reference_loop(case, cb, PLAN, STEPS, "batched", seed=2)
    plain = zoo.run_loop(case, case.model, STEPS, cfg="sequential", seed=2)
    assert _rel(seq.latents, bat.latents) < 1e-5
    assert _rel(seq.latents, plain.latents) > 1e-4
    cond_out, uncond_out = ctrl.cached(zoo.COND, cb), ctrl.cached(zoo.UNCOND, cb)
    first = (lambda v: v) if isinstance(cond_out, torch.Tensor) else (lambda v: v[-1])
    assert not torch.equal(first(cond_out), first(uncond_out))


@pytest.mark.parametrize("name", ["zoo_dit", "pixart"])
def test_reuse_call_feeds_the_cached_output_into_the_next_block(name: str) -> None:
    case = zoo.get(name)
    blocks = case.blocks()
    cb = 2
    seen: list[torch.Tensor] = []
    hook = blocks[cb + 1].register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].detach().clone())
    )
    try:
        with torch.no_grad(), reference.blockdance_reference(blocks, cb) as ctrl:
            case.model(**case.example_inputs(seed=0))
            stored = ctrl.cached(0, cb)
            ctrl.reuse = True
            case.model(**case.example_inputs(seed=1))
    finally:
        hook.remove()
    assert ctrl.block_calls[: cb + 1] == [1] * (cb + 1)
    assert ctrl.block_calls[cb + 1 :] == [2] * (len(blocks) - cb - 1)
    torch.testing.assert_close(seen[0], stored, rtol=0, atol=0)
    torch.testing.assert_close(seen[1], stored, rtol=0, atol=0)


def test_reuse_before_write_raises() -> None:
    case = zoo.get("zoo_dit")
    with torch.no_grad(), reference.blockdance_reference(case.blocks(), 2) as ctrl:
        ctrl.reuse = True
        with pytest.raises(RuntimeError, match="before a compute call"):
            case.model(**case.example_inputs())
        ctrl.reuse = False
        case.model(**case.example_inputs())  # fills branch 0 only
        ctrl.reuse, ctrl.branch = True, 1
        with pytest.raises(RuntimeError, match="branch 1"):
            case.model(**case.example_inputs())


def test_reference_restores_the_blocks_even_after_an_error() -> None:
    case = zoo.get("flux")
    blocks: list[nn.Module] = case.blocks()
    with pytest.raises(RuntimeError), reference.blockdance_reference(blocks, 1) as ctrl:
        ctrl.reuse = True
        with torch.no_grad():
            case.model(**case.example_inputs())
    assert all("forward" not in b.__dict__ for b in blocks)
    with pytest.raises(ValueError, match="cache_block"):
        with reference.blockdance_reference(blocks, len(blocks)):
            pass


# --- the plan --------------------------------------------------------------------------------


def test_paper_plan_pixart_window_n2() -> None:
    plan = reference.paper_plan(30, (0.4, 0.95), 2)
    assert len(plan) == 30
    assert [i for i, r in enumerate(plan) if r] == list(range(13, 28, 2))
    assert sum(plan) == 8


def test_paper_plan_groups_windows_and_edge_cases() -> None:
    # N=3 on 50 steps, window 25%-95% = range(13, 48): groups start at 13, 16, ..., 46.
    plan = reference.paper_plan(50, (0.25, 0.95), 3)
    reuse = [i for i, r in enumerate(plan) if r]
    assert reuse == [i for i in range(13, 48) if (i - 13) % 3 != 0]
    assert reference.paper_plan(20, (0.4, 0.95), 1) == [False] * 20
    # 0.55 * 20 is 11.000000000000002 in floating point; the window still starts at 11.
    assert reference.paper_plan(20, (0.55, 1.0), 2).index(True) == 12
    assert reference.paper_plan(10, (0.0, 1.0), 2) == [False, True] * 5
    with pytest.raises(ValueError):
        reference.paper_plan(10, (0.9, 0.1), 2)
    with pytest.raises(ValueError):
        reference.paper_plan(10, (0.4, 0.95), 0)
