"""The human-readable side of an analysis: the plain-English summary and the figures.

The figures use matplotlib's object API (no pyplot state, no GUI backend); matplotlib is
optional (the ``analysis`` extra) and imported only when a figure is drawn.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bd_compile.analysis.calibration import DEFAULT_THRESHOLD, Calibration

if TYPE_CHECKING:
    from bd_compile.analysis.result import Analysis

log = logging.getLogger(__name__)


def _span(first: int, last: int) -> str:
    return f"block {first}" if first == last else f"blocks {first}-{last}"


def summary(result: Analysis, calibration: Calibration | None = None) -> str:
    """One plain-English paragraph: is there an STSS pattern, where, what calibration picks."""
    L, S = result.num_blocks, result.num_steps
    late = int(math.ceil(0.4 * S))
    split = max(1, min(L - 1, round(0.75 * L)))
    cos = result.cosine

    def mean(a: np.ndarray) -> float:
        a = a[np.isfinite(a)]
        return float(a.mean()) if a.size else math.nan

    early_c, late_c = mean(cos[:, 1:late]), mean(cos[:, late:])
    shallow_late, deep_late = mean(cos[:split, late:]), mean(cos[split:, late:])
    shallow_early = mean(cos[:split, 1:late])
    per_block = [mean(cos[k, late:]) for k in range(L)]
    order = sorted(range(L), key=lambda k: -per_block[k] if math.isfinite(per_block[k]) else 0)
    top = ", ".join(f"{k} ({per_block[k]:.4f})" for k in order[:3])
    per_step = [mean(cos[:, s]) for s in range(S)]
    best_steps = sorted(
        (s for s in range(1, S) if math.isfinite(per_step[s])), key=lambda s: -per_step[s]
    )[:3]
    stss = late_c > early_c and shallow_late >= deep_late
    parts = [
        f"{result.model}: {L} blocks, {S} steps ({result.meta.get('scheduler', '?')}, guidance "
        f"{result.meta.get('guidance_scale', '?')}).",
        (
            "There is an STSS pattern: adjacent steps are more similar in the later part of "
            "denoising than early on, and shallow/middle blocks more than deep ones."
            if stss
            else "The STSS pattern is weak or absent here: "
            + (
                "late steps are not more similar than early ones"
                if late_c <= early_c
                else "the deep blocks are as stable as the shallow/middle ones"
            )
            + "."
        ),
        f"Mean adjacent-step cosine similarity is {early_c:.4f} before 40% of the steps and "
        f"{late_c:.4f} after; after 40%, {_span(0, split - 1)} (shallow/middle) average "
        f"{shallow_late:.4f} (vs {shallow_early:.4f} before) and {_span(split, L - 1)} "
        f"(deep) {deep_late:.4f}.",
        f"The most similar blocks after 40% are {top}; the most similar steps "
        f"(mean over blocks) are {', '.join(str(s) for s in best_steps)}.",
    ]
    finite_ssim = result.x0_ssim[np.isfinite(result.x0_ssim)]
    if finite_ssim.size:
        parts.append(
            f"The SSIM of adjacent steps' predicted x0 goes from {finite_ssim[0]:.3f} "
            f"(step 1) to {finite_ssim[-1]:.3f} (last step), first reaching 0.9 at step "
            f"{next((i + 1 for i, v in enumerate(finite_ssim) if v >= 0.9), 'never')}."
        )
    thr = calibration.threshold if calibration is not None else DEFAULT_THRESHOLD

    def share(a: np.ndarray) -> str:
        a = a[np.isfinite(a)]
        return f"{(a >= thr).mean():.0%}" if a.size else "n/a"

    parts.append(
        f"Do the shallow/middle blocks stabilise after ~40% of the steps? "
        f"{share(cos[:split, late:])} of their adjacent-step similarities there are >= "
        f"{thr} (before 40%: {share(cos[:split, 1:late])}; deep blocks after 40%: "
        f"{share(cos[split:, late:])})."
    )
    if calibration is not None:
        c = calibration
        rule = f"cosine >= {c.threshold}"
        if getattr(c, "structure_threshold", None) is not None:
            rule += f" and x0 SSIM >= {c.structure_threshold}"
        if c.window[0] >= c.window[1]:
            parts.append(
                f"Calibration ({rule}) found no block and no stretch of steps stable enough "
                "to reuse: it picks an empty window (no reuse steps)."
            )
        else:
            parts.append(
                f"Calibration ({rule} up to {c.window[1]:.0%} of the steps) picks "
                f"cache_block = {c.cache_block} ({result.block_names[c.cache_block]}: "
                f"{_span(0, c.cache_block)} skipped on reuse steps) with window "
                f"{c.window[0]:.2f}-{c.window[1]:.2f}."
            )
    return " ".join(parts)


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def plot(a: Analysis, out: Path) -> dict[str, Path]:
    """Write the block x step heatmaps, the chosen block's step x step matrix and the x0 SSIM
    curve as PNGs into ``out``; return their paths. Raises ``ImportError`` without matplotlib."""
    try:
        from matplotlib.figure import Figure  # optional dependency (the ``analysis`` extra)
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the analysis figures need matplotlib: pip install matplotlib") from e

    paths: dict[str, Path] = {}
    L, S = a.num_blocks, a.num_steps
    labels = [f"{k} {n}" if L <= 40 else str(k) for k, n in enumerate(a.block_names)]

    def heatmap(data: np.ndarray, title: str, bar: str, name: str, cmap: str) -> None:
        fig = Figure(figsize=(max(6.0, 0.18 * S + 3), max(3.5, 0.25 * L + 1.5)), dpi=110)
        ax = fig.subplots()
        finite = data[:, 1:][np.isfinite(data[:, 1:])]
        vmin = float(finite.min()) if finite.size else 0.0
        vmax = float(finite.max()) if finite.size else 1.0
        im = ax.imshow(
            np.ma.masked_invalid(data),
            aspect="auto",
            origin="lower",
            cmap=cmap,
            vmin=vmin,
            vmax=vmax,
            interpolation="nearest",
        )
        ax.set_xlabel("denoising step s (compared with step s-1)")
        ax.set_ylabel("block (execution order)")
        ax.set_yticks(range(L), labels, fontsize=6 if L > 16 else 8)
        ax.set_title(title)
        fig.colorbar(im, ax=ax, label=bar)
        fig.tight_layout()
        paths[name] = out / f"{name}.png"
        fig.savefig(paths[name])

    heatmap(
        a.cosine,
        f"{a.model}: cosine similarity to the previous step",
        "cosine similarity",
        "block_step_cosine",
        "viridis",
    )
    heatmap(
        a.rel_l2,
        f"{a.model}: relative L2 distance to the previous step",
        "|a - b| / |b|",
        "block_step_rel_l2",
        "magma_r",
    )

    fig = Figure(figsize=(5.5, 4.5), dpi=110)
    ax = fig.subplots()
    im = ax.imshow(
        np.ma.masked_invalid(a.step_cosine), origin="upper", cmap="viridis", interpolation="nearest"
    )
    ax.set_xlabel("step")
    ax.set_ylabel("step")
    ax.set_title(
        f"block {a.chosen_block} ({a.block_names[a.chosen_block]}): step x step cosine", fontsize=9
    )
    fig.colorbar(im, ax=ax, label="cosine similarity")
    fig.tight_layout()
    paths["step_cosine"] = out / f"step_cosine_block{a.chosen_block}.png"
    fig.savefig(paths["step_cosine"])

    fig = Figure(figsize=(6, 3.5), dpi=110)
    ax = fig.subplots()
    ax.plot(range(S), a.x0_ssim, marker="o", markersize=3)
    ax.set_xlabel("denoising step s")
    ax.set_ylabel("SSIM(x0[s], x0[s-1])")
    ax.set_title(f"{a.model}: SSIM of adjacent steps' predicted x0")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths["x0_ssim"] = out / "x0_ssim.png"
    fig.savefig(paths["x0_ssim"])
    return paths
