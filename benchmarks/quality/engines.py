"""The model objects the quality benchmark's methods run on, and one generation of a method."""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

import bd_compile  # registers the backend where no entry point is installed
from benchmarks.common import log
from benchmarks.quality.fbc import FirstBlockCacheModel
from benchmarks.quality.plan import Method, Scenario, num_classes
from benchmarks.reference.sampling import make_sampler, sample


class Engines:
    """The model objects the methods run on, built lazily, one ``deepcopy`` each.

    Each compiled model is its own copy because ``bd_compile.runtimes_of`` finds a model's
    runtimes by its parameters: two compiles of one module would share ``set_schedule``.
    """

    def __init__(
        self, model: Any, train_config: Any, inner: str, calibration: str | None, part: str
    ) -> None:
        self.model, self.train_config, self.inner = model, train_config, inner
        self.calibration = calibration  # path of the calibration file, if any
        self.part = part
        self.null_class = num_classes(model)
        self._compiled: dict[str, Any] = {}
        self._fbc: dict[float, FirstBlockCacheModel] = {}

    # -- compiled models --
    def _options(self, engine: str) -> dict[str, Any]:
        base: dict[str, Any] = {"strict": True, "inner": self.inner}
        if engine in ("bd", "plain"):
            return {**base, "interval": 1}
        if engine == "deepcache":
            n = len(self.model.transformer_blocks)
            return {**base, "cache_block": n // 2 - 1, "interval": 2, "window": (0.0, 1.0)}
        if engine == "calibrated":
            assert self.calibration is not None
            return {**base, "calibration": self.calibration}
        raise AssertionError(engine)

    def compiled(self, engine: str) -> Any:
        if self.part == "quality" and engine == "plain":
            engine = "bd"  # all blocks through the same compiled graphs as BlockDance
        if engine not in self._compiled:
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

    def _fbc_model(self, threshold: float) -> FirstBlockCacheModel:
        if threshold not in self._fbc:
            self._fbc[threshold] = FirstBlockCacheModel(self.model, threshold)
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
    ) -> tuple[torch.Tensor, float, int, str]:
        """Sample one batch with method ``m``: images, reuse calls, calls, C/R pattern.

        For a BlockDance-Ada policy the reuse calls are the mean over samples of the calls the
        sample's rows reused (its decisions differ per sample); the pattern is the first
        sample's."""
        scheduler = make_sampler(self.train_config, sc.key)  # type: ignore[arg-type]
        if m.engine == "fbc":
            assert m.threshold is not None
            fbc = self._fbc_model(m.threshold)
            return fbc.generate(scheduler, labels, noise, m.steps, guidance)
        model = self.compiled(m.engine)

        def denoise(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return model(x, timestep=t, class_labels=y, return_dict=False)[0]

        traced = m.engine in ("bd", "deepcache", "calibrated") or (
            self.part == "quality" and m.engine == "plain"
        )
        if traced:
            if not bd_compile.runtimes_of(model):
                self._warm_up(denoise, sc, labels, noise, guidance)
            if m.engine in ("bd", "plain", "calibrated"):
                bd_compile.set_schedule(
                    model,
                    interval=m.interval,
                    window=m.window,
                    forecast=m.forecast,
                    policy=m.policy,
                )
            bd_compile.reset(model)
        images = sample(
            denoise, scheduler, labels, m.steps, guidance, noise=noise, null_class=self.null_class
        )
        if not traced:
            return images, 0, m.steps, ""
        last = bd_compile.stats(model).last
        if m.policy is not None:
            if not last.samples:
                raise RuntimeError(f"{m.name}: the policy made no decision (did it fall back?)")
            reuse = statistics.fmean(s.count("R") for s in last.samples)
            return images, reuse, last.calls, last.samples[0]
        return images, last.reused_calls, last.calls, last.pattern

    def _warm_up(
        self,
        denoise: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
        sc: Scenario,
        labels: torch.Tensor,
        noise: torch.Tensor,
        guidance: float,
    ) -> None:
        """One step at the generation's shapes so that the backend has compiled (and
        ``set_schedule`` has a runtime to act on); ``reset`` afterwards forgets it."""
        scheduler = make_sampler(self.train_config, sc.key)  # type: ignore[arg-type]
        sample(denoise, scheduler, labels, 1, guidance, noise=noise, null_class=self.null_class)


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
    reuses: list[float] = []
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
