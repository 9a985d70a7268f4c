"""``inner_options`` reach inductor for every graph, and with CUDA graphs the cache lives
in buffers the runtime owns (Note [Caches under CUDA graphs]). Plumbing only, on CPU: inductor's
``compile_fx`` is replaced by a recorder that runs the graph eagerly."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch._inductor.compile_fx
import zoo
from reference import progress_plan, run_reference_loop
from torch._dynamo.utils import counters

import bd_compile
from bd_compile.loop import states_of

#: data pointers of every tensor the compute graph returned (the recorder below fills it)
REGION_OUTPUTS: list[int] = []


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []
    REGION_OUTPUTS.clear()

    def fake_compile_fx(gm: torch.fx.GraphModule, example_inputs: list[Any], **kw: Any) -> Any:
        calls.append(dict(kw.get("config_patches") or {}))
        if type(gm).__name__ != "BlockDance_compute":
            return gm.forward

        def region(*args: Any) -> Any:
            out = gm.forward(*args)
            REGION_OUTPUTS.extend(v.data_ptr() for v in out if isinstance(v, torch.Tensor))
            return out

        return region

    monkeypatch.setattr(torch._inductor.compile_fx, "compile_fx", fake_compile_fx)
    return calls


def test_mode_and_config_keys_reach_every_graph(recorded: list[dict[str, Any]]) -> None:
    case = zoo.get("pixart")
    compiled = torch.compile(
        case.model,
        backend="blockdance",
        options={"inner_options": {"mode": "max-autotune", "coordinate_descent_tuning": False}},
    )
    zoo.run_loop(case, compiled, 4, cfg="batched")
    assert counters["blockdance"]["graphs_rewritten"] == 1
    want = {"max_autotune": True, "triton.cudagraphs": True, "coordinate_descent_tuning": False}
    # compute, and reuse compiled with it under CUDA graphs (Note [Variants compile when first
    # needed])
    assert recorded == [want] * 2


def test_torch_compile_mode_is_the_inner_mode(recorded: list[dict[str, Any]]) -> None:
    case = zoo.get("zoo_dit")
    compiled = torch.compile(case.model, backend="blockdance", mode="reduce-overhead")
    zoo.run_loop(case, compiled, 2, cfg="batched")
    assert recorded == [{"triton.cudagraphs": True}] * len(recorded) and recorded


def test_cuda_graph_caches_are_owned_buffers_copied_in_place(
    recorded: list[dict[str, Any]],
) -> None:
    case, steps = zoo.get("pixart"), 12
    compiled = torch.compile(
        case.model, backend="blockdance", options={"inner_options": {"triton.cudagraphs": True}}
    )
    buffers: list[int] = []

    def watch(info: zoo.CallInfo) -> None:
        for state in states_of(compiled):
            for gen in state.running_generations():
                buffers.extend(v.data_ptr() for s in gen.slots.values() for v in s.values)

    got = zoo.run_loop(case, compiled, steps, cfg="batched", before_call=watch)
    assert bd_compile.runtimes_of(compiled)[0].own_cache
    assert len(set(buffers)) == 1  # one buffer, copied into on every cache step
    assert REGION_OUTPUTS and not set(buffers) & set(REGION_OUTPUTS)
    sched = case.make_scheduler()
    sched.set_timesteps(steps)
    plan = progress_plan([float(t) for t in sched.timesteps])
    ref, _ = run_reference_loop(
        case, bd_compile.default_cache_block(len(case.blocks())), plan, steps, "batched"
    )
    assert counters["blockdance"]["reuse_steps"] == sum(plan) > 0
    torch.testing.assert_close(got.latents, ref.latents, rtol=1e-4, atol=1e-5)
