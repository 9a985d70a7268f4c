"""Note [One graph per call]: every call of a rewritten graph runs exactly one compiled graph
(``compute`` on cache steps, ``reuse`` or ``forecast`` on reuse steps), and a variant compiles
only when a call first needs it (Note [Variants compile when first needed])."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import torch
import zoo
from bd_testing import TOL, assert_rewritten_and_reused, cache_block, model_timesteps
from reference import progress_plan, run_reference_loop
from torch._dynamo.utils import counters

#: per compiled graph (by its class name, in compile order): calls so far
CALLS: Counter[str] = Counter()
#: (graph name, the model call, counted from 1, during which it compiled), in compile order
COMPILED: list[tuple[str, int]] = []
MODEL_CALLS = [0]


def _recording(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
    """An inner compiler that runs each graph eagerly and counts its calls."""
    name = type(gm).__name__
    COMPILED.append((name, MODEL_CALLS[0]))

    def run(*args: Any) -> Any:
        CALLS[name] += 1
        return gm.forward(*args)

    return run


@pytest.fixture
def recorded() -> None:
    from torch._dynamo.backends.registry import register_backend

    if "bd_variant_recorder" not in torch._dynamo.list_backends(exclude_tags=()):
        register_backend(_recording, name="bd_variant_recorder")
    CALLS.clear()
    COMPILED.clear()
    MODEL_CALLS[0] = 0


def _run(case: zoo.ZooCase, steps: int, options: dict[str, Any]) -> zoo.LoopResult:
    compiled = torch.compile(
        case.model, backend="blockdance", options={"inner": "bd_variant_recorder", **options}
    )

    def counted(**kwargs: Any) -> Any:
        MODEL_CALLS[0] += 1
        return compiled(**kwargs)

    return zoo.run_loop(case, counted, steps, cfg="batched")


@pytest.mark.usefixtures("recorded")
def test_each_call_runs_one_graph_and_reuse_compiles_at_the_first_reuse_step() -> None:
    case, steps = zoo.get("zoo_dit"), 10
    got = _run(case, steps, {})
    plan = progress_plan(model_timesteps(case, steps))
    assert_rewritten_and_reused(sum(plan))
    c = counters["blockdance"]
    assert CALLS == {"BlockDance_compute": c["cache_steps"], "BlockDance_reuse": c["reuse_steps"]}
    assert sum(CALLS.values()) == MODEL_CALLS[0] == steps
    first_reuse = plan.index(True) + 1
    assert COMPILED == [("BlockDance_compute", 1), ("BlockDance_reuse", first_reuse)]
    ref, _ = run_reference_loop(case, cache_block(case), plan, steps, "batched")
    torch.testing.assert_close(got.latents, ref.latents, **TOL)


@pytest.mark.usefixtures("recorded")
def test_a_model_that_never_reuses_compiles_only_the_compute_graph() -> None:
    _run(zoo.get("zoo_dit"), 6, {"interval": 1})
    assert counters["blockdance"]["graphs_rewritten"] == 1
    assert counters["blockdance"]["reuse_steps"] == 0
    assert [name for name, _ in COMPILED] == ["BlockDance_compute"]


@pytest.mark.usefixtures("recorded")
def test_forecast_steps_run_the_forecast_graph_once_enough_cache_steps_exist() -> None:
    case, steps = zoo.get("zoo_dit"), 12
    got = _run(case, steps, {"forecast": 1, "interval": 3, "window": (0.2, 0.95)})
    c = counters["blockdance"]
    assert_rewritten_and_reused()
    assert CALLS["BlockDance_compute"] == c["cache_steps"]
    assert CALLS["BlockDance_forecast"] > 0
    assert CALLS["BlockDance_forecast"] + CALLS["BlockDance_reuse"] == c["reuse_steps"]
    assert sum(CALLS.values()) == MODEL_CALLS[0]
    assert torch.isfinite(got.latents).all()  # golden values: tests/test_forecast.py


def test_graphs_compiled_at_their_first_call_use_inductors_graph_cache() -> None:
    """The reuse graph compiles after Dynamo's trace (Note [Variants compile when first
    needed]); from real tensors inductor would bypass its FX graph cache ("No shape env") and
    every process would compile it anew."""
    case, steps = zoo.get("zoo_dit"), 6
    compiled = torch.compile(case.model, backend="blockdance")
    zoo.run_loop(case, compiled, steps, cfg="batched")
    assert_rewritten_and_reused()
    inductor = counters["inductor"]
    assert inductor["fxgraph_cache_bypass"] == 0, dict(inductor)
    assert inductor["fxgraph_cache_hit"] + inductor["fxgraph_cache_miss"] == 2, dict(inductor)


#: per graph AOT autograd compiled with ``_static_recorder``: (inputs, static input indices)
STATIC: list[tuple[int, tuple[int, ...]]] = []


def _static_recorder() -> Callable[..., Any]:
    """An inner compiler that runs AOT autograd as inductor does (in a tracing context of its
    own when Dynamo's is over: a variant compiled at its first call) and records which inputs
    of each graph inductor would be told are static (``static_input_idxs``); graphs run
    eagerly."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._guards import TracingContext, detect_fake_mode, tracing

    def forward(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        metadata = TracingContext.get().fw_metadata
        assert metadata is not None
        STATIC.append((len(example_inputs), tuple(metadata.static_input_indices)))
        return gm.forward

    aot = aot_autograd(fw_compiler=forward)

    def compile(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        if TracingContext.try_get() is not None:
            return aot(gm, example_inputs)
        with tracing(TracingContext(detect_fake_mode(example_inputs))):
            return aot(gm, example_inputs)

    return compile


@pytest.mark.parametrize("compile_once", [True, False])
def test_every_variant_keeps_the_weights_static_inputs_as_in_dynamos_graph(
    compile_once: bool,
) -> None:
    """Note [Static inputs]: a variant inductor did not recognise as Dynamo's graph had no static
    inputs at all (on a GPU: every weight's alignment checked per call, and copied on every
    CUDA-graph replay). Each variant's static inputs are exactly the Dynamo graph's static
    inputs it takes (the added cache, forecast weights and row mask are not)."""
    from torch._dynamo.backends.registry import register_backend

    from bd_compile.api import runtimes_of
    from passes import ARGS

    if "bd_static_recorder" not in torch._dynamo.list_backends(exclude_tags=()):
        register_backend(_static_recorder(), name="bd_static_recorder")
    case, steps = zoo.get("zoo_dit"), 12
    STATIC.clear()
    plain = torch.compile(case.model, backend="bd_static_recorder")
    zoo.run_loop(case, plain, 1, cfg="batched")
    ((_, dynamos),) = STATIC
    assert dynamos, "Dynamo marked no input static: the test would prove nothing"
    torch._dynamo.reset()
    STATIC.clear()
    options = {"inner": "bd_static_recorder", "compile_once": compile_once, "forecast": 1}
    compiled = torch.compile(case.model, backend="blockdance", options=options)
    zoo.run_loop(case, compiled, steps, cfg="batched")
    assert_rewritten_and_reused()
    (rt,) = runtimes_of(compiled)
    names = [name for name, _ in rt.compiled]  # in compile order
    assert {"compute", "forecast"} <= set(names), names
    assert len(STATIC) == len(names)
    for name, (count, static) in zip(names, STATIC, strict=True):
        plan = rt.variants.by_name(name).plan
        assert count == len(plan)
        expected = tuple(j for j, (pool, i) in enumerate(plan) if pool == ARGS and i in dynamos)
        assert static == expected, name
