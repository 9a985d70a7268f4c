"""Counted steps: placing a call in the loop from a host counter when the loop said its
timesteps, and checking what was said against what the loop does.

Note [Counted steps]
With ``timesteps`` (the compile option, ``generation(timesteps=...)`` or
``set_schedule(timesteps=...)``) the runtime does not need the timestep tensor (on a GPU a read
is a device-to-host sync per call, which stalls the launch queue and rules out CUDA graphs). A
graph's calls are counted instead: a call of a graph that has already been called ``branches``
times in this step starts the next step (``branches`` = calls of the model per step: 1 for
batched CFG, 2 for sequential cond/uncond). Step ``i`` takes the paper's rule on ``ts`` and its
progress from ``ts[i]``. In a ``generation`` block, calls past ``len(ts)`` steps compute (with
one warning); elsewhere (the option, a resumed key) the call after ``len(ts)`` steps starts the
next generation.

Note [Counted steps check themselves]
A counted loop that was mis-said (a list of another step count, ``branches=1`` for a loop that
calls cond then uncond) would be silently wrong: the schedule shifts, a generation ends halfway.
So the first generation counted with a given ``(timesteps, branches)`` on a model (after the
compile, after a ``set_schedule`` that gives ``timesteps`` or ``branches``, and in every
``generation`` block or resumed key whose list this model has not checked yet) also reads the
timestep of every call (one host read per call, for that generation only) and compares it with
what the counter expects (a ``set_schedule`` of ``interval``, ``window`` or ``forecast`` keeps
what was checked: the loop has not changed, and its generations stay sync-free):

- the same timestep again where a new step was expected: more calls per step than said; the
  warning (given once the step ends, with the number seen) says which ``branches`` to pass;
- the next timestep where another branch was expected: fewer calls per step than said;
- any other timestep: the list does not fit the loop (another step count, another sampler);
  from then on that key's steps are placed by the timestep they are called with (the default
  progress rule), as if ``timesteps`` had not been given.

Each mismatch gives one warning saying what was seen and what to pass, and the counter follows
what was seen; under ``strict`` it raises ``ValueError`` instead. What was learned is kept per
``(timesteps, branches)`` as said, so later generations with the same words count without
reading and without warning again.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING

from bd_compile.schedule import ProgressSchedule, progress

if TYPE_CHECKING:
    from bd_compile.keys import Generation, KeyState
    from bd_compile.loop import LoopState

log = logging.getLogger(__name__)

#: What a key said: its timestep list and branches.
Said = tuple[tuple[float, ...] | None, int]


def same_timestep(a: float, b: float) -> bool:
    """Equal up to the float precision a model's timestep tensor carries."""
    return abs(a - b) <= 1e-4 * max(1.0, abs(b))


def _fmt(ts: Sequence[float]) -> str:
    head = ", ".join(f"{t:g}" for t in ts[:3])
    return f"{len(ts)} steps: {head}{', ...' if len(ts) > 3 else ''}"


def count(
    state: LoopState, ks: KeyState, layout: Hashable, t: float | None
) -> tuple[Generation, int]:
    """Place a call of the counted key ``ks`` (``t``: its timestep when the key is being
    checked and the graph has one, else ``None``); returns the generation and the branch."""
    assert ks.timesteps is not None
    gen = ks.generation or state.begin(ks)
    new_step = gen.step < 0 or gen.calls_at_step.get(layout, 0) >= ks.branches
    if ks.checking and t is not None:
        new_step = _check(state, ks, gen, layout, t, new_step)
        if ks.timesteps is None:  # the list did not fit: placed by the timestep from now on
            return state.advance(ks, layout, t)
    if new_step:
        ts = ks.timesteps
        if gen.step + 1 >= len(ts) and not ks.explicit:
            gen = state.begin(ks)
        i = gen.step + 1
        if i < len(ts):
            gen.t0 = ts[0]
            gen.direction = 0 if len(ts) < 2 or ts[1] == ts[0] else (1 if ts[1] > ts[0] else -1)
            state.new_step(gen, ts[i])
        else:
            if not ks.warned:
                log.warning(
                    "blockdance: generation %r was given %d timesteps but called for more "
                    "steps; the extra steps compute",
                    ks.key,
                    len(ts),
                )
                ks.warned = True
            state.new_step(gen, None)
    branch = gen.calls_at_step.get(layout, 0)
    gen.calls_at_step[layout] = branch + 1
    return gen, branch


