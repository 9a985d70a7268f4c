"""An independent eager reference of BlockDance's cache semantics, for golden tests.

Nothing here imports torch.compile machinery or `bd_compile`: the blocks' `forward` methods are
temporarily replaced on the instances, so the reference is as plain as the paper's description.

Semantics (paper, Sec. BlockDance-N):
- compute call: every block runs; the exact return value of each block ``0..cache_block`` is
  stored (detached clone; tuples stay tuples, None entries stay None), per cache key (`branch`).
- reuse call: blocks ``0..cache_block`` do not run; each returns a clone of its value stored on
  the last compute call of the same branch. Glue code between blocks, everything before the
  stack (embeddings) and after it (final norm, unpatchify) still runs; blocks after
  ``cache_block`` run on the current timestep's conditioning.
- a reuse call before anything was stored for its branch raises.

`paper_plan` turns the paper's step rule (window, interval N) into a per-step list of decisions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import zoo
from torch import nn


def _snapshot(value: Any) -> Any:
    """Detached clone of a block's return value, keeping its structure."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if value is None:
        return None
    if isinstance(value, tuple):
        return tuple(_snapshot(v) for v in value)
    if isinstance(value, list):
        return [_snapshot(v) for v in value]
    raise TypeError(f"expected a block to return tensors, tuples or None, got {type(value)}")


