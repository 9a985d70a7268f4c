"""Public helpers on compiled models: stats, explain, generation, set_schedule, reset.

Every function takes the ``torch.compile`` wrapper or the original module; it acts on every
graph Dynamo made of that model (recompiles and graph-break pieces share one loop state).
"""

from __future__ import annotations

import contextlib
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch._dynamo.utils import counters

from bd_compile.keys import GenerationStats, KeyState, generation_of
from bd_compile.layout import CachedValue
from bd_compile.loop import LoopState, states_of
from bd_compile.runtime import GraphRuntime
from bd_compile.settings import Settings

SCHEDULE_KEYS = (
    "interval", "window", "timesteps", "branches", "schedule", "forecast", "policy", "policy_rows",
)  # fmt: skip

#: BlockDance-Ada's counters (shown by ``explain`` once one is non-zero)
ADA_COUNTERS = ("ada_decisions", "ada_mixed_calls", "ada_row_steps_reused")

#: A model as users hold it: the ``torch.compile`` wrapper or the module itself.
Model = torch.nn.Module | Any


def runtimes_of(model: Model | None = None) -> list[GraphRuntime]:
    """The rewritten graphs of ``model`` (of every model if ``None``), oldest first."""
    return [r for state in states_of(model) for r in state.live() if isinstance(r, GraphRuntime)]


def _require(model: Model | None) -> list[LoopState]:
    found = states_of(model)
    if not found:
        raise ValueError(
            "expected a model compiled with backend='blockdance' and called at least once, "
            f"got {type(model).__name__ if model is not None else None} with no blockdance graph"
        )
    return found


def set_schedule(model: Model | None = None, **options: Any) -> None:
    """Change the schedule of a compiled model between generations, without recompiling.

    Takes the backend's schedule options (``interval``, ``window``, ``timesteps``,
    ``branches``, ``schedule``, ``forecast``, ``policy``, ``policy_rows``); the ones not given
    keep their current values (``timesteps`` and ``schedule`` replace each other; ``branches``
    goes back to 1 with ``timesteps`` unless given; ``schedule`` and ``forecast`` clear a
    policy that is not given anew, ``policy`` clears a ``schedule``). A ``policy`` is loaded
    and checked against the model's graphs here (``ValueError`` for a missing or corrupt file;
    for another model's policy one warning and the static schedule, or ``ValueError`` under
    ``strict``). Starts a new generation. The model must have been called once, so that Dynamo
    has handed its graphs to the backend.
    """
    bad = sorted(set(options) - set(SCHEDULE_KEYS))
    if bad:
        raise ValueError(
            f"set_schedule: unknown option(s) {bad}; expected a subset of {list(SCHEDULE_KEYS)}"
        )
    if "timesteps" in options:
        options.setdefault("schedule", None)
    if "schedule" in options:
        options.setdefault("timesteps", None)
    if "timesteps" in options:
        options.setdefault("branches", 1)
    if options.get("schedule") is not None or options.get("forecast"):
        options.setdefault("policy", None)
    if options.get("policy") is not None:
        options.setdefault("schedule", None)
    recheck = "timesteps" in options or "branches" in options
    for state in _require(model):
        state.set_settings(state.settings.replace(**options), recheck)


#: ``reset``'s default key: every key
_EVERY_KEY: Any = object()


def reset(model: Model | None = None, key: Hashable = _EVERY_KEY) -> None:
    """Drop every cache and loop position of ``model`` (all models if ``None``); with ``key``,
    only that key's (e.g. a request stepped with ``generation(model, key, resume=True)``): its
    generation ends and its caches are freed."""
    for state in states_of(model):
        if key is _EVERY_KEY:
            state.reset()
        else:
            state.forget(key)


