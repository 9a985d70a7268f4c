"""One answer per call: what a call of a rewritten graph runs, and where its cache lives.

The loop state places the call (``LoopState.advance``: generation, step, branch); ``answer``
then decides, from the schedule or the BlockDance-Ada decision, which variant of Note [One graph
per call] runs and with what. The runtime only acts on the answer and stores through it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch._dynamo.utils import counters

from bd_compile.keys import Generation, LayoutKey, Signature, Slot

if TYPE_CHECKING:
    from bd_compile.loop import LoopState

#: What a call runs (Note [One graph per call] in ``passes/build_variants.py``).
COMPUTE, REUSE, FORECAST, MIXED = "compute", "reuse", "forecast", "mixed"


class Call(NamedTuple):
    """The loop state's answer for one call (a named tuple: made on every call, it costs a
    third of a frozen dataclass)."""

    gen: Generation
    branch: int
    slot_key: tuple[LayoutKey, int]
    #: this branch's cache, if there is one
    slot: Slot | None
    #: the variant to run: ``COMPUTE``, ``REUSE``, ``FORECAST`` or ``MIXED``
    run: str
    #: ``FORECAST``: the Lagrange weights of (oldest, older, last) (Note [Forecast reuse])
    weights: tuple[float, ...] = ()
    #: ``FORECAST``: the cached values of the cache steps before the last, oldest first
    history: tuple[tuple[Any, ...], ...] = ()
    #: ``MIXED``: bool [rows], the rows that reuse (Note [BlockDance-Ada])
    rows: torch.Tensor | None = None

    @property
    def reuses(self) -> bool:
        """Whether the region is skipped for every row."""
        return self.run in (REUSE, FORECAST)


def lagrange_weights(xs: Sequence[float], x: float) -> list[float]:
    """Weights ``w`` with ``sum(w_i * f(x_i)) = p(x)`` for the polynomial ``p`` through the
    points ``(x_i, f(x_i))``: linear extrapolation from two points, quadratic from three."""
    return [
        math.prod((x - xj) / (xi - xj) for j, xj in enumerate(xs) if j != i)
        for i, xi in enumerate(xs)
    ]


def answer(
    state: LoopState, gen: Generation, branch: int, layout: LayoutKey, signature: Signature
) -> Call:
    """What this call runs: reuse only if the schedule (or the policy's decision) allows this
    step and the branch's cache was written by a call of the same signature."""
    slot_key = (layout, branch)
    slot = gen.slots.get(slot_key)
    readable = slot if slot is not None and slot.signature == signature else None
    if state.ada is not None:
        return _adaptive(gen, branch, slot_key, slot, readable)
    if not gen.step_may_reuse or readable is None:
        return Call(gen, branch, slot_key, slot, COMPUTE)
    order = state.settings.forecast
    if not order or len(readable.history) <= order:  # copy (until k + 1 cache steps exist)
        return Call(gen, branch, slot_key, slot, REUSE)
    points = readable.history[-(order + 1) :]
    weights = lagrange_weights([p for p, _ in points], gen.progress)
    history = tuple(values for _, values in points[:-1])
    if order == 1:  # the forecast graph sums three terms: the oldest weighs nothing
        weights, history = [0.0, *weights], (history[0], *history)
    return Call(gen, branch, slot_key, slot, FORECAST, tuple(weights), history)


def _adaptive(
    gen: Generation,
    branch: int,
    slot_key: tuple[LayoutKey, int],
    slot: Slot | None,
    readable: Slot | None,
) -> Call:
    """Under a BlockDance-Ada policy (Note [BlockDance-Ada] in ``ada.py``): reuse if every row
    reuses at this step, mix rows if some do, else compute."""
    decision = gen.ada
    if decision is None or not gen.timed or gen.step <= decision.step:
        return Call(gen, branch, slot_key, slot, COMPUTE)
    rows: torch.Tensor | None = None  # bool [rows]: rows that reuse at this step
    first = readable.values[0] if readable is not None else None
    if isinstance(first, torch.Tensor) and first.dim() > 0:
        rows = decision.reuse_rows(gen.progress, int(first.shape[0]))
    decision.note_step(gen.step, rows)
    if rows is None or not bool(rows.any()):
        return Call(gen, branch, slot_key, slot, COMPUTE)
    c = counters["blockdance"]
    c["ada_row_steps_reused"] += int(rows.sum())
    if bool(rows.all()):
        return Call(gen, branch, slot_key, slot, REUSE)
    c["ada_mixed_calls"] += 1
    return Call(gen, branch, slot_key, slot, MIXED, rows=rows)


def decide_after(state: LoopState, gen: Generation, branch: int, first: Any) -> None:
    """After a computed call under a policy: at the generation's first step at progress
    ``>= rho`` (branch 0), the policy decides the rest of the generation from the first cached
    value (Note [BlockDance-Ada])."""
    policy = state.ada
    assert policy is not None
    if gen.ada is None and gen.timed and gen.progress >= policy.rho and branch == 0:
        sync, group = state.policy_sync()
        rows = state.settings.policy_rows
        gen.ada = policy.decide(first, gen.progress, gen.step, rows, sync, group)
        counters["blockdance"]["ada_decisions"] += 1
