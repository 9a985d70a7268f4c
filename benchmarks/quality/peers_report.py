"""The report of ``benchmarks.quality.peers``: per sampler, which method is closest to the full
output in each measured speed band, and whether BlockDance's best is ahead of each peer's best at
equal or higher measured speed. Every sentence is computed from ``results/peers-<dataset>.csv``.

    python -m benchmarks.quality.peers --dataset mnist --part report
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

from benchmarks.quality.verdicts import SIGNIFICANCE

#: Measured-speed bands (speedup over plain inductor, same process): [lo, hi).
BANDS = ((0.0, 0.8), (0.8, 1.0), (1.0, 1.2), (1.2, 1.4), (1.4, 1.7), (1.7, math.inf))
PEER_FAMILIES = ("cache-dit", "cache-dit-compiled", "taylorseer", "magcache")
FAMILY_LABEL = {
    "full": "full",
    "blockdance": "BlockDance",
    "cache-dit": "cache-dit (eager)",
    "cache-dit-compiled": "cache-dit + torch.compile",
    "taylorseer": "diffusers TaylorSeer",
    "magcache": "diffusers MagCache",
}
COLOURS = {
    "full": "black",
    "blockdance": "tab:red",
    "cache-dit": "tab:blue",
    "cache-dit-compiled": "tab:cyan",
    "taylorseer": "tab:green",
    "magcache": "tab:purple",
}
MARKERS = {
    "full": "*",
    "blockdance": "o",
    "cache-dit": "s",
    "cache-dit-compiled": "D",
    "taylorseer": "^",
    "magcache": "v",
}


@dataclass
class Row:
    scenario: str
    family: str
    method: str
    status: str
    computed: float
    speed: float  # speedup over full (inductor), measured
    psnr: float
    psnr_se: float
    ssim: float
    fid: float
    accuracy: float
    time_s: float


def read_rows(path: Path) -> list[Row]:
    with open(path) as f:
        return [
            Row(
                r["scenario"],
                r["family"],
                r["method"],
                r["status"],
                float(r["computed_fraction"]),
                float(r["speedup_vs_inductor"]),
                float(r["psnr"]),
                float(r["psnr_se"]),
                float(r["ssim"]),
                float(r["fid"]),
                float(r["accuracy"]),
                float(r["gen_time_s"]),
            )
            for r in csv.DictReader(f)
        ]


def _ahead(a: Row, b: Row) -> int:
    """+1 / -1: ``a``'s PSNR more than SIGNIFICANCE combined standard errors above / below
    ``b``'s; 0: within the noise."""
    se = math.sqrt(a.psnr_se**2 + b.psnr_se**2)
    if abs(a.psnr - b.psnr) <= SIGNIFICANCE * se:
        return 0
    return 1 if a.psnr > b.psnr else -1


def _band(speed: float) -> tuple[float, float]:
    return next(b for b in BANDS if b[0] <= speed < b[1])


def _fmt_band(b: tuple[float, float]) -> str:
    hi = "" if math.isinf(b[1]) else f"{b[1]:.1f}"
    return f"{b[0]:.1f}-{hi}x" if hi else f">= {b[0]:.1f}x"


def verdicts(rows: list[Row]) -> list[str]:
    """The sentences of one scenario."""
    ok = [r for r in rows if r.status == "ok" and r.family != "full"]
    out: list[str] = []
    for band in BANDS:
        inside = [r for r in ok if _band(r.speed) == band]
        if not inside:
            continue
        best = max(inside, key=lambda r: r.psnr)
        out.append(
            f"- speed {_fmt_band(band)}: closest to the full output is **{best.method}** "
            f"(PSNR {best.psnr:.2f} dB, {best.speed:.2f}x, computed {best.computed:.2f}) "
            f"of {len(inside)} method(s) in the band"
        )
    bd = [r for r in ok if r.family == "blockdance"]
    for fam in PEER_FAMILIES:
        peers = [r for r in ok if r.family == fam]
        if not peers:
            continue
        # the peer's best: per peer setting, the best BlockDance setting at least as fast
        wins = losses = ties = unmatched = 0
        lines = []
        for p in sorted(peers, key=lambda r: r.speed):
            faster = [b for b in bd if b.speed >= p.speed]
            if not faster:
                unmatched += 1
                lines.append(f"{p.method} ({p.speed:.2f}x): no BlockDance setting this fast")
                continue
            b = max(faster, key=lambda r: r.psnr)
            v = _ahead(b, p)
            wins, losses, ties = wins + (v > 0), losses + (v < 0), ties + (v == 0)
            word = {1: "ahead", 0: "within noise", -1: "BEHIND"}[v]
            lines.append(
                f"{p.method} ({p.speed:.2f}x, {p.psnr:.2f} dB) vs {b.method} ({b.speed:.2f}x, "
                f"{b.psnr:.2f} dB): BlockDance {word}"
            )
        pbest = max(peers, key=lambda r: r.psnr)
        faster = [b for b in bd if b.speed >= pbest.speed]
        if faster:
            b = max(faster, key=lambda r: r.psnr)
            v = _ahead(b, pbest)
            head = (
                f"BlockDance's best at >= {pbest.speed:.2f}x ({b.method}, {b.psnr:.2f} ± "
                f"{b.psnr_se:.2f} dB) is "
                + {
                    1: "**ahead of**",
                    0: "**not distinguishable from** (within noise)",
                    -1: "**behind**",
                }[v]
                + f" {FAMILY_LABEL[fam]}'s best ({pbest.method}, {pbest.psnr:.2f} ± "
                f"{pbest.psnr_se:.2f} dB)"
            )
        else:
            head = (
                f"{FAMILY_LABEL[fam]}'s best ({pbest.method}, {pbest.speed:.2f}x) is faster than "
                "every BlockDance setting: **BlockDance has no setting at that speed**"
            )
        out.append(
            f"- vs {FAMILY_LABEL[fam]}: {head}. Setting by setting: BlockDance ahead {wins}, "
            f"within noise {ties}, behind {losses}, no BlockDance setting as fast {unmatched}."
        )
        out += [f"  - {line}" for line in lines]
        if losses or unmatched:
            out.append(
                f"  - **BlockDance is not ahead of {FAMILY_LABEL[fam]} everywhere**: behind at "
                f"{losses} setting(s), no setting as fast at {unmatched}."
            )
    not_run = [r for r in rows if r.status != "ok"]
    for r in not_run:
        out.append(f"- {r.method}: {r.status}")
    return out


