"""Counted steps that check themselves (Note [Counted steps check themselves]), requests
resumed by key on a step-level scheduler, and what ``stats``/``explain`` say after a fallback."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
import zoo
from bd_testing import AOT, TOL, assert_rewritten_and_reused, cache_block, model_timesteps, pattern
from reference import paper_plan, progress_plan, run_reference_loop
from torch._dynamo.utils import counters

import bd_compile

WINDOW = (0.2, 0.95)


def _warnings(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and text in r.getMessage()
    ]


@pytest.mark.parametrize(
    ("said", "cfg", "seen"), [(1, "sequential", 2), (2, "batched", 1)], ids=["1-for-2", "2-for-1"]
)
def test_mis_said_branches_warn_once_and_follow_the_loop(
    said: int, cfg: zoo.CfgMode, seen: int, caplog: pytest.LogCaptureFixture
) -> None:
    """``branches`` that are not the loop's calls per step: without the check the generation
    ends halfway and the schedule shifts (1.78 max abs off on a tiny PixArt). With it: one
    warning naming the fix, and both generations follow the paper's rule on the real steps."""
    case, steps = zoo.get("pixart"), 8
    ts = model_timesteps(case, steps)
    options = {**AOT, "window": WINDOW, "timesteps": ts, "branches": said}
    compiled = torch.compile(case.model, backend="blockdance", options=options)
    plan = paper_plan(steps, WINDOW, 2)
    with caplog.at_level(logging.WARNING):
        got = [zoo.run_loop(case, compiled, steps, cfg=cfg, seed=s) for s in (0, 1)]
    assert len(_warnings(caplog, "blockdance")) == 1, caplog.text
    assert len(_warnings(caplog, f"pass branches={seen}")) == 1
    assert [g.pattern for g in bd_compile.stats(compiled).generations] == [pattern(plan)] * 2
    assert_rewritten_and_reused(2 * seen * sum(plan))
    for result, seed in zip(got, (0, 1), strict=True):
        ref, _ = run_reference_loop(case, cache_block(case), plan, steps, cfg, seed=seed)
        torch.testing.assert_close(result.latents, ref.latents, **TOL)