class ReferenceController:
    """Drives the patched blocks: set `reuse` and `branch` before each model call.

    Attributes:
        reuse: False = compute call (run and store), True = reuse call (skip and replay).
        branch: cache key; sequential CFG uses one key per branch so each reads what it wrote.
        block_calls: how many times each block's real forward ran (for tests).
        compute_calls / reuse_calls: counted when block 0 is entered.
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        cache_block: int,
        skip: Sequence[int] | None = None,
        forecast: int = 0,
    ) -> None:
        if not 0 <= cache_block < len(blocks):
            raise ValueError(f"expected 0 <= cache_block < {len(blocks)}, got {cache_block}")
        if len({id(b) for b in blocks}) != len(blocks):
            raise ValueError("expected distinct block modules, got a module listed twice")
        self.blocks = list(blocks)
        self.cache_block = cache_block
        #: the blocks a reuse call replays: 0..cache_block, or any set (graph-break pieces)
        self.skip = tuple(sorted(set(skip))) if skip is not None else tuple(range(cache_block + 1))
        self.reuse = False
        self.branch: Hashable = 0
        self.block_calls = [0] * len(self.blocks)
        self.compute_calls = 0
        self.reuse_calls = 0
        self._store: dict[Hashable, list[Any]] = {}
        self._missing = object()
        #: forecast order and the progress of the current call (set before each call)
        self.forecast = forecast
        self.progress = 0.0
        self._history: dict[tuple[Hashable, int], list[tuple[float, Any]]] = {}

    def reset(self) -> None:
        """Forget every stored value (a new sampling run)."""
        self._store.clear()
        self.reuse = False
        self.branch = 0

    def has_cache(self, branch: Hashable) -> bool:
        entries = self._store.get(branch)
        return entries is not None and all(entries[i] is not self._missing for i in self.skip)

    def cached(self, branch: Hashable, index: int) -> Any:
        """The stored return value of block `index` for `branch` (for tests)."""
        return self._store[branch][index]

    def _call(
        self, index: int, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        if index == 0:
            if self.reuse:
                self.reuse_calls += 1
            else:
                self.compute_calls += 1
        if self.reuse:
            if not self.has_cache(self.branch):
                raise RuntimeError(
                    f"reuse requested for branch {self.branch!r} before a compute call stored "
                    f"blocks 0..{self.cache_block}"
                )
            history = self._history.get((self.branch, index), [])
            if self.forecast and len(history) >= self.forecast + 1:
                return _newton(history[-(self.forecast + 1) :], self.progress)
            return _snapshot(self._store[self.branch][index])
        out = forward(*args, **kwargs)
        self.block_calls[index] += 1
        entries = self._store.setdefault(self.branch, [self._missing] * len(self.blocks))
        entries[index] = _snapshot(out)
        history = self._history.setdefault((self.branch, index), [])
        history.append((self.progress, entries[index]))
        del history[: -(self.forecast + 1)]
        return out

    def _call_tail(
        self, index: int, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        out = forward(*args, **kwargs)
        self.block_calls[index] += 1
        return out


def _newton(points: list[tuple[float, Any]], x: float) -> Any:
    """Extrapolate block outputs to `x` from 2 or 3 (progress, output) points by Newton's
    divided differences (independent of the backend's Lagrange weights)."""
    if isinstance(points[-1][1], tuple):
        return tuple(_newton([(p, v[k]) for p, v in points], x) for k in range(len(points[-1][1])))
    if points[-1][1] is None:
        return None
    if len(points) == 2:
        (x0, v0), (x1, v1) = points
        return v1 + (v1 - v0) * ((x - x1) / (x1 - x0))
    (x0, v0), (x1, v1), (x2, v2) = points
    d01, d12 = (v1 - v0) / (x1 - x0), (v2 - v1) / (x2 - x1)
    d012 = (d12 - d01) / (x2 - x0)
    return v2 + d12 * (x - x2) + d012 * (x - x2) * (x - x1)


@contextmanager
def blockdance_reference(
    blocks: Sequence[nn.Module],
    cache_block: int,
    skip: Sequence[int] | None = None,
    forecast: int = 0,
) -> Iterator[ReferenceController]:
    """Patch `blocks` (in execution order) for the duration of the context.

    Blocks ``0..cache_block`` (or the indices in `skip`) cache/replay; the others run normally
    but are counted. The original forwards (including an instance-level override) are
    restored on exit.
    """
    ctrl = ReferenceController(blocks, cache_block, skip, forecast)
    saved: list[tuple[nn.Module, Any]] = []
    try:
        for i, block in enumerate(ctrl.blocks):
            saved.append((block, block.__dict__.get("forward", None)))
            original = block.forward
            handler = ctrl._call if i in ctrl.skip else ctrl._call_tail

            def patched(
                *args: Any,
                _i: int = i,
                _f: Callable[..., Any] = original,
                _h: Callable[..., Any] = handler,
                **kwargs: Any,
            ) -> Any:
                return _h(_i, _f, args, kwargs)

            block.forward = patched  # type: ignore[method-assign]
        yield ctrl
    finally:
        for block, own in saved:
            if own is None:
                del block.forward
            else:
                block.forward = own  # type: ignore[method-assign]


def paper_plan(
    num_steps: int, window: tuple[float, float] = (0.4, 0.95), interval: int = 2
) -> list[bool]:
    """BlockDance-N on `num_steps` steps: True = reuse step, False = compute step.

    The reuse window is ``range(ceil(start*S), ceil(end*S))``; inside it the steps form groups
    of `interval`: the first of each group computes (and stores), the others reuse. Every step
    outside the window computes. Products like 0.55*20 are rounded to 9 decimals before the ceil
    so that float noise (11.000000000000002) does not shift the window.
    """
    start, end = window
    if not 0.0 <= start <= end <= 1.0:
        raise ValueError(f"expected 0 <= start <= end <= 1, got window={window}")
    if interval < 1:
        raise ValueError(f"expected interval >= 1, got {interval}")
    if num_steps < 0:
        raise ValueError(f"expected num_steps >= 0, got {num_steps}")
    lo = math.ceil(round(start * num_steps, 9))
    hi = math.ceil(round(end * num_steps, 9))
    return [lo <= i < hi and (i - lo) % interval != 0 for i in range(num_steps)]


def progress_values(timesteps: Sequence[float]) -> list[float]:
    """Each step's progress along the trajectory, as ``progress_plan`` measures it."""
    t0 = timesteps[0]
    rising = len(timesteps) > 1 and timesteps[1] > t0
    top = 1.0 if max(timesteps) <= 1.0 else 1000.0
    return [(t - t0) / (top - t0) if rising else (t0 - t) / t0 for t in timesteps]


def progress_plan(
    timesteps: Sequence[float], window: tuple[float, float] = (0.4, 0.95), interval: int = 2
) -> list[bool]:
    """The default schedule's rule, written out independently of ``bd_compile.schedule``: a
    step's progress is ``(t0 - t) / t0`` for falling time and ``(t - t0) / (end - t0)`` for
    rising time (``end`` 1, or 1000 above 1); the steps with ``start <= p < end`` form the
    window (``p == 1 == end`` included); the first of each group of `interval` computes."""
    plan, inside = [], 0
    for p in progress_values(timesteps):
        if window[0] <= p < window[1] or p == window[1] == 1.0:
            inside += 1
            plan.append((inside - 1) % interval != 0)
        else:
            plan.append(False)
    return plan


def run_reference_loop(
    case: zoo.ZooCase,
    cache_block: int,
    plan: Sequence[bool],
    steps: int,
    cfg: zoo.CfgMode,
    *,
    guidance_scale: float = 4.0,
    seed: int = 0,
    batch: int = 1,
    timesteps: Sequence[float] | None = None,
    skip: Sequence[int] | None = None,
    grad: bool = False,
    forecast: int = 0,
    progress: Sequence[float] | None = None,
) -> tuple[zoo.LoopResult, ReferenceController]:
    """`zoo.run_loop` on the eager model with the reference cache driven by `plan[step]`.

    Sequential CFG: both branches of a step follow the same decision, each with its own cache.
    Batched CFG uses one cache holding the [cond; uncond] batch.
    """
    n = steps if timesteps is None else len(timesteps)
    if len(plan) != n:
        raise ValueError(f"expected a plan of {n} decisions, got {len(plan)}")
    with blockdance_reference(case.blocks(), cache_block, skip, forecast) as ctrl:

        def before_call(info: zoo.CallInfo) -> None:
            ctrl.reuse = bool(plan[info.step])
            ctrl.progress = progress[info.step] if progress is not None else 0.0
            ctrl.branch = 0 if info.branch is None else info.branch

        result = zoo.run_loop(
            case,
            case.model,
            steps,
            cfg=cfg,
            guidance_scale=guidance_scale,
            seed=seed,
            batch=batch,
            timesteps=timesteps,
            before_call=before_call,
            grad=grad,
        )
    return result, ctrl
