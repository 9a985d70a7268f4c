"""One loop state per compiled model: recompiles, rising timesteps, explicit generations,
interleaved requests and graph breaks (Note [Generations, steps and branches] in loop.py).

Every golden test compares against ``reference.py`` (forward replacement on the block modules,
independent of the FX passes) after asserting that the graph was rewritten and reused.
"""

from __future__ import annotations

import threading

import pytest
import torch
import zoo
from bd_testing import AOT, TOL, cache_block, model_timesteps
from reference import paper_plan, progress_plan, run_reference_loop
from torch._dynamo.utils import counters

import bd_compile


def assert_reused() -> None:
    """Rewritten and reused; graph-break models may also have uncached pieces."""
    c = counters["blockdance"]
    assert c["graphs_rewritten"] >= 1 and c["reuse_steps"] > 0, dict(c)


@pytest.mark.parametrize("cfg", ["batched", pytest.param("sequential", marks=pytest.mark.slow)])
def test_recompile_mid_generation_continues_the_generation(cfg: zoo.CfgMode) -> None:
    """Without no_grad the latent starts requiring grad after step 0: Dynamo recompiles. The
    second graph must continue the same generation, schedule and per-branch caches."""
    case, steps = zoo.get("pixart"), 12
    plan = progress_plan(model_timesteps(case, steps))
    ref, _ = run_reference_loop(case, cache_block(case), plan, steps, cfg)
    compiled = torch.compile(case.model, backend="blockdance", options=AOT)
    with_grad = zoo.run_loop(case, compiled, steps, cfg=cfg, grad=True)
    assert counters["blockdance"]["graphs_rewritten"] >= 2  # it did recompile
    pattern = bd_compile.stats(compiled).last.pattern
    torch._dynamo.reset()
    compiled = torch.compile(case.model, backend="blockdance", options=AOT)
    no_grad = zoo.run_loop(case, compiled, steps, cfg=cfg)
    assert_reused()
    assert bd_compile.stats(compiled).last.pattern == pattern
    assert pattern == "".join("R" if r else "C" for r in plan)
    torch.testing.assert_close(with_grad.latents, no_grad.latents, rtol=0, atol=1e-6)
    torch.testing.assert_close(no_grad.latents, ref.latents, **TOL)


def test_rising_timesteps_reuse_and_match_the_reference() -> None:
    """Lumina2 feeds 1 - sigma, rising from 0 to 1; its forward also breaks the graph."""
    case, steps = zoo.get("lumina2"), 10
    ts = model_timesteps(case, steps)
    assert ts[1] > ts[0]
    plan = progress_plan(ts, (0.2, 0.95), 2)
    assert abs(sum(plan) - sum(paper_plan(steps, (0.2, 0.95), 2))) <= 1
    compiled = torch.compile(
        case.model, backend="blockdance", options={**AOT, "window": (0.2, 0.95)}
    )
    got = zoo.run_loop(case, compiled, steps, cfg="sequential")
    ref, _ = run_reference_loop(case, cache_block(case), plan, steps, "sequential")
    assert_reused()
    assert bd_compile.stats(compiled).last.pattern == "".join("R" if r else "C" for r in plan)
    torch.testing.assert_close(got.latents, ref.latents, **TOL)
    # A second generation on the same compiled model starts again at 0: detected, not merged.
    again = zoo.run_loop(case, compiled, steps, cfg="sequential")
    torch.testing.assert_close(again.latents, got.latents, rtol=0, atol=0)
    assert [g.number for g in bd_compile.stats(compiled).generations][-2:] == [1, 2]


