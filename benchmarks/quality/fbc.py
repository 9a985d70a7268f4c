"""diffusers' FirstBlockCache as a quality-benchmark method: the hooked model, its per-call skip
flags, what Dynamo makes of it, and the threshold probe that matches it to BlockDance's speed.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch._dynamo
from diffusers.hooks import FirstBlockCacheConfig, HookRegistry, apply_first_block_cache

from benchmarks.common import log
from benchmarks.quality.plan import Method, Scenario, Setup, example_kwargs, num_classes
from benchmarks.reference.sampling import sample

if TYPE_CHECKING:
    from benchmarks.quality.engines import Engines


#: Candidate FirstBlockCache thresholds probed to match the BlockDance speedups.
FBC_GRID = (0.01, 0.02, 0.04, 0.07, 0.1, 0.15, 0.2, 0.3, 0.45, 0.7, 1.0)
FBC_GRID_QUICK = (0.02, 0.05, 0.1, 0.2, 0.4, 0.8)


class FirstBlockCacheModel:
    """A deep copy of the model with diffusers' FirstBlockCache hook at one threshold."""

    def __init__(self, model: Any, threshold: float) -> None:
        self.model = copy.deepcopy(model)
        apply_first_block_cache(self.model, FirstBlockCacheConfig(threshold=threshold))
        self.registry = HookRegistry.check_if_exists_or_initialize(self.model.transformer_blocks[0])

    def generate(
        self,
        scheduler: Any,
        labels: torch.Tensor,
        noise: torch.Tensor,
        steps: int,
        guidance: float,
    ) -> tuple[torch.Tensor, int, int, str]:
        """Sample one batch: images, skipped calls, calls, C/R pattern."""
        head = _fbc_head(self.registry)
        self.registry.reset_stateful_hooks()  # forget the previous generation (and the context)
        _set_fbc_context(head.state_manager)
        flags: list[bool] = []
        model = self.model

        def denoise(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            out = model(x, timestep=t, class_labels=y, return_dict=False)[0]
            flags.append(not head.state_manager.get_state().should_compute)
            return out

        images = sample(
            denoise,
            scheduler,
            labels,
            steps,
            guidance,
            noise=noise,
            null_class=num_classes(self.model),
        )
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
        from diffusers.hooks.hooks import CacheContext  # absent before diffusers 0.36

        state_manager.set_context(CacheContext("cfg"))
    except ImportError:
        state_manager.set_context("cfg")


def fbc_graph_breaks(model: Any) -> str:
    """What Dynamo makes of the FirstBlockCache model: graphs and graph breaks of one call."""
    hooked = FirstBlockCacheModel(model, threshold=0.1)
    fbc = hooked.model.cpu()
    _set_fbc_context(_fbc_head(hooked.registry).state_manager)
    kwargs = example_kwargs(fbc)
    try:
        with torch.no_grad():
            ex = torch._dynamo.explain(fbc)(**kwargs)
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
            m = Method(
                f"probe {thr:.4g}", "fbc", "fbc", sc.steps, threshold=thr, flop_fraction=fraction
            )
            _, reuse, calls, _ = engines.generate(m, sc, labels, noise, guidance)
            engines.drop_fbc()
            bounds[thr] = m.flop_bound(calls, reuse)
            log(
                f"  FirstBlockCache probe {sc.name}: threshold {thr:.4g} -> {reuse}/{calls} "
                f"skipped, FLOP bound {bounds[thr]:.2f}x"
            )
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


def match_blockdance(
    engines: Engines,
    setup: Setup,
    sc: Scenario,
    planned: Sequence[Method],
    labels: torch.Tensor,
    noise: torch.Tensor,
    fraction: float,
) -> tuple[list[float], dict[float, str]]:
    """FirstBlockCache thresholds matched to the FLOP-bound speedups of the BlockDance methods of
    the first window in ``planned`` (``probe_fbc_thresholds`` on ``labels``/``noise``; a
    coarser grid and fewer bisections with ``--quick``)."""
    quick = setup.args.quick
    targets = [
        (m.name, m.flop_bound(sc.steps, m.planned_reuse or 0))
        for m in planned
        if m.family == "blockdance" and m.window == setup.windows[0]
    ]
    return probe_fbc_thresholds(
        engines,
        sc,
        targets,
        labels,
        noise,
        setup.args.guidance,
        FBC_GRID_QUICK if quick else FBC_GRID,
        fraction,
        2 if quick else 4,
    )
