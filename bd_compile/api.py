"""Public helpers on compiled models: find their runtimes, change the schedule, explain, reset.

A runtime belongs to a model when the graph it runs took that model's parameters as inputs,
so ``set_schedule(pipe.transformer, interval=3)`` works on the ``torch.compile`` wrapper or on
the original module, for every graph Dynamo made of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch._dynamo.utils import counters

from bd_compile.runtime import BlockDanceRuntime, live_runtimes

SCHEDULE_KEYS = ("interval", "window", "timesteps", "schedule")


def runtimes_of(model: torch.nn.Module | None = None) -> list[BlockDanceRuntime]:
    """The live runtimes of ``model`` (all of them if ``None``), oldest first."""
    runtimes = live_runtimes()
    if model is None:
        return runtimes
    module = getattr(model, "_orig_mod", model)
    ids = {id(p) for p in module.parameters()}
    return [r for r in runtimes if r.param_ids & ids]


def _require(model: torch.nn.Module | None) -> list[BlockDanceRuntime]:
    found = runtimes_of(model)
    if not found:
        raise ValueError(
            "expected a model compiled with backend='blockdance' and called at least once, "
            f"got {type(model).__name__ if model is not None else None} with no blockdance graph"
        )
    return found


def set_schedule(model: torch.nn.Module | None = None, **options: Any) -> None:
    """Change the schedule of a compiled model between generations, without recompiling.

    Takes the backend's schedule options (``interval``, ``window``, ``timesteps``,
    ``schedule``); the ones not given keep their current values (``timesteps`` and
    ``schedule`` replace each other). Starts a new generation. The model must have been called
    once, so that Dynamo has handed its graphs to the backend.
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
    for runtime in _require(model):
        runtime.set_settings(runtime.settings.replace(**options))


def reset(model: torch.nn.Module | None = None) -> None:
    """Drop every cache of ``model`` (all models if ``None``); the next call computes."""
    for runtime in runtimes_of(model):
        runtime.reset()


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "symbolic"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError


@dataclass
class Explanation:
    runtimes: list[BlockDanceRuntime]

    def __str__(self) -> str:
        lines: list[str] = []
        for k, r in enumerate(self.runtimes):
            lay = r.layout
            lines.append(f"graph {k}: {len(lay.blocks)} transformer blocks (execution order)")
            for i, (name, cls) in enumerate(lay.blocks):
                mark = "skipped on reuse steps" if i <= lay.cache_block else "always computed"
                lines.append(f"  [{i:2d}] {name:<36} {cls.rsplit('.', 1)[-1]:<28} {mark}")
            lines.append(f"  cache_block = {lay.cache_block}: blocks 0..{lay.cache_block} cached")
            total = 0
            for v in lay.cached:
                nb = v.nbytes
                total += nb or 0
                lines.append(
                    f"  cached value {v.name}: {list(v.shape)} {v.dtype}, {_fmt_bytes(nb)}"
                )
            lines.append(
                f"  cache per branch: {_fmt_bytes(total)}; held now: {_fmt_bytes(r.cache_bytes())}"
            )
            lines.append(f"  timestep input: {lay.timestep_input}; inner compiler: {lay.inner}")
            lines.append(f"  schedule: {r.schedule.describe()}")
            if lay.history:
                steps: dict[int, tuple[float, bool]] = {}
                for c in lay.history:
                    steps.setdefault(c.step, (c.timestep, c.reused))
                pattern = "".join("R" if reused else "C" for _, reused in steps.values())
                lines.append(
                    f"  last generation: {len(steps)} steps, {pattern.count('R')} reuse: {pattern}"
                )
        counts = counters["blockdance"]
        names = ("graphs_rewritten", "fallbacks", "cache_steps", "reuse_steps")
        lines.append("counters: " + ", ".join(f"{k}={counts[k]}" for k in names))
        return "\n".join(lines)


def explain(model: torch.nn.Module | None = None) -> Explanation:
    """What blockdance did to ``model``: blocks found, what is cached and when. ``print()`` it."""
    return Explanation(_require(model))
