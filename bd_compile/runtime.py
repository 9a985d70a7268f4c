"""The object Dynamo calls for one rewritten graph: prefix every call, region on cache steps,
tail every call. Where the call sits in the sampling loop, and the caches, belong to the
model's ``LoopState`` (Note [Generations, steps and branches] in ``loop.py``).

Note [Forecast reuse]
With ``forecast = k`` (1 or 2) a branch keeps the cached values of its last ``k + 1`` cache
steps with their progress ``x_i`` along the trajectory. A reuse step at progress ``x`` feeds the
tail the polynomial through those points evaluated at ``x`` (TaylorSeer-style finite
differences, written as Lagrange weights ``w_i = prod_{j != i} (x - x_j) / (x_i - x_j)``: order
1 is linear from the last two cache steps, order 2 quadratic from three). The weights are
computed on the host from scalars; the weighted sum runs as one small compiled graph per inner
compiler and order (``compiled_combine``), with the weights as a tensor input, so changing
``forecast`` or the step never recompiles. Until ``k + 1`` cache steps exist, a reuse step
copies. Numbers cached next to the tensors (sizes) are taken from the last cache step.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch._dynamo.utils import counters

from bd_compile.keys import Generation, Signature, Slot
from bd_compile.loop import LoopState

log = logging.getLogger(__name__)

CompiledFn = Callable[..., Any]


@dataclass(frozen=True)
class CachedValue:
    """One value a cache step stores: where it comes from (in the model's terms), its shape."""

    name: str  #: e.g. "transformer_blocks.8 output"
    shape: tuple[int | str, ...]  #: symbolic dims as their expression ("s0")
    dtype: torch.dtype | None  #: None for a number (a size computed inside the blocks)

    @property
    def nbytes(self) -> int | None:
        if self.dtype is None:
            return 0
        if not all(isinstance(s, int) for s in self.shape):
            return None  # symbolic: known per call only
        n = 1
        for s in self.shape:
            n *= int(s)
        return n * self.dtype.itemsize


@dataclass(frozen=True)
class Layout:
    """What was found in one graph and what is cached; shown by ``bd_compile.explain``."""

    blocks: tuple[tuple[str, str], ...]  #: (module path, class), execution order
    cache_block: int
    cached: tuple[CachedValue, ...]
    timestep_input: str | None  #: the forward's argument name; None: follows another graph
    inner: str

    @property
    def key(self) -> tuple[Any, ...]:
        """Graphs with equal keys may read each other's caches (recompiles of one graph)."""
        return (
            tuple(b for b, _ in self.blocks[: self.cache_block + 1]),
            tuple((v.name, v.dtype, len(v.shape)) for v in self.cached),
        )


def _cloned(values: tuple[Any, ...]) -> tuple[Any, ...]:
    """Tensors copied (a CUDA-graph replay overwrites its outputs), other values as they are."""
    return tuple(v.clone() if isinstance(v, torch.Tensor) else v for v in values)


def _as_tuple(out: Any) -> tuple[Any, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def lagrange_weights(xs: Sequence[float], x: float) -> list[float]:
    """Weights ``w`` with ``sum(w_i * f(x_i)) = p(x)`` for the polynomial ``p`` through the
    points ``(x_i, f(x_i))``: linear extrapolation from two points, quadratic from three."""
    return [
        math.prod((x - xj) / (xi - xj) for j, xj in enumerate(xs) if j != i)
        for i, xi in enumerate(xs)
    ]


def _linear(weights: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a * weights[0] + b * weights[1]


def _quadratic(
    weights: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor
) -> torch.Tensor:
    return a * weights[0] + b * weights[1] + c * weights[2]


@functools.cache
def compiled_combine(inner: str, order: int) -> Callable[..., torch.Tensor]:
    """The weighted sum of ``order + 1`` cached values, compiled once per inner compiler and
    order (one function per order: switching ``forecast`` never recompiles either)."""
    return torch.compile(_linear if order == 1 else _quadratic, backend=inner, fullgraph=True)


def read_timestep(arg: Any) -> float:
    """The first element of the timestep argument, on the host."""
    return float(arg.reshape(-1)[0]) if isinstance(arg, torch.Tensor) else float(arg)


class GraphRuntime:
    """Runs one rewritten graph; the cache/compute decision comes from the model's loop state."""

    def __init__(
        self,
        parts: tuple[Any, Any, Any],
        compiled: tuple[CompiledFn | None, CompiledFn, CompiledFn],
        state: LoopState,
        layout: Layout,
        timestep_index: int | None,
        signature_indices: Sequence[int],
        param_ids: frozenset[int],
        own_cache: bool = False,
    ) -> None:
        self.prefix, self.region, self.tail = parts
        self.prefix_fn, self.region_fn, self.tail_fn = compiled
        self.state = state
        self.layout = layout
        self.layout_key = layout.key
        self.timestep_index = timestep_index
        self.signature_indices = tuple(signature_indices)
        self.param_ids = param_ids
        #: Note [Caches under CUDA graphs]: a CUDA-graph replay overwrites the outputs of the
        #: previous replay, so with cudagraphs the cache lives in buffers this runtime owns,
        #: copied into in place on every cache step (one extra cache of memory per branch).
        self.own_cache = own_cache
        state.add(self)

    def _own(
        self, values: tuple[Any, ...], old: Slot | None, signature: Signature
    ) -> tuple[Any, ...]:
        if old is not None and old.signature == signature:
            for buf, v in zip(old.values, values, strict=True):
                if isinstance(buf, torch.Tensor):
                    buf.copy_(v)
            return old.values
        return _cloned(values)

    def _forecast(self, slot: Slot, x: float, order: int) -> tuple[Any, ...]:
        """The cached values extrapolated to progress ``x`` (Note [Forecast reuse])."""
        points = slot.history[-(order + 1) :]
        if len(points) < order + 1:
            return slot.values  # not enough cache steps yet: copy
        weights = lagrange_weights([p for p, _ in points], x)
        combine = compiled_combine(self.layout.inner, order)
        out: list[Any] = []
        for i, last in enumerate(slot.values):
            if not isinstance(last, torch.Tensor):
                out.append(last)
                continue
            w = torch.tensor(weights, dtype=last.dtype).to(last.device, non_blocking=True)
            out.append(combine(w, *(values[i] for _, values in points)))
        return tuple(out)

    def _signature(self, args: Sequence[Any]) -> Signature:
        return tuple(
            (a.shape, a.dtype, a.device) if isinstance(a, torch.Tensor) else a
            for a in (args[i] for i in self.signature_indices)
        )

    def __call__(self, *args: Any) -> Any:
        state = self.state
        ks = state.current()
        t = None
        if self.timestep_index is not None and ks.reads_timestep:  # Note [Counted steps]
            t = read_timestep(args[self.timestep_index])
        gen, branch = state.advance(ks, self.layout_key, t)
        signature = self._signature(args)
        slot_key = (self.layout_key, branch)
        slot = gen.slots.get(slot_key)
        prefix = _as_tuple(self.prefix_fn(*self.prefix.gather(args))) if self.prefix_fn else ()
        if state.ada is not None:
            cache = self._adaptive(gen, branch, slot_key, slot, signature, args, prefix)
            return self.tail_fn(*self.tail.gather(args, prefix, cache))
        reuse = gen.step_may_reuse and slot is not None and slot.signature == signature
        order = state.settings.forecast
        if reuse:
            assert slot is not None
            cache = self._forecast(slot, gen.progress, order) if order else slot.values
        elif self.own_cache and not order:
            out = _as_tuple(self.region_fn(*self.region.gather(args, prefix)))
            cache = self._own(out, slot, signature)
            state.store(gen, slot_key, Slot(cache, signature))
        else:
            # Free what the new cache replaces (our reference too) before it is made: at the
            # peak a branch holds forecast + 1 caches, not forecast + 2.
            kept = slot.history[len(slot.history) - order :] if order and slot else ()
            if slot is not None and slot.signature != signature:
                kept = ()
            slot = None
            state.store(gen, slot_key, None)
            cache = _as_tuple(self.region_fn(*self.region.gather(args, prefix)))
            if self.own_cache:
                cache = _cloned(cache)
            history = (*kept, (gen.progress, cache)) if order else ()
            state.store(gen, slot_key, Slot(cache, signature, history))
        state.record(gen, reuse)
        return self.tail_fn(*self.tail.gather(args, prefix, cache))

    def _adaptive(
        self,
        gen: Generation,
        branch: int,
        slot_key: tuple[Any, int],
        slot: Slot | None,
        signature: Signature,
        args: Sequence[Any],
        prefix: tuple[Any, ...],
    ) -> tuple[Any, ...]:
        """One call under a BlockDance-Ada policy (Note [BlockDance-Ada] in ``ada.py``): the
        cached values the tail reads, computing the region unless every row reuses."""
        state, policy = self.state, self.state.ada
        assert policy is not None
        decision = gen.ada
        reuse_rows: torch.Tensor | None = None  # bool [rows]: rows that reuse at this step
        later = decision is not None and gen.timed and gen.step > decision.step
        if later and slot is not None and slot.signature == signature:
            assert decision is not None
            first = slot.values[0]
            if isinstance(first, torch.Tensor) and first.dim() > 0:
                reuse_rows = decision.reuse_rows(gen.progress, int(first.shape[0]))
        if later:
            assert decision is not None
            decision.note_step(gen.step, reuse_rows)
        c = counters["blockdance"]
        if reuse_rows is not None and bool(reuse_rows.all()):
            assert slot is not None
            state.record(gen, True)
            c["ada_row_steps_reused"] += int(reuse_rows.numel())
            return slot.values
        fresh = _as_tuple(self.region_fn(*self.region.gather(args, prefix)))
        if self.own_cache:  # Note [Caches under CUDA graphs]: the next replay overwrites it
            fresh = _cloned(fresh)
        cache = fresh
        if reuse_rows is not None and bool(reuse_rows.any()):
            assert slot is not None
            cache = _mix_rows(reuse_rows, slot.values, fresh)
            c["ada_mixed_calls"] += 1
            c["ada_row_steps_reused"] += int(reuse_rows.sum())
        state.store(gen, slot_key, None)  # free the old cache before holding the new one
        state.store(gen, slot_key, Slot(cache, signature))
        if decision is None and gen.timed and gen.progress >= policy.rho and branch == 0:
            first = fresh[0]
            sync, group = state.policy_sync()
            rows = state.settings.policy_rows
            gen.ada = policy.decide(first, gen.progress, gen.step, rows, sync, group)
            c["ada_decisions"] += 1
        state.record(gen, False)
        return cache


def _mix_rows(
    reuse_rows: torch.Tensor, old: tuple[Any, ...], fresh: tuple[Any, ...]
) -> tuple[Any, ...]:
    """Per row, the old (cached) value where ``reuse_rows`` else the fresh one; values without
    the batch dim (numbers, batch-independent tensors) are taken fresh."""
    rows = int(reuse_rows.shape[0])
    out: list[Any] = []
    for o, f in zip(old, fresh, strict=True):
        if isinstance(f, torch.Tensor) and f.dim() > 0 and f.shape[0] == rows:
            m = reuse_rows.to(f.device, non_blocking=True).view(rows, *([1] * (f.dim() - 1)))
            out.append(torch.where(m, o, f))
        else:
            out.append(f)
    return tuple(out)


class TimestepReader:
    """A graph without blocks that has the timestep (the first piece of a forward with a graph
    break): runs uncached, and tells the loop state where the loop is, for the graphs after it."""

    def __init__(self, fn: CompiledFn, state: LoopState, timestep_index: int) -> None:
        self.fn, self.state, self.timestep_index = fn, state, timestep_index
        self.layout_key = ("timestep reader",)
        self.param_ids: frozenset[int] = frozenset()
        state.add(self)

    def __call__(self, *args: Any) -> Any:
        ks = self.state.current()
        t = read_timestep(args[self.timestep_index]) if ks.reads_timestep else None
        self.state.advance(ks, self.layout_key, t)
        return self.fn(*args)