def test_a_list_of_another_step_count_warns_once_and_follows_the_timesteps(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The option's list is a 12-step list; the loop runs 8 steps: one warning, then the steps
    are placed by their timesteps under the default rule (as if no list had been given)."""
    case, steps = zoo.get("pixart"), 8
    options = {**AOT, "window": WINDOW, "timesteps": model_timesteps(case, 12)}
    compiled = torch.compile(case.model, backend="blockdance", options=options)
    plan = progress_plan(model_timesteps(case, steps), WINDOW)
    with caplog.at_level(logging.WARNING):
        got = [zoo.run_loop(case, compiled, steps, cfg="batched", seed=s) for s in (0, 1)]
    assert len(_warnings(caplog, "blockdance")) == 1, caplog.text
    assert "do not match the 'timesteps' given (12 steps" in _warnings(caplog, "blockdance")[0]
    assert [g.pattern for g in bd_compile.stats(compiled).generations] == [pattern(plan)] * 2
    assert_rewritten_and_reused(2 * sum(plan))
    for result, seed in zip(got, (0, 1), strict=True):
        ref, _ = run_reference_loop(case, cache_block(case), plan, steps, "batched", seed=seed)
        torch.testing.assert_close(result.latents, ref.latents, **TOL)


def test_a_loop_that_stops_early_is_seen_when_it_starts_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A flow-matching list whose first timestep equals the loop's (both start at sigma 1):
    the mismatch shows at step 1, and the loop's own steps decide from there."""
    case = zoo.get("sd3")
    long, short = model_timesteps(case, 12), model_timesteps(case, 8)
    assert long[0] == short[0] and long[1] != short[1]
    options = {**AOT, "window": WINDOW, "timesteps": long}
    compiled = torch.compile(case.model, backend="blockdance", options=options)
    with caplog.at_level(logging.WARNING):
        zoo.run_loop(case, compiled, 8, cfg="batched")
        zoo.run_loop(case, compiled, 8, cfg="batched", seed=1)
    (msg,) = _warnings(caplog, "blockdance")
    assert "step 1 was called with timestep" in msg
    plan = pattern(progress_plan(short, WINDOW))
    assert [g.pattern for g in bd_compile.stats(compiled).generations] == [plan] * 2


def test_mis_said_counting_raises_under_strict() -> None:
    case, steps = zoo.get("pixart"), 4
    ts = model_timesteps(case, steps)
    options = {**AOT, "timesteps": ts, "strict": True}
    compiled = torch.compile(case.model, backend="blockdance", options=options)
    with pytest.raises(ValueError, match="pass branches=2"):
        zoo.run_loop(case, compiled, steps, cfg="sequential")
    bd_compile.set_schedule(compiled, timesteps=model_timesteps(case, 6))
    with pytest.raises(ValueError, match="do not match the 'timesteps' given"):
        zoo.run_loop(case, compiled, steps, cfg="batched")


def test_generation_blocks_check_their_words_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first block with ``(timesteps, branches)`` reads and corrects; later blocks with the
    same words neither read the timestep nor warn again, and stay right."""
    case, steps = zoo.get("pixart"), 8
    ts = model_timesteps(case, steps)
    compiled = torch.compile(case.model, backend="blockdance", options={**AOT, "window": WINDOW})
    plan = paper_plan(steps, WINDOW, 2)
    ref, _ = run_reference_loop(case, cache_block(case), plan, steps, "sequential")
    with caplog.at_level(logging.WARNING):
        for i in range(3):
            if i == 1:

                def no_read(arg: object) -> float:
                    raise AssertionError("a checked (timesteps, branches) read the timestep")

                monkeypatch.setattr(bd_compile.runtime, "read_timestep", no_read)
            with bd_compile.generation(compiled, key=i, timesteps=ts, branches=1):
                got = zoo.run_loop(case, compiled, steps, cfg="sequential")
            assert bd_compile.stats(compiled).last.pattern == pattern(plan)
            torch.testing.assert_close(got.latents, ref.latents, **TOL)
    assert len(_warnings(caplog, "pass branches=2")) == 1


def test_set_schedule_rechecks_only_when_the_counting_is_said_anew(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After the checked first generation, ``set_schedule(interval=...)`` keeps counting
    without a host read (benchmarks/speed.py's sync check relies on it); ``set_schedule``
    with ``timesteps`` checks the next generation again."""
    case, steps = zoo.get("pixart"), 6
    ts = model_timesteps(case, steps)
    options = {**AOT, "window": WINDOW, "timesteps": ts}
    compiled = torch.compile(case.model, backend="blockdance", options=options)
    zoo.run_loop(case, compiled, steps, cfg="batched")  # the checked generation
    reads: list[object] = []
    real = bd_compile.runtime.read_timestep

    def counting_read(arg: Any) -> float:
        reads.append(arg)
        return real(arg)

    monkeypatch.setattr(bd_compile.runtime, "read_timestep", counting_read)
    bd_compile.set_schedule(compiled, interval=3)
    zoo.run_loop(case, compiled, steps, cfg="batched")
    assert reads == []
    assert bd_compile.stats(compiled).last.pattern == pattern(paper_plan(steps, WINDOW, 3))
    bd_compile.set_schedule(compiled, timesteps=ts)
    zoo.run_loop(case, compiled, steps, cfg="batched")
    assert len(reads) == steps


# -- resume by key: a step-level scheduler in one thread ------------------------------------------


@pytest.mark.parametrize("counted", [False, True], ids=["automatic", "counted"])
def test_requests_stepped_in_turn_each_equal_their_own_run(counted: bool) -> None:
    """Serving code that steps requests a and b in turn, one call each per block: each request
    keeps its own generation across blocks (reuse happens), and equals its own run."""
    case, steps = zoo.get("pixart"), 10
    ts = model_timesteps(case, steps)
    compiled = torch.compile(case.model, backend="blockdance", options={**AOT, "window": WINDOW})
    plan = paper_plan(steps, WINDOW, 2) if counted else progress_plan(ts, WINDOW)
    words: dict[str, Any] = {"timesteps": ts} if counted else {}
    seeds = {"a": 0, "b": 1}
    loops = {
        k: zoo.stepwise(case, compiled, steps, cfg="batched", seed=s) for k, s in seeds.items()
    }
    for _ in range(steps):
        for key, loop in loops.items():
            with bd_compile.generation(compiled, key=key, resume=True, **words), torch.no_grad():
                assert next(loop) is None
    results = {k: next(loop) for k, loop in loops.items()}
    assert_rewritten_and_reused(2 * sum(plan))
    running = {g.key: g.pattern for g in bd_compile.stats(compiled).generations}
    assert running == {"a": pattern(plan), "b": pattern(plan)}
    for key, result in results.items():
        assert result is not None
        ref, _ = run_reference_loop(
            case, cache_block(case), plan, steps, "batched", seed=seeds[key]
        )
        torch.testing.assert_close(result.latents, ref.latents, **TOL)
    held = bd_compile.stats(compiled).cache_bytes
    bd_compile.reset(compiled, key="a")  # frees a's caches, keeps b's
    assert 0 < bd_compile.stats(compiled).cache_bytes < held
    assert [g.key for g in bd_compile.stats(compiled).generations] == ["a", "b"]


def test_a_resumed_request_ends_when_its_timestep_moves_back() -> None:
    case, steps = zoo.get("zoo_dit"), 6
    compiled = torch.compile(case.model, backend="blockdance", options={**AOT, "window": WINDOW})
    for seed in (0, 1):
        loop = zoo.stepwise(case, compiled, steps, cfg="batched", seed=seed)
        for _ in range(steps + 1):
            with bd_compile.generation(compiled, key="r", resume=True), torch.no_grad():
                next(loop)
    gens = bd_compile.stats(compiled).generations
    assert [(g.key, g.number, g.steps) for g in gens] == [("r", 1, steps), ("r", 2, steps)]


def test_resume_must_be_a_bool() -> None:
    case = zoo.get("zoo_dit")
    compiled = torch.compile(case.model, backend="blockdance", options=AOT)
    with pytest.raises(ValueError, match="expected resume as a bool, got 'yes'"):
        bd_compile.generation(compiled, key="r", resume="yes")  # type: ignore[arg-type]


# -- after a fallback ----------------------------------------------------------------------------


def test_stats_and_explain_after_a_fallback_report_no_reuse() -> None:
    """A graph that fell back (here: cache_block too deep) but still reads the timestep for the
    model's loop state must not show steps or reuse that never happened."""
    case = zoo.get("zoo_dit")
    options = {**AOT, "cache_block": len(case.blocks()) - 1}
    compiled = torch.compile(case.model, backend="blockdance", options=options)
    zoo.run_loop(case, compiled, 6, cfg="batched")
    c = counters["blockdance"]
    assert c["fallbacks"] == 1 and c["graphs_rewritten"] == 0 and c["reuse_steps"] == 0
    st = bd_compile.stats(compiled)
    assert st.graphs == () and st.generations == ()
    text = str(bd_compile.explain(compiled))
    assert "no graph of this model was rewritten" in text
    assert "reuse:" not in text and "last generation" not in text