def plan(timesteps: Sequence[float], **options: Any) -> list[bool]:
    """The runtime's decisions for one generation with ``timesteps`` under the schedule options
    (``interval``, ``window``, ``timesteps``, ``schedule``): ``True`` where a step may reuse. The
    first step never has a cache to read, whatever this says."""
    bad = sorted(set(options) - set(SCHEDULE_KEYS))
    if bad:
        raise ValueError(f"plan: unknown option(s) {bad}; expected a subset of {SCHEDULE_KEYS}")
    state = LoopState(Settings().replace(**options))
    ks = KeyState(None, explicit=True)  # reads each timestep: the decisions per value
    return [state.advance(ks, "plan", float(t))[0].step_may_reuse for t in timesteps]


def generation(
    model: Model,
    key: Hashable = None,
    timesteps: Sequence[float] | torch.Tensor | None = None,
    branches: int | None = None,
    resume: bool = False,
) -> contextlib.AbstractContextManager[None]:
    """``with bd_compile.generation(model, key=..., timesteps=None):`` one explicit generation.

    Calls of ``model`` inside the block (in this thread or task: the block is a context
    variable) use the loop state of ``key``, with its own caches and counters, so requests
    interleaved on one compiled model never read each other's caches. The block is one
    generation: no boundary is inferred inside it; leaving it ends the generation and frees its
    caches. ``timesteps`` (the sampler's model-facing list) applies the paper's exact rule to
    this generation only. Blocks nest: the inner one wins, the outer resumes after it.

    With ``timesteps`` the runtime counts steps on the host and never reads the timestep
    tensor (no device-to-host sync per call; Note [Counted steps]): ``branches`` is how many
    times the loop calls the model per step (1 for batched CFG, 2 for sequential CFG; default 1).
    Without ``timesteps``, a model compiled with the ``timesteps`` option counts that list's
    steps here too (and its ``branches`` option, unless ``branches`` is given).

    ``resume=True`` is for step-level schedulers that step several requests in turn in one
    thread (one block per call or per step): calls inside continue ``key``'s loop state, and
    leaving the block does not end its generation. It ends by the automatic rules (a timestep
    moving back, the ``timesteps`` list used up) or with ``bd_compile.reset(model, key=key)``,
    which frees its caches.
    """
    if not isinstance(resume, bool):
        raise ValueError(f"bd_compile.generation: expected resume as a bool, got {resume!r}")
    try:
        hash(key)
    except TypeError:
        raise ValueError(
            f"bd_compile.generation: expected a hashable key, got {type(key).__name__} {key!r}"
        ) from None
    steps: tuple[float, ...] | None = None
    if timesteps is not None:
        values = timesteps.tolist() if isinstance(timesteps, torch.Tensor) else timesteps
        ok = isinstance(values, Sequence) and not isinstance(values, str) and len(values) > 0
        if isinstance(timesteps, torch.Tensor) and timesteps.dim() != 1:
            ok = False
        if ok and not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            ok = False
        if not ok:
            raise ValueError(
                "bd_compile.generation: expected timesteps as a non-empty 1-d sequence of "
                f"numbers, got {timesteps!r}"
            )
        steps = tuple(float(v) for v in values)
    if branches is not None and (
        isinstance(branches, bool) or not isinstance(branches, int) or branches < 1
    ):
        raise ValueError(
            f"bd_compile.generation: expected branches as an int >= 1, got {branches!r}"
        )
    if not compiled_with_blockdance(model):
        _require(model)  # raises unless the model has blockdance graphs
    return generation_of(getattr(model, "_orig_mod", model), key, steps, branches, resume)


def compiled_with_blockdance(model: Model) -> bool:
    """Whether ``model`` is a ``torch.compile`` wrapper whose backend is blockdance (called yet
    or not)."""
    obj = getattr(getattr(model, "dynamo_ctx", None), "callback", None)
    for _ in range(16):  # torch wraps the backend a few times; each wrapper keeps the one inside
        if obj is None:
            return False
        if getattr(obj, "compiler_name", None) == "blockdance":
            return True
        obj = getattr(obj, "_torchdynamo_orig_backend", None) or getattr(obj, "compiler_fn", None)
    return False


@dataclass(frozen=True)
class GraphStats:
    """One rewritten graph of a model."""

    blocks: tuple[str, ...]  #: module paths, execution order
    cache_block: int  #: last block skipped on reuse steps
    cached: tuple[CachedValue, ...]
    timestep_input: str | None


