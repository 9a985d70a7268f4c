"""The blockdance backend end to end on tiny diffusers DiTs and a DiT written here.

Golden tests compare against ``reference.py``: an eager implementation of the BlockDance
semantics by forward replacement on the block modules, independent of the FX passes.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from typing import Any

import pytest
import torch
import zoo
from bd_testing import AOT, TOL, cache_block, model_timesteps
from reference import paper_plan, progress_plan, run_reference_loop
from torch._dynamo.utils import counters

import bd_compile


def compile_bd(case: zoo.ZooCase, **options: object) -> torch.nn.Module:
    return torch.compile(case.model, backend="blockdance", options={**AOT, **options})


@pytest.mark.parametrize("name", zoo.NAMES)
def test_all_compute_schedule_matches_eager(name: str) -> None:
    case = zoo.get(name)
    eager = zoo.run_loop(case, case.model, 6, cfg="batched")
    compiled = compile_bd(case, interval=1)
    got = zoo.run_loop(case, compiled, 6, cfg="batched")
    torch.testing.assert_close(got.latents, eager.latents, **TOL)
    assert counters["blockdance"]["graphs_rewritten"] == 1
    assert counters["blockdance"]["reuse_steps"] == 0


@pytest.mark.parametrize("name", zoo.NAMES)
def test_caching_matches_eager_reference(name: str) -> None:
    case, steps, window = zoo.get(name), 10, (0.2, 0.95)
    ts = model_timesteps(case, steps)
    plan = paper_plan(steps, window, 2)
    compiled = compile_bd(case, timesteps=ts, window=window, cache_block=cache_block(case))
    got = zoo.run_loop(case, compiled, steps, cfg="batched")
    ref, ctrl = run_reference_loop(case, cache_block(case), plan, steps, "batched")
    full = zoo.run_loop(case, case.model, steps, cfg="batched")
    torch.testing.assert_close(got.latents, ref.latents, **TOL)
    assert (got.latents - full.latents).abs().max() > 1e-4 * full.latents.abs().max()
    assert counters["blockdance"]["reuse_steps"] == sum(plan) == ctrl.reuse_calls
    assert counters["blockdance"]["cache_steps"] == steps - sum(plan)


@pytest.mark.parametrize("name", ["pixart", "sd3"])
def test_sequential_cfg_keeps_one_cache_per_branch(name: str) -> None:
    case, steps, window = zoo.get(name), 10, (0.2, 0.95)
    plan = paper_plan(steps, window, 2)
    ts = model_timesteps(case, steps)
    compiled = compile_bd(
        case, timesteps=ts, branches=2, window=window, cache_block=cache_block(case)
    )
    got = zoo.run_loop(case, compiled, steps, cfg="sequential")
    ref, _ = run_reference_loop(case, cache_block(case), plan, steps, "sequential")
    torch.testing.assert_close(got.latents, ref.latents, **TOL)
    assert counters["blockdance"]["reuse_steps"] == 2 * sum(plan)


def test_default_schedule_follows_progress_rule_and_reference() -> None:
    case, steps = zoo.get("pixart"), 20
    compiled = compile_bd(case)
    got = zoo.run_loop(case, compiled, steps, cfg="batched")
    plan = progress_plan(model_timesteps(case, steps), (0.4, 0.95), 2)
    assert plan == paper_plan(steps, (0.4, 0.95), 2)  # DDIM 20 steps: exact
    ref, _ = run_reference_loop(case, cache_block(case), plan, steps, "batched")
    torch.testing.assert_close(got.latents, ref.latents, **TOL)


def test_repeated_generations_and_schedule_changes_do_not_recompile() -> None:
    case = zoo.get("pixart")
    compiled = compile_bd(case)
    with torch._dynamo.config.patch(error_on_recompile=True):
        first = zoo.run_loop(case, compiled, 12, cfg="batched")
        again = zoo.run_loop(case, compiled, 12, cfg="batched")
        zoo.run_loop(case, compiled, 30, cfg="batched")  # other step count
        bd_compile.set_schedule(compiled, interval=3, window=(0.3, 0.9))
        zoo.run_loop(case, compiled, 20, cfg="batched")
        mask = torch.zeros(1000, dtype=torch.bool)
        mask[::2] = True
        bd_compile.set_schedule(compiled, schedule=mask)
        zoo.run_loop(case, compiled, 20, cfg="batched")
        bd_compile.set_schedule(compiled, interval=2, window=(0.4, 0.95), schedule=None)
        last = zoo.run_loop(case, compiled, 12, cfg="batched")
    torch.testing.assert_close(again.latents, first.latents, rtol=0, atol=0)
    torch.testing.assert_close(last.latents, first.latents, rtol=0, atol=0)
    assert counters["blockdance"]["graphs_rewritten"] == 1
    c = counters["blockdance"]
    assert c["cache_steps"] + c["reuse_steps"] == 12 + 12 + 30 + 20 + 20 + 12


def test_set_schedule_keeps_the_options_it_is_not_given() -> None:
    case = zoo.get("zoo_dit")
    compiled = compile_bd(case, window=(0.1, 0.9), interval=3)
    zoo.run_loop(case, compiled, 4, cfg="batched")
    bd_compile.set_schedule(compiled, interval=2)
    settings = bd_compile.stats(compiled).settings
    assert (settings.window, settings.interval) == ((0.1, 0.9), 2)
    bd_compile.set_schedule(compiled, timesteps=[800.0, 600.0], branches=2)
    assert bd_compile.stats(compiled).settings.branches == 2
    bd_compile.set_schedule(compiled, schedule=torch.ones(10, dtype=torch.bool))
    settings = bd_compile.stats(compiled).settings
    assert settings.timesteps is None  # timesteps and schedule replace each other
    assert settings.branches == 1


def test_calibration_for_another_block_count_falls_back(tmp_path: object) -> None:
    from pathlib import Path

    from bd_compile.calibration import Calibration, save_calibration

    case = zoo.get("zoo_dit")
    n = len(case.blocks())
    path = Path(str(tmp_path)) / "cal.json"
    fields = {
        "cache_block": 1,
        "window": (0.3, 0.95),
        "threshold": 0.99,
        "num_blocks": n + 2,
        "num_steps": 20,
        "metric": "cosine",
        "model": "ZooDiT",
        "created": "2026-11-26T00:00:00+00:00",
    }
    save_calibration(Calibration(**fields), path)  # type: ignore[arg-type]
    compiled = compile_bd(case, calibration=str(path))
    with torch.no_grad():
        compiled(**case.example_inputs())
    assert counters["blockdance"]["fallbacks"] == 1
    save_calibration(Calibration(**{**fields, "num_blocks": n}), path)  # type: ignore[arg-type]
    torch._dynamo.reset()
    compiled = compile_bd(case, calibration=str(path))
    zoo.run_loop(case, compiled, 4, cfg="batched")
    st = bd_compile.stats(compiled)
    assert (st.graphs[-1].cache_block, st.settings.window) == (1, (0.3, 0.95))


def test_first_call_of_every_generation_computes() -> None:
    case = zoo.get("zoo_dit")
    everything = torch.ones(1000, dtype=torch.bool)  # reuse wherever a cache is valid
    compiled = compile_bd(case, schedule=everything)
    zoo.run_loop(case, compiled, 5, cfg="batched")
    assert bd_compile.stats(compiled).last.pattern == "CRRRR"
    zoo.run_loop(case, compiled, 5, cfg="sequential")  # batch 1: another shape
    last = bd_compile.stats(compiled).last
    assert last.pattern == "CRRRR"  # each branch writes at step 0 before it reads
    assert (last.calls, last.reused_calls) == (10, 8)


def test_shape_change_never_reads_another_shapes_cache() -> None:
    case = zoo.get("zoo_dit")
    compiled = torch.compile(
        case.model,
        backend="blockdance",
        dynamic=True,
        options={**AOT, "schedule": torch.ones(1000, dtype=torch.bool)},
    )
    t = torch.tensor([900, 800, 700])
    a, b = case.example_inputs(batch=2), case.example_inputs(batch=3)
    with torch.no_grad():
        compiled(**{**a, case.timestep_kwarg: t[0].expand(2)})
        out = compiled(**{**b, case.timestep_kwarg: t[1].expand(3)})
        ref = case.model(**{**b, case.timestep_kwarg: t[1].expand(3)})
    torch.testing.assert_close(zoo.first_tensor(out), zoo.first_tensor(ref), **TOL)
    assert counters["blockdance"]["reuse_steps"] == 0


def test_many_calls_at_one_timestep_keep_the_cache_bounded() -> None:
    from bd_compile.loop import MAX_BRANCHES

    case = zoo.get("zoo_dit")
    compiled = compile_bd(case)
    inputs = case.example_inputs()
    with torch.no_grad():
        for _ in range(3 * MAX_BRANCHES):
            compiled(**inputs)
    st = bd_compile.stats(compiled)
    per_branch = sum(v.nbytes or 0 for v in st.graphs[0].cached)
    assert st.cache_bytes == MAX_BRANCHES * per_branch > 0
    assert counters["blockdance"]["reuse_steps"] == 0


def test_explain_and_counters() -> None:
    case = zoo.get("flux")
    compiled = compile_bd(case)
    zoo.run_loop(case, compiled, 10, cfg="batched")
    text = str(bd_compile.explain(compiled))
    assert "transformer_blocks.0" in text and "single_transformer_blocks.0" in text
    cached = bd_compile.stats(compiled).graphs[0].cached
    assert len(cached) == 2  # hidden + encoder hidden
    assert all(v.nbytes for v in cached)
    c = counters["blockdance"]
    assert c["cache_steps"] + c["reuse_steps"] == 10


def test_latte_blocks_interleave_in_execution_order() -> None:
    case = zoo.get("latte")
    compiled = compile_bd(case, interval=1)
    zoo.run_loop(case, compiled, 2, cfg="none")
    names = bd_compile.stats(compiled).graphs[0].blocks
    assert list(names[:4]) == [
        "transformer_blocks.0",
        "temporal_transformer_blocks.0",
        "transformer_blocks.1",
        "temporal_transformer_blocks.1",
    ]


class NoBlocks(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x))) * timestep[:, None]


def test_graph_without_blocks_falls_back_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    model = NoBlocks()
    x, t = torch.randn(2, 8), torch.tensor([1.0, 1.0])
    compiled = torch.compile(model, backend="blockdance", options=AOT)
    with caplog.at_level(logging.WARNING, logger="bd_compile"):
        torch.testing.assert_close(compiled(x, t), model(x, t))
    warnings = [r for r in caplog.records if "left uncached" in r.getMessage()]
    assert len(warnings) == 1
    assert counters["blockdance"]["fallbacks"] == 1


def test_strict_raises_instead_of_falling_back() -> None:
    compiled = torch.compile(NoBlocks(), backend="blockdance", options={**AOT, "strict": True})
    with pytest.raises(Exception, match="expected at least 2 transformer blocks"):
        compiled(torch.randn(2, 8), torch.tensor([1.0, 1.0]))


def test_too_deep_cache_block_falls_back() -> None:
    case = zoo.get("zoo_dit")
    compiled = compile_bd(case, cache_block=len(case.blocks()) - 1)
    inputs = case.example_inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            zoo.first_tensor(compiled(**inputs)), zoo.first_tensor(case.model(**inputs)), **TOL
        )
    assert counters["blockdance"]["fallbacks"] == 1


def test_graph_break_inside_the_block_loop_falls_back_and_stays_correct() -> None:
    """A break inside a block's forward, within the loop over the blocks: Dynamo compiles each
    block's frame on its own, so no graph holds a block list. Every graph falls back (README
    Limitations) and the result is still the eager one. A break *between* blocks is rewritten:
    tests/test_loop_state.py::test_graph_break_pieces_share_the_step_decision."""
    case = zoo.build("zoo_dit")
    stage = case.model.stages[2]
    original = stage.forward

    def broken(*args: object, **kwargs: object) -> torch.Tensor:
        torch._dynamo.graph_break()
        return original(*args, **kwargs)

    stage.forward = broken  # type: ignore[method-assign]
    eager = zoo.run_loop(case, case.model, 6, cfg="batched")
    compiled = torch.compile(case.model, backend="blockdance", options={**AOT, "interval": 1})
    got = zoo.run_loop(case, compiled, 6, cfg="batched")
    torch.testing.assert_close(got.latents, eager.latents, **TOL)
    c = counters["blockdance"]
    assert c["graphs_rewritten"] == 0 and c["fallbacks"] >= 2, dict(c)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"intervall": 2}, "unknown option"),
        ({"interval": 0}, "expected an int >= 1, got 0"),
        ({"interval": 2.0}, "expected an int >= 1"),
        ({"interval": True}, "expected an int >= 1"),
        ({"window": (0.9, 0.1)}, "0 <= start <= end <= 1"),
        ({"window": (0.1,)}, "0 <= start <= end <= 1"),
        ({"window": "early"}, "0 <= start <= end <= 1"),
        ({"cache_block": -1}, "cache_block"),
        ({"timesteps": []}, "non-empty sequence"),
        ({"schedule": torch.zeros(10)}, "torch.bool"),
        ({"schedule": torch.zeros(2, 2, dtype=torch.bool)}, "1-d bool tensor"),
        ({"schedule": [True], "timesteps": [999]}, "at most one"),
        ({"inner": "blockdance"}, "other than 'blockdance'"),
        ({"inner": "no_such_backend"}, "registered backend name"),
        ({"strict": "yes"}, "expected a bool"),
        ({"calibration": 3}, "path"),
        ({"inner_options": {"mode": "reduce-overhead"}, **AOT}, "unless inner='inductor'"),
        ({"inner_options": {"mode": "fastest"}}, "expected one of"),
        ({"inner_options": {"no_such_key": 1}}, "'mode' or inductor config keys"),
        ({"inner_options": ["mode"]}, "a dict of str keys"),
    ],
)
def test_invalid_options_raise_value_error(options: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        bd_compile.blockdance_backend(torch.fx.symbolic_trace(NoBlocks()), [], options=options)
    # Through torch.compile, Dynamo wraps it (BackendCompilerFailed) with the message intact.
    compiled = torch.compile(NoBlocks(), backend="blockdance", options=options)
    with pytest.raises(Exception, match=match) as info:
        compiled(torch.randn(2, 8), torch.tensor([1.0, 1.0]))
    assert isinstance(getattr(info.value, "inner_exception", None), ValueError)


def test_invalid_set_schedule_and_mode_raise_value_error() -> None:
    case = zoo.get("zoo_dit")
    with pytest.raises(ValueError, match="unknown option"):
        bd_compile.set_schedule(case.model, cache_block=3)
    with pytest.raises(ValueError, match="expected a model compiled with backend='blockdance'"):
        bd_compile.set_schedule(NoBlocks(), interval=3)
    with pytest.raises(ValueError, match="mode.*expected one of"):
        bd_compile.blockdance_backend(None, [], mode="fastest")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unless inner='inductor'"):
        bd_compile.blockdance_backend(None, [], options=AOT, mode="max-autotune")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown backend argument"):
        bd_compile.blockdance_backend(None, [], dynamic=True)  # type: ignore[arg-type]


def test_python_api_runs_the_passes_without_torch_compile() -> None:
    case = zoo.get("dit")
    graphs = []

    def capture(gm: torch.fx.GraphModule, example_inputs: list[object]) -> object:
        graphs.append((gm, example_inputs))
        return gm.forward

    inputs = case.example_inputs()
    torch.compile(case.model, backend=capture, fullgraph=True)(**inputs)
    gm, example_inputs = graphs[0]
    runtime = bd_compile.compile_graph(gm, example_inputs, bd_compile.Settings(inner="eager"))
    assert isinstance(runtime, bd_compile.runtime.GraphRuntime)
    assert runtime.layout.cache_block == cache_block(case)
    assert [n for n, _ in runtime.layout.blocks] == [
        f"transformer_blocks.{i}" for i in range(len(case.blocks()))
    ]


def _fresh_python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_backend_resolves_by_name_without_import_then_import_is_harmless() -> None:
    code = (
        "import sys, torch\n"
        "from torch._dynamo import lookup_backend\n"
        "fn = lookup_backend('blockdance')\n"
        "import bd_compile\n"
        "assert lookup_backend('blockdance') is fn\n"
        "print(fn.__module__)\n"
    )
    assert _fresh_python(code) == "bd_compile.backend"


def test_import_first_registers_the_backend() -> None:
    code = (
        "import bd_compile, torch\n"
        "from torch._dynamo import lookup_backend\n"
        "print(lookup_backend('blockdance') is bd_compile.blockdance_backend)\n"
    )
    assert _fresh_python(code) == "True"


@pytest.mark.slow
def test_inductor_end_to_end_matches_reference() -> None:
    case, steps = zoo.get("pixart"), 10
    compiled = torch.compile(case.model, backend="blockdance")
    got = zoo.run_loop(case, compiled, steps, cfg="batched")
    plan = progress_plan(model_timesteps(case, steps), (0.4, 0.95), 2)
    ref, _ = run_reference_loop(case, cache_block(case), plan, steps, "batched")
    torch.testing.assert_close(got.latents, ref.latents, rtol=1e-3, atol=1e-4)
    assert counters["blockdance"]["reuse_steps"] == sum(plan) > 0


@pytest.mark.parametrize(
    ("path", "want"),
    [
        (
            "L['self'].__dict__['_modules']['transformer_blocks'].3.attn1",
            "transformer_blocks.3.attn1",
        ),
        ("L['stages'][3].norm1", "stages.3.norm1"),  # blocks in a local list after a graph break
        (  # diffusers' context-parallel hooks keep the bound forward
            "L['self'].function_reference.forward.__self__.transformer_blocks.0",
            "transformer_blocks.0",
        ),
    ],
)
def test_module_paths_read_as_users_know_them(path: str, want: str) -> None:
    from passes.tag_blocks import normalize_module_path

    assert normalize_module_path(path) == want


def test_part_gather_takes_each_input_from_its_pool() -> None:
    from passes.build_variants import ARGS, CACHE, ROWS, Part

    args, cache, empty, rows = ("a0", "a1", "a2"), ("c0",), (), ("p0", "p1")
    plan = ((CACHE, 0), (ARGS, 2), (ROWS, 1), (ARGS, 0))
    part = Part(torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph()), plan, ())
    pools = (empty, empty, empty, rows)
    assert part.gather(args, cache, *pools) == ("c0", "a2", "p1", "a0")
    assert part.gather(("b0", "b1", "b2"), ("d0",), *pools) == ("d0", "b2", "p1", "b0")
    one = Part(part.gm, ((ARGS, 1),), ())
    assert one.gather(args) == ("a1",)
    assert Part(part.gm, (), ()).gather(args) == ()


def test_a_guard_filter_in_the_options_reaches_dynamo_not_the_backend() -> None:
    """README, Options: ``guard_filter_fn`` (e.g. torch's ``skip_guard_on_all_nn_modules_unsafe``)
    goes in the same options dict; torch takes it out before the backend reads its options (an
    unknown option would raise), Dynamo filters the guards with it, and the rewrite is the same."""
    case, steps = zoo.get("zoo_dit"), 12
    filtered: list[int] = []

    def recording(guards: list[Any]) -> list[bool]:
        filtered.append(len(guards))
        return torch.compiler.skip_guard_on_all_nn_modules_unsafe(guards)

    options = {**AOT, "window": (0.2, 0.95), "guard_filter_fn": recording}
    compiled = torch.compile(case.model, backend="blockdance", options=options)
    got = zoo.run_loop(case, compiled, steps, cfg="batched")
    plan = progress_plan(model_timesteps(case, steps), (0.2, 0.95), 2)
    assert len(filtered) == 1 and filtered[0] > 0
    assert counters["blockdance"]["graphs_rewritten"] == 1
    assert counters["blockdance"]["reuse_steps"] == sum(plan) > 0
    ref, _ = run_reference_loop(case, cache_block(case), plan, steps, "batched")
    torch.testing.assert_close(got.latents, ref.latents, **TOL)
