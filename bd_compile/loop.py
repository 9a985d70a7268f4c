"""Where a compiled model is in its sampling loop: one ``LoopState`` per model, shared by every
graph Dynamo makes of it.

Note [Generations, steps and branches]
Dynamo may hand the backend several graphs of one model: a recompile (the latent started to
require grad, a new dtype, a dynamic dim) or the pieces of a forward with a graph break. They
all report to the model's one ``LoopState``, so a recompile inside a generation continues the
same generation, step count and schedule, and all graphs of one forward share the step
decision. Per key (``bd_compile.generation(key=...)``; ``None`` for automatic generations):

- **Automatic generations.** The first two distinct timesteps of a generation tell whether time
  falls (DDPM/DDIM timesteps, flow-matching sigma) or rises (Lumina's ``1 - sigma``); a
  timestep that moves against that direction (or the first call) starts a new **generation**,
  one that moves along it a new **step**, an equal one is another **branch** of the same step
  (sequential classifier-free guidance calls the model for cond, then uncond).
- **Explicit generations** (``with bd_compile.generation(model, ...)``): the block is one
  generation; a changed timestep is a new step, an equal one another branch. Leaving the block
  ends it and frees its caches.
- A graph without a timestep input (the part of a forward after a graph break) follows the
  current step of its key; its calls count as branches of that step.

Every (cached-value layout, branch) has its own cache slot, stamped with the concrete input
signature (shapes, dtypes, devices) that wrote it; slots are cleared when a generation starts.
A call reuses only if the schedule allows its step *and* its slot exists with its signature:
so a cache is never read before it was written in the same generation, branches never read
each other's cache, graphs read only caches of their own layout, and a new batch size or
resolution never reads a cache of another shape.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections import deque
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch._dynamo.utils import counters

from bd_compile import counted
from bd_compile.keys import (
    _ACTIVE,
    Generation,
    GenerationStats,
    KeyState,
    LayoutKey,
    Slot,
)
from bd_compile.layout import Layout
from bd_compile.schedule import (
    ProgressSchedule,
    Schedule,
    TimestepSchedule,
    progress,
    schedule_for,
)
from bd_compile.settings import Settings

if TYPE_CHECKING:
    from bd_compile.ada import Policy


class Member(Protocol):
    """A graph of a model that reports to its loop state (``runtime.GraphRuntime``, or a
    ``runtime.TimestepReader``)."""

    @property
    def timestep_index(self) -> int | None: ...
    @property
    def param_ids(self) -> frozenset[int]: ...
    @property
    def layout(self) -> Layout | None:
        """What was found and cached; ``None``: a piece without blocks that reads the timestep."""


log = logging.getLogger(__name__)

# Calls of one graph at one step beyond this many are not cached: a loop that calls the model
# many times at the same timestep (not a sampler) must not grow the cache without bound.
MAX_BRANCHES = 4
#: Finished generations kept for ``bd_compile.stats``.
HISTORY = 32


class LoopState:
    """One compiled model's loop position, caches and history, shared by all of its graphs."""

    def __init__(self, settings: Settings, owner: torch.nn.Module | None = None) -> None:
        self.settings = settings
        self._owner = weakref.ref(owner) if owner is not None else None
        self.runtimes: list[weakref.ReferenceType[Member]] = []
        self.finished: deque[GenerationStats] = deque(maxlen=HISTORY)
        self._keys: dict[Hashable, KeyState] = {}
        self._lock = threading.Lock()
        #: what checking counted keys found, per what they said (``counted.prepare``)
        self.learned: dict[counted.Said, counted.Said] = {}
        #: BlockDance-Ada: the policy driving this model, if ``settings.policy`` fits its graphs
        self.ada: Policy | None = None
        self._ada_warned: set[str] = set()

    # -- graphs -------------------------------------------------------------------------------
    def add(self, member: Member) -> None:
        self.runtimes.append(weakref.ref(member))

    def live(self) -> list[Member]:
        """The graphs of this model still in use (readers included), oldest first."""
        alive = [r() for r in self.runtimes]
        self.runtimes = [weakref.ref(r) for r in alive if r is not None]
        return [r for r in alive if r is not None]

    def layouts(self) -> list[Layout]:
        """What each rewritten graph of this model caches, oldest first."""
        return [r.layout for r in self.live() if r.layout is not None]

    def has_timestep_reader(self) -> bool:
        return any(r.timestep_index is not None for r in self.live())

    def describe(self) -> str:
        if self.ada is not None:
            m = self.ada.meta
            return (
                f"BlockDance-Ada policy {self.ada.path} ({m.model or 'no description'}): every "
                f"step computes until {m.rho:.0%} of the trajectory, then per-sample decisions "
                f"over {m.bins} progress bins"
            )
        return schedule_for(self.settings).describe()

    def set_settings(self, settings: Settings, recheck: bool = False) -> None:
        """New schedule options (``set_schedule``); running generations end, nothing recompiles.
        A policy is loaded and checked against the graphs first (``ValueError`` if unreadable).
        ``recheck`` (``timesteps`` or ``branches`` given anew): forget what checking counted
        loops found, so the next counted generation is checked again; a new ``interval`` or
        ``forecast`` keeps it (the loop is the same loop)."""
        self.resolve_policy(settings)
        self.settings = settings
        self.restart()
        if recheck:
            self.learned.clear()
        with self._lock:  # automatic states take the new ``timesteps`` at their next call
            self._keys = {k: ks for k, ks in self._keys.items() if ks.explicit}

    def resolve_policy(self, settings: Settings | None = None) -> None:
        """Load ``settings.policy`` and check it against every graph of this model: ``self.ada``
        is the policy if it fits them all, else ``None`` (the static schedule) with one warning,
        or ``ValueError`` under ``strict``. Missing or corrupt files raise ``ValueError``."""
        s = settings if settings is not None else self.settings
        if s.policy is None:
            self.ada = None
            return
        from bd_compile.ada import load_policy  # only when a policy is asked for

        policy = load_policy(s.policy)
        for layout in self.layouts():
            why = policy.mismatch(layout)
            if why is None:
                continue
            msg = f"blockdance option 'policy': {s.policy} was trained for another model: {why}"
            if s.strict:
                raise ValueError(msg)
            if s.policy not in self._ada_warned:
                log.warning("%s; using the static schedule instead", msg)
                self._ada_warned.add(s.policy)
            self.ada = None
            return
        self.ada = policy

    def policy_sync(self) -> tuple[bool, Any]:
        """Whether the policy's statistics are summed across ranks, and over which process
        group: diffusers' context-parallel group when the model has one (``"auto"`` syncs only
        then), else the default group (``None``)."""
        mode = self.settings.policy_sync
        owner = self._owner() if self._owner is not None else None
        module = getattr(owner, "_orig_mod", owner)
        config = getattr(module, "_parallel_config", None)
        cp = getattr(config, "context_parallel_config", None)
        mesh = getattr(cp, "_flattened_mesh", None)
        group = mesh.get_group() if mesh is not None else None
        if mode == "auto":
            return cp is not None, group
        return mode == "always", group

    def belongs_to(self, model: object) -> bool:
        """Whether ``model`` (a ``torch.compile`` wrapper or the module it wraps) is this
        state's owner."""
        owner = self._owner() if self._owner is not None else None
        return owner is not None and (owner is model or getattr(owner, "_orig_mod", None) is model)

    # -- keys and generations -------------------------------------------------------------------
    def key_state(self, key: Hashable) -> KeyState:
        """The automatic state of ``key`` (no ``generation`` block): it counts steps when the
        ``timesteps`` option is set."""
        ks = self._keys.get(key)  # the common case needs no lock (one dict read)
        if ks is not None:
            return ks
        with self._lock:
            ks = self._keys.get(key)
            if ks is None:
                s = self.settings
                ks = self._keys[key] = KeyState(key, False, s.timesteps, s.branches)
                counted.prepare(self, ks)
            return ks

    def open(
        self, key: Hashable, timesteps: Sequence[float] | None, branches: int | None = None
    ) -> KeyState:
        """Start an explicit generation of ``key`` (``bd_compile.generation``); without
        ``timesteps`` it takes the ``timesteps`` option's (and ``branches``, unless given)."""
        ks = self._key(key, True, timesteps, branches)
        with self._lock:
            previous, self._keys[key] = self._keys.get(key), ks
        if previous is not None:
            self._end(previous)
        self.begin(ks)
        return ks

    def resume(
        self, key: Hashable, timesteps: Sequence[float] | None, branches: int | None = None
    ) -> KeyState:
        """The running loop state of ``key`` (``generation(model, key, resume=True)``), or a
        new one: its generations start and end by the automatic rules, not by blocks."""
        ks = self._key(key, False, timesteps, branches)
        with self._lock:
            previous = self._keys.get(key)
            if previous is not None and not previous.explicit and previous.said == ks.said:
                return previous
            self._keys[key] = ks
        if previous is not None:
            self._end(previous)
        return ks

    def _key(
        self, key: Hashable, explicit: bool, timesteps: Sequence[float] | None, branches: int | None
    ) -> KeyState:
        """A new key state; without ``timesteps`` it takes the ``timesteps`` option's (and
        ``branches``, unless given)."""
        if timesteps is None and self.settings.timesteps is not None:
            timesteps = self.settings.timesteps
            branches = branches if branches is not None else self.settings.branches
        ks = KeyState(key, explicit, timesteps, branches if branches is not None else 1)
        counted.prepare(self, ks)
        return ks

    def forget(self, key: Hashable) -> None:
        """End ``key``'s generation and free its caches (``bd_compile.reset(model, key=k)``)."""
        with self._lock:
            ks = self._keys.pop(key, None)
        if ks is not None:
            self._end(ks)

    def close(self, ks: KeyState) -> None:
        self._end(ks)
        with self._lock:
            if self._keys.get(ks.key) is ks:
                del self._keys[ks.key]

    def _schedule(self, ks: KeyState) -> Schedule:
        s = self.settings
        if ks.timesteps is not None:
            return TimestepSchedule(ks.timesteps, s.window, s.interval)
        if s.timesteps is not None:  # the list did not fit this key's loop (counted.py)
            return ProgressSchedule(s.window, s.interval)
        return schedule_for(s)

    def begin(self, ks: KeyState) -> Generation:
        self._end(ks)
        ks.number += 1
        schedule = self._schedule(ks)
        schedule.start()
        ks.generation = Generation(ks.number, schedule)
        return ks.generation

    def _end(self, ks: KeyState) -> None:
        counted.checked(self, ks)
        gen, ks.generation = ks.generation, None
        if gen is not None and gen.calls:
            self.finished.append(gen.stats(ks.key))
        if gen is not None:
            gen.slots.clear()

    def restart(self) -> None:
        """End every running generation (``set_schedule``, ``reset``): the next call computes."""
        with self._lock:
            states = list(self._keys.values())
        for ks in states:
            self._end(ks)

    def reset(self) -> None:
        """Forget everything: caches, loop positions, history."""
        with self._lock:
            self._keys.clear()
        self.finished.clear()
        self.learned.clear()

    def running_generations(self) -> list[Generation]:
        with self._lock:
            states = list(self._keys.values())
        return [ks.generation for ks in states if ks.generation is not None]

    def running(self) -> list[GenerationStats]:
        with self._lock:
            states = [ks for ks in self._keys.values() if ks.generation is not None]
        gens = [(ks.key, ks.generation) for ks in states]
        # a generation no rewritten graph was called in (every graph fell back) did nothing
        return [gen.stats(key) for key, gen in gens if gen is not None and gen.calls]

    def cache_bytes(self) -> int:
        return sum(gen.cache_bytes() for gen in self.running_generations())

    # -- one call ---------------------------------------------------------------------------------
    def current(self) -> KeyState:
        """The key state the current call belongs to: the innermost ``generation`` block open
        on this model in this context, else the automatic one."""
        for entry in reversed(_ACTIVE.get()):
            if self.belongs_to(entry.owner):
                opened = entry.opened.get(id(self))
                if opened is None:  # the block's first call of this model: open it now
                    start = self.resume if entry.resume else self.open
                    ks = start(entry.key, entry.timesteps, entry.branches)
                    opened = entry.opened[id(self)] = (self, ks)
                return opened[1]
        return self.key_state(None)

    def advance(self, ks: KeyState, layout: LayoutKey, t: float | None) -> tuple[Generation, int]:
        """Place a call with timestep ``t`` (``None``: a graph without a timestep input) in the
        loop; returns the generation and the call's branch index among the calls of graphs with
        ``layout`` at this step."""
        if ks.counts_steps:
            return counted.count(self, ks, layout, t)
        gen = ks.generation
        if t is None:
            if gen is None or gen.step < 0:  # nothing has read a timestep yet: compute
                gen = gen or self.begin(ks)
                self.new_step(gen, None)
        elif gen is None or gen.last_t is None:
            gen = gen or self.begin(ks)
            gen.t0 = t
            self.new_step(gen, t)
        elif t != gen.last_t:
            moved = 1 if t > gen.last_t else -1
            if not ks.explicit and gen.direction not in (0, moved):
                gen = self.begin(ks)  # time moved against the loop's direction
                gen.t0 = t
            elif gen.direction == 0:
                gen.direction = moved
            self.new_step(gen, t)
        branch = gen.calls_at_step.get(layout, 0)
        gen.calls_at_step[layout] = branch + 1
        return gen, branch

    @staticmethod
    def new_step(gen: Generation, t: float | None) -> None:
        gen.step += 1
        gen.calls_at_step.clear()
        gen.step_reused.append(None)  # until a rewritten graph is called at this step
        if t is not None and gen.t0 is not None:
            gen.progress = progress(gen.t0, t, gen.direction)
            gen.step_may_reuse = gen.schedule.step(t, gen.progress)
            gen.last_t = t
            gen.timed = True
        else:
            gen.step_may_reuse = False
            gen.timed = False

    @staticmethod
    def record(gen: Generation, reused: bool) -> None:
        gen.calls += 1
        gen.reused_calls += reused
        gen.step_reused[-1] = reused and gen.step_reused[-1] is not False
        counters["blockdance"]["reuse_steps" if reused else "cache_steps"] += 1

    @staticmethod
    def store(gen: Generation, slot_key: tuple[LayoutKey, int], slot: Slot | None) -> None:
        if slot is None:
            gen.slots.pop(slot_key, None)
            return
        if slot_key[1] < MAX_BRANCHES:
            gen.slots[slot_key] = slot
            gen.count_peak(slot_key, slot)