@dataclass(frozen=True)
class Stats:
    """What blockdance did to a model: ``bd_compile.stats(model)``."""

    settings: Settings
    graphs: tuple[GraphStats, ...]
    #: finished generations (the last few), then the running ones; oldest first
    generations: tuple[GenerationStats, ...]
    cache_bytes: int  #: held now

    @property
    def last(self) -> GenerationStats:
        if not self.generations:
            raise ValueError("bd_compile.stats: no generation has run on this model yet")
        return self.generations[-1]


def stats(model: Model) -> Stats:
    """A typed record of ``model``'s graphs and generations (per generation: its pattern,
    cache/reuse counts and peak cache bytes), for benchmarks and users."""
    states = _require(model)
    graphs = tuple(
        GraphStats(
            tuple(b for b, _ in lay.blocks),
            lay.cache_block,
            lay.cached,
            lay.timestep_input,
        )
        for s in states
        for lay in s.layouts()
    )
    generations = tuple(g for s in states for g in (*s.finished, *s.running()))
    return Stats(states[-1].settings, graphs, generations, sum(s.cache_bytes() for s in states))


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "symbolic (known per call)"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError


@dataclass
class Explanation:
    states: list[LoopState]

    def __str__(self) -> str:
        lines: list[str] = []
        k = 0
        for state in self.states:
            if not state.layouts():
                lines.append(
                    "no graph of this model was rewritten: each fell back to the inner compiler "
                    "unchanged (the warning says why); nothing is cached or reused"
                )
                continue
            for lay in state.layouts():
                lines.append(f"graph {k}: {len(lay.blocks)} transformer blocks (execution order)")
                k += 1
                for i, (name, cls) in enumerate(lay.blocks):
                    mark = "skipped on reuse steps" if i <= lay.cache_block else "always computed"
                    lines.append(f"  [{i:2d}] {name:<36} {cls.rsplit('.', 1)[-1]:<28} {mark}")
                lines.append(
                    f"  cache_block = {lay.cache_block}: blocks 0..{lay.cache_block} cached"
                )
                sizes = [v.nbytes for v in lay.cached]
                for v, nb in zip(lay.cached, sizes, strict=True):
                    kind = f"{list(v.shape)} {v.dtype}" if v.dtype is not None else "a number"
                    lines.append(f"  cached value {v.name}: {kind}, {_fmt_bytes(nb)}")
                total = None if None in sizes else sum(s or 0 for s in sizes)
                k = state.settings.forecast
                held = ""
                if total is not None and k:
                    held = f" (forecast {k}: {k + 1} caches per branch, "
                    held += f"{_fmt_bytes((k + 1) * total)})"
                lines.append(f"  cache per branch: {_fmt_bytes(total)}{held}")
                source = lay.timestep_input or "none (follows the model's other graphs)"
                lines.append(f"  timestep input: {source}; inner compiler: {lay.inner}")
            lines.append(f"  schedule: {state.describe()}")
            lines.append(f"  caches held now: {_fmt_bytes(state.cache_bytes())}")
            gens = (*state.finished, *state.running())
            if gens:
                g = gens[-1]
                key = "" if g.key is None else f" (key {g.key!r})"
                lines.append(
                    f"  last generation{key}: {g.steps} steps, {g.reuse_steps} reuse: {g.pattern}"
                )
                for i, p in enumerate(g.samples):
                    lines.append(f"    sample {i}: {p.count('R')} reuse: {p}")
        counts = counters["blockdance"]
        names: tuple[str, ...] = ("graphs_rewritten", "fallbacks", "cache_steps", "reuse_steps")
        if any(counts[k] for k in ADA_COUNTERS):
            names += ADA_COUNTERS
        lines.append("counters: " + ", ".join(f"{k}={counts[k]}" for k in names))
        return "\n".join(lines)


def explain(model: Model | None = None) -> Explanation:
    """What blockdance did to ``model``: blocks found, what is cached and when; its ``str`` is
    the report."""
    return Explanation(_require(model))
