"""What the quality benchmark runs: scenarios, methods, their planned reuse and FLOP bounds.

``plan_methods`` lists every method of one scenario (``full`` first, step reduction matched to
the caching methods' FLOP-bound speedups); ``Setup`` carries the parsed command line.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import bd_compile
from bd_compile import default_cache_block
from bd_compile.analysis.calibration import Calibration
from bd_compile.sampling import load_reference, make_scheduler
from benchmarks.common import flop_bound_speedup, region_flop_fraction
from benchmarks.reference import load_dataset_classifier

#: Seed offset of the "different seed" floor: sample i uses seed + OTHER_SEED_OFFSET + i.
OTHER_SEED_OFFSET = 1_000_000
#: Samples per method kept for the side-by-side grid (labels 0..9: one per class).
GRID_SAMPLES = 10
#: PSNR of identical images is infinite; per-sample values are capped here.
PSNR_CAP_DB = 100.0
FAMILIES = (
    "full", "blockdance", "forecast", "calibrated", "ada", "deepcache", "steps", "fbc", "floor",
)  # fmt: skip


@dataclass(frozen=True)
class Scenario:
    key: str  # "ddim" | "dpm": the sampler
    steps: int

    @property
    def name(self) -> str:
        return f"{'DDIM' if self.key == 'ddim' else 'DPM-Solver++'} {self.steps}"


@dataclass(frozen=True)
class Method:
    """One way of sampling a scenario. ``engine`` says which model object runs it:

    ``plain`` (all blocks: the BlockDance-compiled model at interval 1 in the quality part, plain
    inductor in the speed part), ``bd`` (BlockDance at the default cache block, schedule or
    BlockDance-Ada ``policy`` set per generation), ``deepcache`` and ``calibrated`` (their own
    compiles), ``fbc`` (eager model with diffusers' FirstBlockCache hook), ``eager`` (speed part
    only).
    """

    name: str
    family: str
    engine: str
    steps: int
    interval: int = 1
    window: tuple[float, float] = (0.0, 1.0)
    cache_block: int | None = None
    threshold: float | None = None
    planned_reuse: int | None = None  # reuse calls per generation the schedule plans (not Ada)
    flop_fraction: float = 0.0  # FLOP share of the blocks a reuse call skips
    matches: str = ""  # step reduction / FirstBlockCache: the settings it was matched to
    target_speedup: float | None = None
    forecast: int = 0  # the backend's ``forecast`` option (0: the paper's copy)
    policy: str | None = None  # the backend's ``policy`` option (BlockDance-Ada)

    def flop_bound(self, calls: int, reuse: float) -> float:
        """Speedup if a reuse call cost exactly ``1 - flop_fraction`` of a full call; for step
        reduction, ``S / S'`` against the scenario's ``calls = S``."""
        if self.family == "steps":
            return calls / self.steps
        return flop_bound_speedup(calls, reuse, self.flop_fraction)


@dataclass
class Fractions:
    """FLOP share of one forward spent in the blocks each caching method skips."""

    bd: float
    deepcache: float
    fbc: float
    calibrated: float | None


@dataclass
class Setup:
    args: argparse.Namespace
    scenarios: tuple[Scenario, ...]
    stem: str
    results: Path
    intervals: tuple[int, ...]
    windows: tuple[tuple[float, float], ...]
    calibration: Calibration | None
    calibration_path: str | None = None
    #: ``forecast`` orders run at ``intervals`` on the first window (default cache block)
    forecasts: tuple[int, ...] = ()
    #: intervals of the calibrated (deep cache block) method; forecasts run there too
    calibrated_intervals: tuple[int, ...] = (2,)
    #: BlockDance-Ada policies (name, path) for the model at the default cache block
    policies: tuple[tuple[str, str], ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def path(self, name: str, suffix: str) -> Path:
        return self.results / f"{name}{self.stem}{suffix}"

    def calibration_meta(self) -> dict[str, Any] | None:
        """The calibration as the results' JSON records it."""
        c = self.calibration
        if c is None:
            return None
        return {"path": self.calibration_path, "cache_block": c.cache_block, "window": c.window}


def command_line() -> str:
    """The command that made the results (recorded in their JSON)."""
    return "python -m benchmarks.quality " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def fmt_window(w: tuple[float, float]) -> str:
    return f"{w[0]:.0%}-{w[1]:.0%}"


def load_model(path: Path, device: torch.device) -> tuple[Any, Any]:
    """The saved DiT and its training scheduler (``bd_compile.sampling.load_reference``)."""
    try:
        return load_reference(path, device)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"--model: {e}") from e


@dataclass
class Dataset:
    """What the metrics need of a reference data set: its classifier (``features`` for FID,
    logits for accuracy), train/held-out split, and the uint8 conversion of the sample grid."""

    classifier: Any
    split: Any
    to_uint8: Callable[[torch.Tensor], Any]


def load_dataset(name: str, classifier: Path, data: Path | None, device: torch.device) -> Dataset:
    """``mnist`` (28x28 digits) or ``colour`` (32x32 RGB emoji, benchmarks/reference/colour)."""
    clf = load_dataset_classifier(name, classifier, device)  # raises for another name
    if name == "mnist":
        from benchmarks.reference.data import load_split, tensor_to_uint8

        return Dataset(clf, load_split(data), tensor_to_uint8)
    from benchmarks.reference.colour import data as colour_data

    return Dataset(clf, colour_data.load_colour_split(data), colour_data.tensor_to_uint8)


def image_shape(model: Any) -> tuple[int, int, int]:
    """(channels, height, width) of the saved DiT's samples."""
    c = model.config
    return c.in_channels, c.sample_size, c.sample_size