def _front(rows: list[Row]) -> list[Row]:
    """The measured-speed/PSNR Pareto front (no other row faster and closer)."""
    return [
        r
        for r in rows
        if not any(
            o is not r
            and o.speed >= r.speed
            and o.psnr >= r.psnr
            and (o.speed, o.psnr) != (r.speed, r.psnr)
            for o in rows
        )
    ]


def pareto_plot(groups: dict[str, list[Row]], title: str, path: Path) -> bool:
    """One panel per sampler: measured speedup on x, PSNR on y; markers per family in a legend,
    only the Pareto front labelled."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(groups), figsize=(7 * len(groups), 5.5), squeeze=False)
    for ax, (scenario, rows) in zip(axes[0], groups.items(), strict=True):
        ok = [r for r in rows if r.status == "ok" and r.family != "full"]
        for fam in ("blockdance", *PEER_FAMILIES):
            pts = [r for r in ok if r.family == fam]
            if pts:
                ax.scatter(
                    [r.speed for r in pts],
                    [r.psnr for r in pts],
                    marker=MARKERS[fam],
                    color=COLOURS[fam],
                    label=FAMILY_LABEL[fam],
                    s=40,
                    alpha=0.85,
                )
        front = sorted(_front(ok), key=lambda r: r.speed)
        ax.plot([r.speed for r in front], [r.psnr for r in front], color="grey", lw=0.8, zorder=0)
        for i, r in enumerate(front):
            ax.annotate(
                r.method,
                (r.speed, r.psnr),
                textcoords="offset points",
                xytext=(6, 8 if i % 2 else -12),
                fontsize=7,
            )
        ax.axvline(1.0, color="black", lw=0.5, ls=":")
        ax.set_xlabel("measured speedup over full (inductor), CPU, 1 thread")
        ax.set_ylabel("PSNR vs full output (dB)")
        ax.set_title(scenario)
        ax.legend(fontsize=8, loc="lower left")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_peers_report(results: Path, dataset: str) -> Path:
    csv_path = results / f"peers-{dataset}.csv"
    meta = json.loads(csv_path.with_suffix(".json").read_text())
    rows = read_rows(csv_path)
    groups: dict[str, list[Row]] = {}
    for r in rows:
        groups.setdefault(r.scenario, []).append(r)
    model = "MNIST DiT" if dataset == "mnist" else "colour emoji DiT"
    png = results / f"peers-{dataset}-pareto.png"
    plotted = pareto_plot(groups, f"BlockDance and its peers on the reference {model}", png)
    lines = [
        f"# BlockDance side by side with its peers: reference {model}",
        "",
        f"Machine: {meta['machine']}. Command: `{meta['command']}`.",
        f"{meta['samples']} samples per method (seeds {meta['seeds']}, the same initial noise "
        f"for every method), standard errors from {meta['splits']} seed splits; a difference "
        f"counts when it exceeds {SIGNIFICANCE:g} combined standard errors (unpaired, so "
        "conservative). Speed: median of "
        f"{meta['repeats']} interleaved generations at batch {meta['speed_batch']}, one process, "
        "one thread, against full (inductor) timed in the same rounds. FID on so few samples "
        "is dominated by its small-sample bias: read it as a sanity check only. "
        "Computed fraction: the block work a method really computed, from its own statistics "
        "(BlockDance: `bd_compile.stats`; cache-dit: `cache_dit.summary`; diffusers' hooks: "
        "calls of each block's attention and feed-forward, FLOP-weighted).",
        "",
    ]
    for scenario, srows in groups.items():
        lines += [f"## {scenario}", "", "### What the data says", ""]
        lines += verdicts(srows)
        lines += [
            "",
            "| method | computed | measured speedup | time (s) | PSNR (dB) | SSIM | FID | "
            "accuracy |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in sorted(srows, key=lambda r: -r.speed if r.status == "ok" else 0):
            if r.status != "ok":
                lines.append(f"| {r.method} | {r.status} | | | | | | |")
                continue
            lines.append(
                f"| {r.method} | {r.computed:.3f} | {r.speed:.2f}x | {r.time_s:.2f} | "
                f"{min(r.psnr, 100):.2f} ± {r.psnr_se:.2f} | {r.ssim:.4f} | {r.fid:.2f} | "
                f"{r.accuracy:.3f} |"
            )
        lines.append("")
    if plotted:
        lines.append(f"![speed vs PSNR]({png.name})")
    out = results / f"peers-{dataset}.md"
    out.write_text("\n".join(lines) + "\n")
    return out