def test_graph_break_pieces_share_the_step_decision() -> None:
    """Blocks split across two graphs: each graph caches its own blocks, both follow the step
    decision of the forward (also across sequential CFG branches), and the result equals the
    reference that replays exactly those blocks."""
    case = zoo.build("zoo_dit")
    case.model.break_after = 2  # type: ignore[union-attr]
    steps, window = 10, (0.2, 0.95)
    plan = progress_plan(model_timesteps(case, steps), window)
    compiled = torch.compile(case.model, backend="blockdance", options={**AOT, "window": window})
    got = zoo.run_loop(case, compiled, steps, cfg="sequential")
    st = bd_compile.stats(compiled)
    assert counters["blockdance"]["graphs_rewritten"] == 2, dict(counters["blockdance"])
    assert counters["blockdance"]["fallbacks"] == 0
    assert st.last.pattern == "".join("R" if r else "C" for r in plan) and sum(plan) > 0
    first, second = st.graphs
    assert (first.blocks, second.blocks) == (
        ("stages.0", "stages.1", "stages.2"),
        ("stages.3", "stages.4", "stages.5"),
    )
    assert (first.timestep_input, second.timestep_input) == ("t", None)
    skip = [*range(first.cache_block + 1), *range(3, 3 + second.cache_block + 1)]
    ref, _ = run_reference_loop(case, 0, plan, steps, "sequential", skip=skip)
    torch.testing.assert_close(got.latents, ref.latents, **TOL)


def test_interleaved_requests_with_keys_equal_separate_runs() -> None:
    """Two requests served by two threads, stepping strictly in turn on one compiled model:
    each ``generation`` key has its own loop state and caches, so each result equals its run
    alone; without keys they would share the automatic state."""
    case, steps = zoo.get("pixart"), 10
    compiled = torch.compile(case.model, backend="blockdance", options=AOT)
    alone = [zoo.run_loop(case, compiled, steps, cfg="batched", seed=s).latents for s in (0, 1)]
    counters.clear()
    turn = threading.Condition()
    state = {"next": 0}
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def request(seed: int) -> None:
        def wait_for_turn(info: zoo.CallInfo) -> None:
            with turn:
                assert turn.wait_for(lambda: state["next"] % 2 == seed, timeout=60)

        def step_done() -> None:
            with turn:
                state["next"] += 1
                turn.notify_all()

        try:
            torch.set_num_threads(1)
            with bd_compile.generation(compiled, key=f"request {seed}"):
                results[seed] = zoo.run_loop(
                    case,
                    compiled,
                    steps,
                    cfg="batched",
                    seed=seed,
                    before_call=wait_for_turn,
                    after_call=step_done,
                ).latents
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=request, args=(s,)) for s in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert state["next"] == 2 * steps  # the calls did alternate
    assert counters["blockdance"]["reuse_steps"] > 0
    torch.testing.assert_close(results[0], alone[0], rtol=0, atol=0)
    torch.testing.assert_close(results[1], alone[1], rtol=0, atol=0)
    keys = {g.key for g in bd_compile.stats(compiled).generations}
    assert {"request 0", "request 1"} <= keys


def test_generation_timesteps_apply_the_exact_rule_to_that_generation_only() -> None:
    case, steps, window = zoo.get("sd3"), 12, (0.2, 0.95)
    ts = model_timesteps(case, steps)
    compiled = torch.compile(case.model, backend="blockdance", options={**AOT, "window": window})
    plan = paper_plan(steps, window, 2)
    with bd_compile.generation(compiled, timesteps=ts):
        got = zoo.run_loop(case, compiled, steps, cfg="batched")
    assert bd_compile.stats(compiled).last.pattern == "".join("R" if r else "C" for r in plan)
    ref, _ = run_reference_loop(case, cache_block(case), plan, steps, "batched")
    torch.testing.assert_close(got.latents, ref.latents, **TOL)
    zoo.run_loop(case, compiled, steps, cfg="batched")  # after the block: automatic again
    auto = progress_plan(ts, window)
    assert bd_compile.stats(compiled).last.pattern == "".join("R" if r else "C" for r in auto)
    assert auto != plan  # shift 3: the progress rule differs, so the block did matter