# -- one state per model ----------------------------------------------------------------------
_STATES: weakref.WeakKeyDictionary[torch.nn.Module, LoopState] = weakref.WeakKeyDictionary()
_UNOWNED: list[weakref.ReferenceType[LoopState]] = []


def state_for(
    owner: torch.nn.Module | None, settings: Settings, params: frozenset[int]
) -> LoopState:
    """The loop state a new graph of ``owner`` (``backend.graph_owner``) joins.

    Graphs of one ``torch.compile`` wrapper share a state; a state whose graphs are all gone
    (``torch._dynamo.reset()``) starts afresh. Without a known owner, graphs that share a
    parameter share a state.
    """
    if owner is not None:
        state = _STATES.get(owner)
        if state is None or not state.live():
            state = _STATES[owner] = LoopState(settings, owner)
        return state
    for ref in list(_UNOWNED):
        candidate = ref()
        if candidate is None:
            _UNOWNED.remove(ref)
        elif any(r.param_ids & params for r in candidate.live()):
            return candidate
    state = LoopState(settings)
    _UNOWNED.append(weakref.ref(state))
    return state


def states_of(model: torch.nn.Module | None) -> list[LoopState]:
    """The live loop states of ``model`` (every model's if ``None``)."""
    found = [s for s in list(_STATES.values()) if s.live()]
    if model is not None:
        found = [s for s in found if s.belongs_to(model)]
        module = getattr(model, "_orig_mod", model)
        ids = {id(p) for p in module.parameters()} if isinstance(module, torch.nn.Module) else set()
    for ref in _UNOWNED:
        s = ref()
        if s is not None and s not in found and s.live():
            if model is None or any(r.param_ids & ids for r in s.live()):
                found.append(s)
    return found
