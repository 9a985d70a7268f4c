"""The default schedule needs no step count and stays within one reuse step of the paper's rule."""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    PNDMScheduler,
)
from reference import paper_plan

from bd_compile.loop import LoopState
from bd_compile.schedule import MaskSchedule, TimestepSchedule, paper_rule
from bd_compile.settings import Settings

SCHEDULERS = {
    "ddim-leading": lambda: DDIMScheduler(num_train_timesteps=1000),
    "ddim-trailing": lambda: DDIMScheduler(num_train_timesteps=1000, timestep_spacing="trailing"),
    "dpm++": lambda: DPMSolverMultistepScheduler(algorithm_type="dpmsolver++"),
    "euler": lambda: EulerDiscreteScheduler(num_train_timesteps=1000),
    "pndm": lambda: PNDMScheduler(num_train_timesteps=1000, skip_prk_steps=True),
}


def decisions(window: tuple[float, float], interval: int, timesteps: list[float]) -> list[bool]:
    """What the runtime's loop state decides, step by step, for one generation."""
    state = LoopState(Settings(window=window, interval=interval))
    ks = state.key_state(None)
    out = []
    for t in timesteps:
        gen, _ = state.advance(ks, "graph", t)
        assert gen.number == 1, "a step was taken for a new generation"
        out.append(gen.step_may_reuse)
    return out


@pytest.mark.parametrize("direction", ["falling", "rising"])
@pytest.mark.parametrize("name", sorted(SCHEDULERS))
@pytest.mark.parametrize("steps", [10, 20, 25, 30, 50, 100])
@pytest.mark.parametrize("interval", [2, 3, 4])
def test_default_reuse_count_within_one_of_paper_rule(
    name: str, steps: int, interval: int, direction: str
) -> None:
    sched = SCHEDULERS[name]()
    sched.set_timesteps(steps)
    ts = [float(t) for t in sched.timesteps]
    if direction == "rising":  # Lumina: 1 - t / 1000, from noise (0) to image (1)
        ts = [1 - t / 1000 for t in ts]
    got = decisions((0.4, 0.95), interval, ts)
    want = paper_plan(len(ts), (0.4, 0.95), interval)
    assert abs(sum(got) - sum(want)) <= 1, (got, want)


def test_a_timestep_against_the_learned_direction_starts_a_new_generation() -> None:
    state = LoopState(Settings())
    ks = state.key_state(None)
    numbers = [state.advance(ks, "g", t)[0].number for t in (0.0, 0.2, 0.4, 0.0, 0.5, 0.5, 0.1)]
    assert numbers == [1, 1, 1, 2, 2, 2, 3]  # rising, then 0.1 < 0.5: a third generation
    state = LoopState(Settings())
    ks = state.key_state(None)
    numbers = [state.advance(ks, "g", t)[0].number for t in (999.0, 900.0, 900.0, 800.0, 999.0)]
    assert numbers == [1, 1, 1, 1, 2]  # falling; an equal timestep is another branch


def test_paper_rule_matches_the_papers_pixart_count() -> None:
    assert sum(paper_rule(30, (0.4, 0.95), 2)) == 8  # PAPER.md: 8 reuse steps
    for s in range(1, 80):
        for n in (1, 2, 3, 4):
            assert paper_rule(s, (0.4, 0.95), n) == paper_plan(s, (0.4, 0.95), n)


def test_interval_one_never_reuses() -> None:
    ts = [float(t) for t in torch.linspace(999, 0, 50)]
    assert not any(decisions((0.0, 1.0), 1, ts))


def test_flow_matching_default_is_conservative() -> None:
    """With shift 3 the window is in noise level, so it reuses less than the step rule."""
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(28)
    ts = [float(t) for t in sched.timesteps]
    got = decisions((0.4, 0.95), 2, ts)
    assert 0 < sum(got) <= sum(paper_plan(28, (0.4, 0.95), 2))


def test_timestep_schedule_applies_rule_exactly_and_computes_unknown_timesteps() -> None:
    ts = [999.0 - 33.3 * i for i in range(30)]
    s = TimestepSchedule(ts, (0.4, 0.95), 2)
    assert [s.step(t) for t in ts] == paper_plan(30, (0.4, 0.95), 2)
    assert s.step(12.345) is False


def test_mask_schedule_indexes_integer_timesteps() -> None:
    mask = torch.zeros(1000, dtype=torch.bool)
    mask[500] = True
    s = MaskSchedule(mask)
    assert s.step(500.0) and not s.step(499.0) and not s.step(0.5) and not s.step(5000.0)


def test_window_ending_at_one_includes_the_last_step() -> None:
    ts = [980.0 - 20 * i for i in range(50)]  # DDIM leading: the last timestep is 0
    got = decisions((0.0, 1.0), 2, ts)
    assert got[-1] and sum(got) == 25  # DeepCache-style: every other step over the whole run