def test_nested_generations_inner_wins_and_outer_resumes() -> None:
    case = zoo.get("zoo_dit")
    compiled = torch.compile(
        case.model,
        backend="blockdance",
        options={**AOT, "schedule": torch.ones(1000, dtype=torch.bool)},
    )
    inputs = case.example_inputs()

    def call(t: int) -> None:
        compiled(**{**inputs, case.timestep_kwarg: torch.tensor([t])})

    with torch.no_grad(), bd_compile.generation(compiled, key="outer"):
        call(900)
        with bd_compile.generation(compiled, key="inner"):
            call(900)  # the inner generation's first call computes
            call(800)  # its next step reuses its own cache
        call(800)  # the outer resumes: a new step, its own cache from the first call is there
    by_key = {g.key: g for g in bd_compile.stats(compiled).generations}
    assert (by_key["inner"].calls, by_key["inner"].reused_calls) == (2, 1)
    assert (by_key["outer"].calls, by_key["outer"].reused_calls) == (2, 1)


def test_leaving_a_generation_frees_its_caches() -> None:
    case = zoo.get("zoo_dit")
    compiled = torch.compile(case.model, backend="blockdance", options=AOT)
    with torch.no_grad(), bd_compile.generation(compiled, key=7):
        compiled(**case.example_inputs())
        assert bd_compile.stats(compiled).cache_bytes > 0
    assert bd_compile.stats(compiled).cache_bytes == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"key": ["not", "hashable"]}, "expected a hashable key, got list"),
        ({"timesteps": [[1.0, 2.0]]}, "1-d sequence of numbers"),
        ({"timesteps": torch.ones(2, 2)}, "1-d sequence of numbers"),
        ({"timesteps": []}, "non-empty"),
        ({"timesteps": "999"}, "1-d sequence of numbers"),
    ],
)
def test_generation_rejects_bad_input(kwargs: dict[str, object], match: str) -> None:
    case = zoo.get("zoo_dit")
    compiled = torch.compile(case.model, backend="blockdance", options=AOT)
    with torch.no_grad():
        compiled(**case.example_inputs())
    with pytest.raises(ValueError, match=match):
        bd_compile.generation(compiled, **kwargs)  # type: ignore[arg-type]


def test_generation_on_a_model_never_compiled_with_blockdance_raises() -> None:
    with pytest.raises(ValueError, match="expected a model compiled with backend='blockdance'"):
        bd_compile.generation(torch.nn.Linear(2, 2))


def test_explain_uses_the_names_users_know() -> None:
    case = zoo.get("pixart")
    compiled = torch.compile(case.model, backend="blockdance", options=AOT)
    zoo.run_loop(case, compiled, 4, cfg="batched")
    text = str(bd_compile.explain(compiled))
    k = cache_block(case)
    assert "timestep input: timestep;" in text
    assert f"cached value transformer_blocks.{k} output:" in text
    assert "l_timestep_" not in text and "hidden_states_" not in text