def num_classes(model: Any) -> int:
    """The DiT's classes; its null class (guidance) is this number."""
    return int(model.config.num_embeds_ada_norm)


def example_kwargs(model: Any) -> dict[str, torch.Tensor]:
    """One batched-CFG call at t = 500 (class 1 and the null class), on the model's device."""
    device = next(model.parameters()).device
    return {
        "hidden_states": torch.randn(2, *image_shape(model), device=device),
        "timestep": torch.tensor([500, 500], device=device),
        "class_labels": torch.tensor([1, num_classes(model)], device=device),
    }


def seeded_inputs(ids: Sequence[int], seed: int, model: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """For each sample index ``i``: label ``i % classes`` and initial noise drawn from seed
    ``seed + i`` (so a sample's noise does not depend on how samples are batched)."""
    labels = torch.tensor([i % num_classes(model) for i in ids], dtype=torch.int64)
    shape = image_shape(model)
    noise = torch.stack(
        [torch.randn(*shape, generator=torch.Generator().manual_seed(seed + i)) for i in ids]
    )
    return labels, noise


def fixed_inputs(n: int, seed: int, model: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples ``0..n-1`` of :func:`seeded_inputs`."""
    return seeded_inputs(range(n), seed, model)


def timesteps_of(train_config: Any, sc: Scenario, steps: int) -> list[float]:
    sched = make_scheduler(train_config, sc.key)
    sched.set_timesteps(steps)
    return [float(t) for t in sched.timesteps]


def planned_reuse(timesteps: Sequence[float], interval: int, window: tuple[float, float]) -> int:
    """Reuse calls of one generation under the backend's default schedule (the first step never
    reuses: there is no cache yet)."""
    flags = bd_compile.plan(timesteps, interval=interval, window=window)
    return sum(flags[1:])


def flop_fractions(model: Any, calib: Calibration | None) -> Fractions:
    n = len(model.transformer_blocks)
    kwargs = example_kwargs(model)
    paths = [f"transformer_blocks.{i}" for i in range(n)]

    def frac(lo: int, hi: int) -> float:
        return region_flop_fraction(model, kwargs, paths[lo : hi + 1])

    return Fractions(
        bd=frac(0, default_cache_block(n)),
        deepcache=frac(0, n // 2 - 1),
        fbc=frac(1, n - 1),
        calibrated=frac(0, calib.cache_block) if calib else None,
    )


def plan_methods(
    setup: Setup,
    sc: Scenario,
    num_blocks: int,
    timesteps: Sequence[float],
    fr: Fractions,
    fbc_thresholds: Sequence[float],
) -> list[Method]:
    """Every method of one scenario, ``full`` first; step reduction matched to the FLOP bounds."""
    s = sc.steps
    cb = default_cache_block(num_blocks)
    methods = [Method("full", "full", "plain", s, planned_reuse=0)]
    cached: list[Method] = []
    for f in (0, *setup.forecasts):  # the copy at every window, forecasts at the first
        for window in setup.windows if f == 0 else setup.windows[:1]:
            for n in setup.intervals:
                cached.append(
                    Method(
                        f"BlockDance{f'+forecast {f}' if f else ''} N={n} {fmt_window(window)}",
                        "forecast" if f else "blockdance",
                        "bd",
                        s,
                        n,
                        window,
                        cb,
                        planned_reuse=planned_reuse(timesteps, n, window),
                        flop_fraction=fr.bd,
                        forecast=f,
                    )
                )
    if setup.calibration is not None and fr.calibrated is not None:
        c = setup.calibration
        for f in (0, *setup.forecasts):
            for n in setup.calibrated_intervals:
                extra = f" +forecast {f}" if f else ""
                cached.append(
                    Method(
                        f"BlockDance calibrated (0-{c.cache_block}, {fmt_window(c.window)}, "
                        f"N={n}){extra}",
                        "calibrated",
                        "calibrated",
                        s,
                        n,
                        c.window,
                        c.cache_block,
                        planned_reuse=planned_reuse(timesteps, n, c.window),
                        flop_fraction=fr.calibrated,
                        forecast=f,
                    )
                )
    dc_block = num_blocks // 2 - 1
    cached.append(
        Method(
            f"DeepCache-style (0-{dc_block}, N=2, 0-100%)",
            "deepcache",
            "deepcache",
            s,
            2,
            (0.0, 1.0),
            dc_block,
            planned_reuse=planned_reuse(timesteps, 2, (0.0, 1.0)),
            flop_fraction=fr.deepcache,
        )
    )
    methods += cached
    for name, path in setup.policies:  # per-sample reuse: no step reduction matched to it
        methods.append(
            Method(f"Ada {name}", "ada", "bd", s, cache_block=cb, flop_fraction=fr.bd, policy=path)
        )
    matched: dict[int, list[Method]] = {}
    for m in cached:
        reduced = round(s / m.flop_bound(s, m.planned_reuse or 0))
        if 1 <= reduced < s:
            matched.setdefault(reduced, []).append(m)
    matched.setdefault(s // 2, [])  # half the steps: the reference point
    for reduced in sorted(matched, reverse=True):
        targets = matched[reduced]
        methods.append(
            Method(
                f"{reduced} steps",
                "steps",
                "plain",
                reduced,
                planned_reuse=0,
                matches="; ".join(t.name for t in targets) or "half the steps",
                target_speedup=s / reduced,
            )
        )
    for thr in fbc_thresholds:
        methods.append(
            Method(
                f"FirstBlockCache {thr:.4g}",
                "fbc",
                "fbc",
                s,
                threshold=thr,
                flop_fraction=fr.fbc,
                cache_block=num_blocks - 1,
            )
        )
    return methods
