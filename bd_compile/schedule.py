"""When to reuse the cache: the paper's BlockDance-N rule and its three spellings.

A schedule is asked once per denoising step (not per call: the branches of a sequentially
guided step share the decision) whether that step may reuse the cached region. The runtime
still computes when no valid cache exists (first call of a generation, new shapes, a branch
that has not written its cache yet), so a schedule never has to reason about validity.

- ``ProgressSchedule`` (default): needs no step count. It places a step on the trajectory by
  its timestep relative to the generation's first timestep (``progress``: ``p = (t0 - t) / t0``
  for falling time, ``(t - t0) / (end - t0)`` for rising time such as Lumina's ``1 - sigma``),
  and counts
  steps inside ``start <= p < end``; the first of every ``interval`` of them computes. For evenly
  spaced timesteps (DDIM, DPM-Solver++, Euler/PNDM on DDPM models) ``p`` equals ``i / S`` up to
  one step, so the number of reuse steps is within one of ``paper_rule``. For flow-matching
  schedulers the timestep is the noise level (sigma), so the window is measured in noise level:
  with SD3/Flux's shift > 1 the window starts later in step terms than ``start`` says (fewer
  reuse steps, never more); pass ``timesteps`` for the exact step rule.
- ``TimestepSchedule``: the paper's rule applied exactly to a given timestep list.
- ``MaskSchedule``: an explicit bool mask indexed by integer timestep.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Protocol

import torch

from bd_compile.settings import Settings

log = logging.getLogger(__name__)


def paper_rule(num_steps: int, window: tuple[float, float], interval: int) -> list[bool]:
    """BlockDance-N on a list of ``num_steps`` steps: ``True`` where the step reuses the cache.

    Steps ``i`` with ``start * S <= i < end * S`` form the reuse window; inside it the first
    step of every group of ``interval`` is a cache step and the other ``interval - 1`` reuse.
    """
    lo, hi = math.ceil(window[0] * num_steps - 1e-9), math.ceil(window[1] * num_steps - 1e-9)
    return [lo <= i < hi and (i - lo) % interval != 0 for i in range(num_steps)]


def progress(t0: float, t: float, direction: int) -> float:
    """Where timestep ``t`` sits on a trajectory that started at ``t0``, in [0, 1].

    ``direction`` is -1 for falling time (DDPM/DDIM timesteps, flow-matching sigma: ends at 0),
    +1 for rising time (Lumina's ``1 - sigma``: ends at 1, or at 1000 for timesteps above 1),
    0 while unknown (the first step of a generation: progress 0).
    """
    if direction < 0:
        return (t0 - t) / t0 if t0 > 0 else 0.0
    if direction > 0:
        end = 1.0 if max(t0, t) <= 1.0 else 1000.0
        return (t - t0) / (end - t0) if end > t0 else 0.0
    return 0.0


class Schedule(Protocol):
    def start(self) -> None:
        """A new generation begins."""

    def step(self, t: float, progress: float) -> bool:
        """Whether the denoising step at timestep ``t`` (``progress`` along the trajectory, see
        ``progress``) may reuse the cache."""

    def describe(self) -> str: ...


class ProgressSchedule:
    """The default: the paper's rule on trajectory progress, for any step count."""

    def __init__(self, window: tuple[float, float], interval: int) -> None:
        self.window, self.interval = window, interval
        self.start()

    def start(self) -> None:
        self._in_window = 0

    def step(self, t: float, progress: float) -> bool:
        start, end = self.window
        if not (start <= progress < end or progress == end == 1.0):  # end 1.0: the last step too
            return False
        self._in_window += 1
        return (self._in_window - 1) % self.interval != 0

    def describe(self) -> str:
        return (
            f"BlockDance-N, N={self.interval}, window {self.window[0]:.0%}-{self.window[1]:.0%}"
            " of the trajectory (progress from each generation's first timestep)"
        )


class TimestepSchedule:
    """The paper's rule applied exactly to the sampler's timestep list."""

    def __init__(self, timesteps: Sequence[float], window: tuple[float, float], interval: int):
        self.timesteps = torch.tensor(list(timesteps), dtype=torch.float64)
        self.reuse = torch.tensor(paper_rule(len(timesteps), window, interval), dtype=torch.bool)
        self.window, self.interval = window, interval
        self._lookup = dict(zip(self.timesteps.tolist(), self.reuse.tolist(), strict=True))
        self._warned = False

    def start(self) -> None:
        pass

    def step(self, t: float, progress: float = 0.0) -> bool:
        hit = self._lookup.get(t)
        if hit is None:
            near = int(torch.argmin((self.timesteps - t).abs()))
            if abs(float(self.timesteps[near]) - t) <= 1e-4 * max(1.0, abs(t)):
                return bool(self.reuse[near])
            if not self._warned:
                log.warning(
                    "blockdance: timestep %s is not in the 'timesteps' option; such steps compute",
                    t,
                )
                self._warned = True
            return False
        return hit

    def describe(self) -> str:
        n = int(self.reuse.sum())
        return (
            f"BlockDance-N, N={self.interval}, window {self.window[0]:.0%}-{self.window[1]:.0%} "
            f"on the given {len(self.timesteps)} timesteps: {n} reuse steps"
        )


class MaskSchedule:
    """An explicit mask: reuse at integer timestep ``t`` iff ``mask[t]``."""

    def __init__(self, mask: torch.Tensor) -> None:
        self.mask = mask.detach().to("cpu", torch.bool)
        self._flags = self.mask.tolist()
        self._warned = False

    def start(self) -> None:
        pass

    def step(self, t: float, progress: float = 0.0) -> bool:
        i = round(t)
        if abs(i - t) > 1e-6 or not 0 <= i < len(self._flags):
            if not self._warned:
                log.warning(
                    "blockdance: timestep %s is not an index into the 'schedule' mask of length "
                    "%d; such steps compute",
                    t,
                    len(self._flags),
                )
                self._warned = True
            return False
        return bool(self._flags[i])

    def describe(self) -> str:
        return f"explicit mask over {len(self._flags)} timesteps, {int(self.mask.sum())} reuse"


def make_schedule(
    *,
    interval: int,
    window: tuple[float, float],
    timesteps: Sequence[float] | None = None,
    schedule: torch.Tensor | None = None,
) -> Schedule:
    """The schedule the options describe: a mask, an exact timestep list, or the default."""
    if schedule is not None:
        return MaskSchedule(schedule)
    if timesteps is not None:
        return TimestepSchedule(timesteps, window, interval)
    return ProgressSchedule(window, interval)


def schedule_for(s: Settings) -> Schedule:
    """A fresh schedule for the schedule options of ``s``."""
    return make_schedule(
        interval=s.interval, window=s.window, timesteps=s.timesteps, schedule=s.schedule
    )
