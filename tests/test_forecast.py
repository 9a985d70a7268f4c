"""Forecast reuse (Note [Forecast reuse]): golden against an eager reference that extrapolates
the replayed block outputs by Newton's divided differences; option plumbing and memory."""

from __future__ import annotations

import pytest
import torch
import zoo
from bd_testing import AOT, TOL, model_timesteps
from reference import progress_plan, progress_values, run_reference_loop
from torch._dynamo.utils import counters

import bd_compile
from bd_compile.calls import lagrange_weights


def test_lagrange_weights_reproduce_polynomials() -> None:
    xs = [0.1, 0.3, 0.45]
    for f in (lambda x: 2 - 3 * x, lambda x: 1 + x - 4 * x * x):
        w = lagrange_weights(xs, 0.6)
        assert sum(wi * f(xi) for wi, xi in zip(w, xs, strict=True)) == pytest.approx(f(0.6))
    assert lagrange_weights([0.2, 0.4], 0.5) == pytest.approx([-0.5, 1.5])


@pytest.mark.parametrize(
    ("name", "order", "cfg"),
    [("pixart", 1, "batched"), ("pixart", 2, "sequential"), ("sd3", 2, "batched")],
)
def test_forecast_matches_the_eager_extrapolation(name: str, order: int, cfg: zoo.CfgMode) -> None:
    case, steps, window, interval = zoo.get(name), 20, (0.2, 0.95), 4
    ts = model_timesteps(case, steps)
    plan = progress_plan(ts, window, interval)
    options = {**AOT, "window": window, "interval": interval, "forecast": order}
    compiled = torch.compile(case.model, backend="blockdance", options=options)
    got = zoo.run_loop(case, compiled, steps, cfg=cfg)
    c = counters["blockdance"]
    assert c["graphs_rewritten"] == 1 and c["fallbacks"] == 0 and c["reuse_steps"] > 0
    k = bd_compile.default_cache_block(len(case.blocks()))
    ref, _ = run_reference_loop(
        case, k, plan, steps, cfg, forecast=order, progress=progress_values(ts)
    )
    copy, _ = run_reference_loop(case, k, plan, steps, cfg)
    torch.testing.assert_close(got.latents, ref.latents, **TOL)
    assert (got.latents - copy.latents).abs().max() > 1e-4  # it did extrapolate


def test_forecast_changes_through_set_schedule_without_recompiling() -> None:
    case, steps, window, interval = zoo.get("pixart"), 12, (0.2, 0.95), 3
    ts = model_timesteps(case, steps)
    plan = progress_plan(ts, window, interval)
    k = bd_compile.default_cache_block(len(case.blocks()))
    compiled = torch.compile(case.model, backend="blockdance", options=AOT)
    with torch._dynamo.config.patch(error_on_recompile=True):
        zoo.run_loop(case, compiled, steps, cfg="batched")
        for order in (1, 2, 0):
            bd_compile.set_schedule(compiled, forecast=order, interval=interval, window=window)
            reuse_before = counters["blockdance"]["reuse_steps"]
            got = zoo.run_loop(case, compiled, steps, cfg="batched")
            assert counters["blockdance"]["reuse_steps"] > reuse_before
            ref, _ = run_reference_loop(
                case, k, plan, steps, "batched", forecast=order, progress=progress_values(ts)
            )
            # each order's own extrapolation: an ignored forecast= would give the copy's output
            torch.testing.assert_close(got.latents, ref.latents, **TOL, msg=f"forecast={order}")
    c = counters["blockdance"]
    assert c["graphs_rewritten"] == 1 and c["fallbacks"] == 0


def test_a_forecast_asked_for_after_a_dynamic_compile_follows_each_batch_size() -> None:
    """Note [Variants compile when first needed]: under ``dynamic=True`` a forecast graph that
    ``set_schedule`` asks for after compiling is compiled per concrete signature (a graph
    compiled once from the first call's tensors would be specialised to its batch size)."""
    case, steps, window, interval = zoo.get("pixart"), 12, (0.2, 0.95), 3
    ts = model_timesteps(case, steps)
    plan = progress_plan(ts, window, interval)
    k = bd_compile.default_cache_block(len(case.blocks()))
    compiled = torch.compile(case.model, backend="blockdance", dynamic=True, options=AOT)
    zoo.run_loop(case, compiled, steps, cfg="batched")
    bd_compile.set_schedule(compiled, forecast=1, interval=interval, window=window)
    for batch in (1, 2):
        reuse_before = counters["blockdance"]["reuse_steps"]
        got = zoo.run_loop(case, compiled, steps, cfg="batched", batch=batch)
        assert counters["blockdance"]["reuse_steps"] > reuse_before
        ref, _ = run_reference_loop(
            case, k, plan, steps, "batched", forecast=1, progress=progress_values(ts), batch=batch
        )
        torch.testing.assert_close(got.latents, ref.latents, **TOL, msg=f"batch={batch}")
    (rt,) = bd_compile.api.runtimes_of(compiled)
    assert rt.symbolic and sum(name == "forecast" for name, _ in rt.compiled) == 2


def test_explain_reports_the_forecast_memory() -> None:
    case = zoo.get("zoo_dit")
    compiled = torch.compile(case.model, backend="blockdance", options={**AOT, "forecast": 2})
    zoo.run_loop(case, compiled, 12, cfg="batched")
    text = str(bd_compile.explain(compiled))
    assert "forecast 2: 3 caches per branch" in text
    st = bd_compile.stats(compiled)
    per_cache = sum(v.nbytes or 0 for v in st.graphs[0].cached)
    assert st.last.cache_bytes == 3 * per_cache


@pytest.mark.parametrize("bad", [3, -1, True, 1.0])
def test_forecast_must_be_0_1_or_2(bad: object) -> None:
    with pytest.raises(ValueError, match="forecast.*expected 0 \\(copy\\), 1 \\(linear\\) or 2"):
        bd_compile.from_options({"forecast": bad})
