"""The generation keys of a model's loop (Note [Generations, steps and branches] in
``loop.py``): each key's position and running generation (``KeyState``, ``Generation``), the
cache slots a generation holds, what ``bd_compile.stats`` reports of a finished one, and the
``bd_compile.generation`` blocks that choose the key of the calls inside them."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from bd_compile import counted

if TYPE_CHECKING:
    from bd_compile.ada import Decision
    from bd_compile.loop import LoopState
    from bd_compile.schedule import Schedule

LayoutKey = Hashable
Signature = tuple[Any, ...]


@dataclass
class Slot:
    """One branch's cache: the values of the last cache step, and for ``forecast`` the last
    cache steps' (progress, values), oldest first (the last entry is ``values``)."""

    values: tuple[Any, ...]
    signature: Signature
    history: tuple[tuple[float, tuple[Any, ...]], ...] = ()


@dataclass(frozen=True)
class GenerationStats:
    """One generation as ``bd_compile.stats`` reports it."""

    key: Hashable
    number: int
    #: one letter per denoising step: ``R`` every call of the step reused, ``C`` otherwise
    pattern: str
    calls: int
    reused_calls: int
    #: peak bytes the caches of this generation held
    cache_bytes: int
    #: BlockDance-Ada: one pattern per sample (``C``/``R`` per step), empty without a policy
    samples: tuple[str, ...] = ()

    @property
    def steps(self) -> int:
        return len(self.pattern)

    @property
    def reuse_steps(self) -> int:
        return self.pattern.count("R")


@dataclass
class Generation:
    """The mutable record of the running generation of one key."""

    number: int
    schedule: Schedule
    step: int = -1
    t0: float | None = None
    last_t: float | None = None
    direction: int = 0
    progress: float = 0.0  #: of the current step along the trajectory (``schedule.progress``)
    timed: bool = False  #: whether the current step's timestep (and progress) is known
    step_may_reuse: bool = False
    calls_at_step: dict[LayoutKey, int] = field(default_factory=dict)
    slots: dict[tuple[LayoutKey, int], Slot] = field(default_factory=dict)
    #: per slot key: the (signature, history length) last counted and its bytes (``count_peak``)
    slot_bytes: dict[tuple[LayoutKey, int], tuple[Hashable, int]] = field(default_factory=dict)
    #: per step: whether every call of a rewritten graph reused (None: no such call yet)
    step_reused: list[bool | None] = field(default_factory=list)
    calls: int = 0
    reused_calls: int = 0
    peak_bytes: int = 0
    #: BlockDance-Ada: the per-sample decisions, once made (Note [BlockDance-Ada])
    ada: Decision | None = None

    def stats(self, key: Hashable) -> GenerationStats:
        pattern = "".join("R" if r else "C" for r in self.step_reused if r is not None)
        samples = tuple("".join(p) for p in self.ada.patterns) if self.ada is not None else ()
        return GenerationStats(
            key, self.number, pattern, self.calls, self.reused_calls, self.peak_bytes, samples
        )

    def cache_bytes(self) -> int:
        return _nbytes(self.slots.values())

    def count_peak(self, slot_key: tuple[LayoutKey, int], slot: Slot) -> None:
        """Raise ``peak_bytes`` to what the slots hold now that ``slot`` is stored under
        ``slot_key``. A slot's bytes are counted again only when its signature or history
        length changed (the same graph and signature cache values of the same sizes): counting
        tensors on every cache step cost host time per call."""
        shape = (slot.signature, len(slot.history))
        known = self.slot_bytes.get(slot_key)
        if known is None or known[0] != shape:
            self.slot_bytes[slot_key] = (shape, _nbytes((slot,)))
        held = sum(self.slot_bytes[k][1] for k in self.slots)
        self.peak_bytes = max(self.peak_bytes, held)


def _nbytes(slots: Iterable[Slot]) -> int:
    """The bytes of the tensors ``slots`` hold, each tensor counted once."""
    held = {
        id(v): v.numel() * v.element_size()
        for s in slots
        for values in (s.values, *(h for _, h in s.history))
        for v in values
        if isinstance(v, torch.Tensor)
    }
    return sum(held.values())


class KeyState:
    """The loop position of one generation key: its running generation, if any.

    With ``timesteps`` the step is counted on the host, not read from the timestep tensor
    (Note [Counted steps] in ``counted.py``), except while the key is being checked."""

    def __init__(
        self,
        key: Hashable,
        explicit: bool,
        timesteps: Sequence[float] | None = None,
        branches: int = 1,
    ) -> None:
        self.key, self.explicit = key, explicit
        self.timesteps = tuple(timesteps) if timesteps is not None else None
        self.branches = branches
        #: what the loop said (``counted.prepare`` may correct ``timesteps`` and ``branches``)
        self.said: counted.Said = (self.timesteps, branches)
        #: reading each call's timestep to check the counting (Note [Counted steps check
        #: themselves]); ``extra_calls``: more calls per step seen than said, warning pending
        self.checking = False
        self.extra_calls = False
        self.generation: Generation | None = None
        self.number = 0
        self.warned = False

    @property
    def counts_steps(self) -> bool:
        return self.timesteps is not None

    @property
    def reads_timestep(self) -> bool:
        """Whether calls read their timestep on the host: uncounted, or being checked."""
        return self.timesteps is None or self.checking


# -- explicit generations ---------------------------------------------------------------------
@dataclass(eq=False)
class _Open:
    """A ``bd_compile.generation`` block: opened on a model's loop states at their first call."""

    owner: torch.nn.Module
    key: Hashable
    timesteps: tuple[float, ...] | None
    branches: int | None
    #: ``generation(..., resume=True)``: continue the key's loop; leaving does not end it
    resume: bool = False
    opened: dict[int, tuple[LoopState, KeyState]] = field(default_factory=dict)


_ACTIVE: contextvars.ContextVar[tuple[_Open, ...]] = contextvars.ContextVar(
    "blockdance_generations", default=()
)


@contextlib.contextmanager
def generation_of(
    owner: torch.nn.Module,
    key: Hashable,
    timesteps: tuple[float, ...] | None,
    branches: int | None,
    resume: bool = False,
) -> Iterator[None]:
    """Calls of ``owner`` inside the block use the loop state of ``key``; leaving the block ends
    that generation on every loop state it was opened on, unless ``resume``."""
    entry = _Open(owner, key, timesteps, branches, resume)
    token = _ACTIVE.set((*_ACTIVE.get(), entry))
    try:
        yield
    finally:
        _ACTIVE.reset(token)
        if not resume:
            for state, ks in entry.opened.values():
                state.close(ks)