def _check(
    state: LoopState,
    ks: KeyState,
    gen: Generation,
    layout: Hashable,
    t: float,
    new_step: bool,
) -> bool:
    """Compare the call's timestep ``t`` with what counting expects (Note [Counted steps check
    themselves]); returns whether the call starts a new step, as seen."""
    ts = ks.timesteps
    assert ts is not None
    i = gen.step
    if new_step:
        expected = ts[i + 1] if i + 1 < len(ts) else (None if ks.explicit else ts[0])
    else:
        expected = ts[i]
    if expected is None or same_timestep(t, expected):
        if new_step and ks.extra_calls:
            _branches_seen(state, ks, ks.branches)
        return new_step
    if new_step and i >= 0 and gen.last_t is not None and same_timestep(t, gen.last_t):
        # one more call at the step's timestep: the loop calls the model more often per step
        if state.settings.strict:
            raise ValueError(_branches_message(ks, f"more than {ks.branches}", ks.branches + 1))
        ks.branches += 1
        ks.extra_calls = True
        return False
    if not new_step and i + 1 < len(ts) and same_timestep(t, ts[i + 1]):
        # the step ended after fewer calls than said
        _branches_seen(state, ks, gen.calls_at_step.get(layout, 0))
        return True
    _list_mismatch(state, ks, gen, i + 1 if new_step else i, t, expected)
    return new_step


def _branches_message(ks: KeyState, seen: str, fix: int) -> str:
    said = ks.said[1]
    return (
        f"blockdance: the loop calls the model {seen} time(s) per timestep, but "
        f"branches={said} was given (calls per step); pass branches={fix} "
        f"({'batched guidance, one call per step' if fix == 1 else 'sequential guidance'})"
    )


def _branches_seen(state: LoopState, ks: KeyState, calls: int) -> None:
    """The loop makes ``calls`` calls per step: warn once (or raise under strict) and count so."""
    ks.extra_calls = False
    msg = _branches_message(ks, str(calls), calls)
    if state.settings.strict:
        raise ValueError(msg)
    log.warning("%s; following the loop: %d call(s) per step", msg, calls)
    ks.branches = calls
    state.learned[ks.said] = (ks.timesteps, calls)


def _list_mismatch(
    state: LoopState, ks: KeyState, gen: Generation, i: int, t: float, expected: float
) -> None:
    """The loop's timesteps are not the list at step ``i``: warn once (or raise under strict),
    then place this key's steps by their timestep (the default progress rule)."""
    ts = ks.timesteps
    assert ts is not None
    why = ""
    if gen.step >= 0 and same_timestep(t, ts[0]):
        why = f" (the loop started again after {gen.step + 1} of the list's {len(ts)} steps)"
    elif gen.step + 1 >= len(ts):
        why = f" (the loop ran past the list's {len(ts)} steps)"
    msg = (
        f"blockdance: the loop's timesteps do not match the 'timesteps' given ({_fmt(ts)}): "
        f"step {i} was called with timestep {t:g} where the list has {expected:g}{why}; pass "
        "the model-facing timesteps of this loop (the sampler's list after set_timesteps), or "
        "leave 'timesteps' out"
    )
    if state.settings.strict:
        raise ValueError(msg)
    log.warning(
        "%s; following the loop: its steps are now placed by the timestep each call gets "
        "(the default rule, one host read per call)",
        msg,
    )
    follow_timesteps(state, ks, gen)
    state.learned[ks.said] = (None, ks.branches)


def follow_timesteps(state: LoopState, ks: KeyState, gen: Generation | None) -> None:
    """Stop counting ``ks``: its steps are read from the timestep from now on, under the
    default progress rule, continuing the running generation ``gen`` (its steps so far, which
    matched the list, replayed into the rule's window count)."""
    ts, ks.timesteps, ks.checking = ks.timesteps, None, False
    s = state.settings
    if gen is None or gen.step < 0 or ts is None:
        if gen is not None:
            gen.schedule = ProgressSchedule(s.window, s.interval)
        return
    schedule = ProgressSchedule(s.window, s.interval)
    for t in ts[: gen.step + 1]:
        schedule.step(t, progress(ts[0], t, gen.direction))
    gen.schedule = schedule


def prepare(state: LoopState, ks: KeyState) -> None:
    """A new key state: apply what this model already learned about its ``(timesteps,
    branches)``, or check its first generation (Note [Counted steps check themselves])."""
    if ks.timesteps is None:
        return
    learned = state.learned.get(ks.said)
    if learned is None:
        ks.checking = True
        return
    timesteps, ks.branches = learned
    if timesteps is None:
        follow_timesteps(state, ks, None)


def checked(state: LoopState, ks: KeyState) -> None:
    """``ks``'s generation ended: a check that found nothing to correct is remembered too."""
    gen = ks.generation
    if ks.checking and gen is not None and gen.step >= 0:
        if ks.extra_calls:  # the last step's calls are all the loop made
            _branches_seen(state, ks, max(gen.calls_at_step.values(), default=ks.branches))
        state.learned.setdefault(ks.said, (ks.timesteps, ks.branches))
        ks.checking = False
