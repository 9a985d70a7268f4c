"""The figures of ``benchmarks.quality``'s report: the speed/quality Pareto plot and the grid of
the same seeds under every method. matplotlib is optional (the ``bench`` extra) and imported
inside each function: only the PNGs need it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.quality.verdicts import FAMILY_LABEL, Entry, pareto_front

MARKERS = {
    "full": ("*", "black"),
    "blockdance": ("o", "tab:blue"),
    "forecast": ("v", "tab:orange"),
    "calibrated": ("P", "tab:cyan"),
    "ada": ("X", "tab:olive"),
    "deepcache": ("s", "tab:red"),
    "steps": ("^", "tab:green"),
    "fbc": ("D", "tab:purple"),
}


def _short(name: str) -> str:
    return (
        name.replace("BlockDance ", "")
        .replace("FirstBlockCache ", "FBC ")
        .replace("DeepCache-style ", "DC ")
        .replace("calibrated ", "cal ")
    )


def plotted(entries: list[Entry], measured: bool) -> list[Entry]:
    """The points of a Pareto panel: every method with a speed and a finite PSNR (not the full
    output itself, identical to itself, nor the floors)."""
    return [
        e
        for e in entries
        if e.family in MARKERS
        and e.family != "full"
        and e.q
        and not math.isnan(e.speed(measured))
        and math.isfinite(e.get("psnr"))
        and e.get("psnr") < 99.99  # "identical" rows
    ]


def pareto_plot(
    groups: dict[str, list[Entry]], measured: bool, path: Path, title: str = ""
) -> None:
    """One panel per sampler: speedup on x, PSNR to the full output on y (± its standard error),
    one marker per method family in one legend; only the Pareto front is labelled, by number
    with a key under its panel (the other rows are in the report's table), the other-seed floor
    dashed, full at 1x dotted."""
    import matplotlib  # optional (the ``bench`` extra): only the PNGs need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): no GUI backend

    fig, axes = plt.subplots(1, len(groups), figsize=(7 * len(groups), 5.5), squeeze=False)
    for ax, (sc, entries) in zip(axes[0], groups.items(), strict=True):
        pts = plotted(entries, measured)
        for fam, (marker, color) in MARKERS.items():
            mine = [e for e in pts if e.family == fam]
            if not mine:
                continue
            ax.errorbar(
                [e.speed(measured) for e in mine],
                [e.get("psnr") for e in mine],
                yerr=[0.0 if math.isnan(se := e.get("psnr_se")) else se for e in mine],
                fmt=marker,
                color=color,
                capsize=2,
                ms=6,
                alpha=0.85,
                label=FAMILY_LABEL[fam],
                linestyle="none",
            )
        front = pareto_front(pts, measured, "psnr")
        xs, ys = [e.speed(measured) for e in front], [e.get("psnr") for e in front]
        ax.plot(xs, ys, color="grey", lw=0.8, zorder=0, label="Pareto front (numbered)")
        for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
            ax.annotate(
                str(i + 1),
                (x, y),
                textcoords="offset points",
                xytext=(5, 5 if i % 2 else -12),  # alternate sides: neighbours do not overlap
                fontsize=8,
            )
        key = [
            f"{i + 1}: {_short(e.name)} ({e.speed(measured):.2f}x, {e.get('psnr'):.1f} dB)"
            for i, e in enumerate(front)
        ]
        ax.text(0, -0.13, "\n".join(key), transform=ax.transAxes, va="top", fontsize=7)
        other = next((e for e in entries if e.name == "full, other seeds"), None)
        if other is not None and math.isfinite(other.get("psnr")):
            ax.axhline(
                other.get("psnr"), ls="--", color="gray", lw=1, label="floor: full, other seed"
            )
        ax.axvline(1.0, color="black", lw=0.5, ls=":")
        ax.set_title(sc)
        ax.set_xlabel(
            "speedup over plain inductor (CPU, measured)" if measured else "FLOP-bound speedup"
        )
        ax.set_ylabel("PSNR vs full output (dB, higher: closer)")
        ax.grid(True, alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:  # a family missing from the first panel
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles.append(h)
                labels.append(label)
    fig.legend(handles, labels, loc="upper center", ncol=5, fontsize=8, bbox_to_anchor=(0.5, 0.0))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # with the keys and legend below
    plt.close(fig)


def grid_plot(samples: Any, groups: dict[str, list[Entry]], path: Path) -> None:
    """Rows: methods; columns: the first seeds (one per class); one panel per scenario."""
    import matplotlib  # optional (the ``bench`` extra): only the PNGs need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): no GUI backend

    panels = []
    for sc, entries in groups.items():
        names = [e.name for e in entries if f"{sc}|{e.name}" in samples]
        if names:
            panels.append((sc, names))
    if not panels:
        return
    rows = max(len(n) for _, n in panels)
    cols = max(np.asarray(samples[f"{sc}|{names[0]}"]).shape[0] for sc, names in panels)
    pad = 2
    # Size the figure to the canvas (0.3 inch per digit) plus room for the method names.
    fig, axes = plt.subplots(
        1,
        len(panels),
        figsize=(len(panels) * (0.3 * cols + 2.6), 0.3 * rows + 0.8),
        squeeze=False,
    )
    for ax, (sc, names) in zip(axes[0], panels, strict=True):
        imgs = [np.asarray(samples[f"{sc}|{n}"]) for n in names]
        h, w = imgs[0].shape[1:3]  # [N, H, W] grey or [N, H, W, 3] colour
        cell = h + pad
        extra = imgs[0].shape[3:]
        canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, *extra), 255, np.uint8)
        for r, im in enumerate(imgs):
            for c in range(im.shape[0]):
                top, left = pad + r * (h + pad), pad + c * (w + pad)
                canvas[top : top + h, left : left + w] = im[c]
        ax.imshow(canvas, cmap="gray", vmin=0, vmax=255)
        ax.set_yticks([pad + r * cell + h / 2 for r in range(len(names))])
        ax.set_yticklabels(names, fontsize=7)
        ax.set_xticks([pad + c * cell + w / 2 for c in range(cols)])
        labels = samples["labels"] if "labels" in samples else range(cols)
        ax.set_xticklabels([str(int(v)) for v in labels][:cols], fontsize=7)
        ax.set_title(f"{sc} (columns: seeds, labelled by class)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
