"""The figures of ``benchmarks.quality``'s report: the speed/quality Pareto plot and the grid of
the same seeds under every method. matplotlib is optional (the ``bench`` extra) and imported
inside each function: only the PNGs need it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.quality.verdicts import FAMILY_LABEL, REAL_FLOOR, Entry

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


def pareto_plot(groups: dict[str, list[Entry]], measured: bool, path: Path) -> None:
    import matplotlib  # optional (the ``bench`` extra): only the PNGs need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): no GUI backend

    scenarios = list(groups)
    fig, axes = plt.subplots(2, len(scenarios), figsize=(6.5 * len(scenarios), 9), squeeze=False)
    for col, sc in enumerate(scenarios):
        entries = groups[sc]
        by_name = {e.name: e for e in entries}
        for row, (metric, label) in enumerate(
            (
                ("ssim", "SSIM vs full output (higher: closer)"),
                ("fid", "FID vs training images (lower: better)"),
            )
        ):
            ax = axes[row][col]
            for fam, (marker, color) in MARKERS.items():
                pts = [
                    e
                    for e in entries
                    if e.family == fam and e.q and not math.isnan(e.speed(measured))
                ]
                if not pts:
                    continue
                xs = [e.speed(measured) for e in pts]
                ys = [e.get(metric) for e in pts]
                err = [
                    0.0 if math.isnan(e.get(f"{metric}_se")) else e.get(f"{metric}_se") for e in pts
                ]
                ax.errorbar(
                    xs,
                    ys,
                    yerr=err,
                    fmt=marker,
                    color=color,
                    capsize=3,
                    ms=7,
                    label=FAMILY_LABEL[fam],
                    linestyle="none",
                )
                for e, x, y in zip(pts, xs, ys, strict=True):
                    if fam != "full":
                        ax.annotate(
                            _short(e.name),
                            (x, y),
                            fontsize=6,
                            xytext=(3, 3),
                            textcoords="offset points",
                        )
            other = by_name.get("full, other seeds")
            real = by_name.get(REAL_FLOOR) or by_name.get("real held-out digits")
            if metric == "ssim" and other is not None:
                ax.axhline(
                    other.get("ssim"), ls="--", color="gray", lw=1, label="floor: full, other seed"
                )
            if metric == "fid" and real is not None:
                ax.axhline(
                    real.get("fid"), ls="--", color="gray", lw=1, label="floor: real held-out"
                )
            ys_all = [e.get(metric) for e in entries if e.q and not math.isnan(e.get(metric))]
            if metric == "fid" and ys_all and min(ys_all) > 0 and max(ys_all) / min(ys_all) > 20:
                ax.set_yscale("log")
            ax.set_title(f"{sc}")
            ax.set_xlabel(
                "speedup over plain inductor (CPU, measured)" if measured else "FLOP-bound speedup"
            )
            ax.set_ylabel(label)
            ax.grid(True, alpha=0.3)
            if row == 0 and col == 0:
                ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
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