def _fail_on_read(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_read(arg: object) -> float:
        raise AssertionError("the timestep tensor was read on the counted-steps path")

    monkeypatch.setattr(bd_compile.runtime, "read_timestep", no_read)


@pytest.mark.parametrize(
    ("name", "cfg", "branches"), [("pixart", "sequential", 2), ("lumina2", "batched", 1)]
)
def test_counted_steps_never_read_the_timestep(
    name: str, cfg: zoo.CfgMode, branches: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inside ``generation(timesteps=...)`` the step comes from a host counter: after the one
    generation that checks what was said (Note [Counted steps check themselves]), any read of
    the timestep tensor (a device-to-host sync on GPU) fails this test."""
    case, steps, window = zoo.get(name), 10, (0.2, 0.95)
    ts = model_timesteps(case, steps)
    plan = paper_plan(steps, window, 2)
    compiled = torch.compile(case.model, backend="blockdance", options={**AOT, "window": window})
    ref, _ = run_reference_loop(case, cache_block(case), plan, steps, cfg)
    for checked in (True, False):
        if not checked:
            _fail_on_read(monkeypatch)
        with bd_compile.generation(compiled, timesteps=ts, branches=branches):
            got = zoo.run_loop(case, compiled, steps, cfg=cfg)
        assert_reused()
        assert bd_compile.stats(compiled).last.pattern == "".join("R" if r else "C" for r in plan)
        torch.testing.assert_close(got.latents, ref.latents, **TOL)


@pytest.mark.parametrize(("cfg", "branches"), [("sequential", 2), ("batched", 1)])
def test_the_timesteps_option_counts_steps_generation_after_generation(
    cfg: zoo.CfgMode, branches: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the ``timesteps`` option (no ``generation`` block) steps are counted too: a
    generation is ``len(timesteps)`` steps of ``branches`` calls, and the next call starts the
    next generation, which must not read the previous one's cache (its first step computes)."""
    case, steps, window = zoo.get("pixart"), 8, (0.2, 0.95)
    ts = model_timesteps(case, steps)
    options = {**AOT, "window": window, "timesteps": ts, "branches": branches}
    compiled = torch.compile(case.model, backend="blockdance", options=options)
    reads: list[float] = []
    real = bd_compile.runtime.read_timestep
    monkeypatch.setattr(
        bd_compile.runtime, "read_timestep", lambda a: reads.append(real(a)) or real(a)
    )
    first = zoo.run_loop(case, compiled, steps, cfg=cfg)  # checked: reads every timestep
    assert len(reads) == steps * branches
    reads.clear()
    second = zoo.run_loop(case, compiled, steps, cfg=cfg, seed=1)
    assert reads == [ts[0]]  # only its first call: did the loop start again, as counted?
    _fail_on_read(monkeypatch)
    third = zoo.run_loop(case, compiled, steps, cfg=cfg, seed=2)
    assert_reused()
    plan = paper_plan(steps, window, 2)
    expected = "".join("R" if r else "C" for r in plan)
    gens = bd_compile.stats(compiled).generations
    assert [g.pattern for g in gens] == [expected] * 3
    for got, seed in ((first, 0), (second, 1), (third, 2)):
        ref, _ = run_reference_loop(case, cache_block(case), plan, steps, cfg, seed=seed)
        torch.testing.assert_close(got.latents, ref.latents, **TOL)


def test_a_generation_block_takes_the_timesteps_option(monkeypatch: pytest.MonkeyPatch) -> None:
    """``generation(model, key)`` without ``timesteps`` counts the option's list and branches."""
    case, steps, window = zoo.get("pixart"), 8, (0.2, 0.95)
    ts = model_timesteps(case, steps)
    options = {**AOT, "window": window, "timesteps": ts, "branches": 2}
    compiled = torch.compile(case.model, backend="blockdance", options=options)
    plan = paper_plan(steps, window, 2)
    ref, _ = run_reference_loop(case, cache_block(case), plan, steps, "sequential")
    for key in ("checked", "request"):
        if key == "request":
            _fail_on_read(monkeypatch)  # the option's list was checked in the first block
        with bd_compile.generation(compiled, key=key):
            got = zoo.run_loop(case, compiled, steps, cfg="sequential")
        assert bd_compile.stats(compiled).last.pattern == "".join("R" if r else "C" for r in plan)
        torch.testing.assert_close(got.latents, ref.latents, **TOL)


def test_branches_needs_timesteps() -> None:
    with pytest.raises(ValueError, match="'branches'.*unless 'timesteps'.*got 2"):
        bd_compile.Settings(branches=2)
    with pytest.raises(ValueError, match="'branches'.*int >= 1.*got 0"):
        bd_compile.Settings(timesteps=(999.0, 500.0), branches=0)
