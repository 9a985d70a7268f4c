"""The object Dynamo calls: picks the cache or compute path per call and owns the cache.

Note [Generations, steps and branches]
The runtime reads the timestep of every call on the host (a few bytes; free on CPU, one small
device-to-host copy on GPU) and infers where the call sits in a sampling loop:

- a timestep larger than the previous one (or the first call) starts a new **generation**;
- a smaller one starts a new **step**;
- an equal one is another **branch** of the same step (sequential classifier-free guidance
  calls the model for cond, then uncond, at one timestep).

Every branch has its own cache slot, stamped with the generation and the input shapes that
wrote it. A call reuses only if the schedule allows its step *and* its slot was written in this
generation with the same shapes; otherwise it computes and rewrites the slot. So a cache is
never read before it was written in the same generation, branches never read each other's
cache, and a new batch size or resolution never reads a cache of another shape.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch._dynamo.utils import counters

from bd_compile.schedule import schedule_for
from bd_compile.settings import Settings
from passes.split_cached_region import InputSpec, SplitGraphs

log = logging.getLogger(__name__)

CompiledFn = Callable[..., Any]

# Calls at one timestep beyond this many are not cached: a loop that calls the model many times
# at the same timestep (not a sampler) must not grow the cache without bound.
MAX_BRANCHES = 4


@dataclass
class _Slot:
    values: tuple[torch.Tensor, ...]
    generation: int
    signature: tuple[Any, ...]


@dataclass
class CallRecord:
    timestep: float
    step: int
    branch: int
    reused: bool


@dataclass
class CachedValue:
    name: str
    shape: tuple[Any, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int | None:
        try:
            n = 1
            for s in self.shape:
                n *= int(s)
            return n * self.dtype.itemsize
        except (TypeError, ValueError):  # symbolic dims
            return None


@dataclass
class Layout:
    """What was found and what is cached; shown by ``bd_compile.explain``."""

    blocks: list[tuple[str, str]]  # (module path, class)
    cache_block: int
    cached: list[CachedValue]
    timestep_input: str
    inner: str
    history: list[CallRecord] = field(default_factory=list)


class _Gather:
    """Builds a split graph's argument list from the call's args, prefix outputs and cache."""

    _POOL = {"arg": 0, "prefix": 1, "cache": 2}

    def __init__(self, spec: InputSpec) -> None:
        self.spec = tuple((self._POOL[src], i) for src, i in spec.sources)

    def __call__(self, *pools: Sequence[Any]) -> list[Any]:
        return [pools[p][i] for p, i in self.spec]


def _as_tuple(out: Any) -> tuple[Any, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


_RUNTIMES: list[weakref.ReferenceType[BlockDanceRuntime]] = []


def live_runtimes() -> list[BlockDanceRuntime]:
    """Every runtime still referenced by a compiled model, oldest first."""
    alive = [r() for r in _RUNTIMES]
    _RUNTIMES[:] = [weakref.ref(r) for r in alive if r is not None]
    return [r for r in alive if r is not None]


class BlockDanceRuntime:
    """Runs one rewritten graph: prefix every call, region on cache steps, tail every call."""

    def __init__(
        self,
        split: SplitGraphs,
        compiled: tuple[CompiledFn | None, CompiledFn, CompiledFn],
        settings: Settings,
        timestep_index: int,
        signature_indices: Sequence[int],
        param_ids: frozenset[int],
        layout: Layout,
    ) -> None:
        self.prefix_fn, region_fn, self.tail_fn = compiled
        assert region_fn is not None, "the region graph always has blocks in it"
        self.region_fn: CompiledFn = region_fn
        self.gather_prefix = _Gather(split.prefix_inputs)
        self.gather_region = _Gather(split.region_inputs)
        self.gather_tail = _Gather(split.tail_inputs)
        self.settings = settings  # the schedule is built from it; set_settings replaces it
        self.schedule = schedule_for(settings)
        self.timestep_index = timestep_index
        self.signature_indices = tuple(signature_indices)
        self.param_ids = param_ids
        self.layout = layout
        self.reset()
        _RUNTIMES.append(weakref.ref(self))

    def reset(self) -> None:
        """Forget all caches and the position in the sampling loop."""
        self.slots: dict[int, _Slot] = {}
        self.generation = 0
        self.step = -1
        self.branch = 0
        self.last_t: float | None = None
        self.step_may_reuse = False
        self.layout.history = []
        self.schedule.start()

    def set_settings(self, settings: Settings) -> None:
        """Rebuild the schedule from ``settings`` and start over (no recompile)."""
        self.settings, self.schedule = settings, schedule_for(settings)
        self.reset()

    def _signature(self, args: Sequence[Any]) -> tuple[Any, ...]:
        return tuple(
            (a.shape, a.dtype, a.device) if isinstance(a, torch.Tensor) else a
            for a in (args[i] for i in self.signature_indices)
        )

    def _advance(self, t: float) -> None:
        if self.last_t is None or t > self.last_t:
            self.generation += 1
            self.slots.clear()  # free the previous generation's caches
            self.step, self.branch = 0, 0
            self.layout.history = []
            self.schedule.start()
            self.step_may_reuse = self.schedule.step(t)
        elif t < self.last_t:
            self.step, self.branch = self.step + 1, 0
            self.step_may_reuse = self.schedule.step(t)
        else:
            self.branch += 1
        self.last_t = t

    def __call__(self, *args: Any) -> Any:
        t_arg = args[self.timestep_index]
        t = float(t_arg.reshape(-1)[0]) if isinstance(t_arg, torch.Tensor) else float(t_arg)
        self._advance(t)
        signature = self._signature(args)
        slot = self.slots.get(self.branch)
        reuse = (
            self.step_may_reuse
            and slot is not None
            and slot.generation == self.generation
            and slot.signature == signature
        )
        prefix = (
            _as_tuple(self.prefix_fn(*self.gather_prefix(args, (), ()))) if self.prefix_fn else ()
        )
        if reuse:
            assert slot is not None
            cache = slot.values
            counters["blockdance"]["reuse_steps"] += 1
        else:
            # Free the old cache (our reference too) before the new one is made: at the peak
            # there is one cache per branch, not two.
            slot = None
            self.slots.pop(self.branch, None)
            cache = _as_tuple(self.region_fn(*self.gather_region(args, prefix, ())))
            if self.branch < MAX_BRANCHES:
                self.slots[self.branch] = _Slot(cache, self.generation, signature)
            counters["blockdance"]["cache_steps"] += 1
        self.layout.history.append(CallRecord(t, self.step, self.branch, reuse))
        return self.tail_fn(*self.gather_tail(args, prefix, cache))

    def cache_bytes(self) -> int:
        """Bytes held by the caches right now (all branches)."""
        return sum(v.numel() * v.element_size() for s in self.slots.values() for v in s.values)
