"""The report part of ``benchmarks.quality``: merge quality and speed results, say what they show.

Reads ``quality_metrics[-tag].csv/.json`` (required), ``quality_speed[-tag].csv/.json`` (optional:
without it speedups are the FLOP bounds) and ``quality_samples[-tag].npz``; writes
``quality[-tag].md``, ``quality[-tag].csv``, ``quality_pareto[-tag].png`` and
``quality_grid[-tag].png``. Every sentence under "What the data says" is computed from the
numbers here; none is written in advance.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: The name of the real-image floor row (older results: "real held-out digits").
REAL_FLOOR = "real held-out images"
#: The families that are BlockDance settings (copy, forecast, calibrated cache block, Ada).
BLOCKDANCE = ("blockdance", "forecast", "calibrated", "ada")
#: A difference counts as real when it exceeds this many combined standard errors.
SIGNIFICANCE = 2.0
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
FAMILY_LABEL = {
    "full": "full",
    "blockdance": "BlockDance-N",
    "forecast": "BlockDance-N + forecast",
    "calibrated": "BlockDance calibrated",
    "ada": "BlockDance-Ada",
    "deepcache": "DeepCache-style",
    "steps": "fewer steps",
    "fbc": "FirstBlockCache (eager)",
}


def _num(text: str | None) -> float:
    if text is None or text == "":
        return math.nan
    try:
        return float(text)
    except ValueError:
        return math.nan


@dataclass
class Entry:
    """One method of one scenario: its quality row merged with its speed row."""

    q: dict[str, str]
    s: dict[str, str] | None

    def get(self, key: str) -> float:
        return _num(self.q.get(key))

    @property
    def name(self) -> str:
        return self.q.get("method") or (self.s or {}).get("method", "")

    @property
    def family(self) -> str:
        return self.q.get("family") or (self.s or {}).get("family", "")

    @property
    def measured(self) -> float:
        return _num(self.s["speedup_vs_inductor"]) if self.s else math.nan

    @property
    def bound(self) -> float:
        return self.get("flop_bound")

    def speed(self, measured: bool) -> float:
        return self.measured if measured else self.bound


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def merge(
    quality: list[dict[str, str]], speed: list[dict[str, str]] | None
) -> dict[str, list[Entry]]:
    """Entries per scenario in the quality part's order; speed-only rows appended."""
    speed_by = {(r["scenario"], r["method"]): r for r in speed or []}
    out: dict[str, list[Entry]] = {}
    seen: set[tuple[str, str]] = set()
    for r in quality:
        key = (r["scenario"], r["method"])
        seen.add(key)
        out.setdefault(r["scenario"], []).append(Entry(r, speed_by.get(key)))
    for key, r in speed_by.items():
        if key not in seen:
            out.setdefault(key[0], []).append(Entry({}, r))
    return out


# --------------------------------------------------------------------------------------------
# Sentences


def _pm(value: float, se: float, digits: int) -> str:
    if math.isnan(value):
        return ""
    if math.isnan(se):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} ± {se:.{digits}f}"


def _differs(a: float, a_se: float, b: float, b_se: float) -> bool:
    se = math.sqrt((0 if math.isnan(a_se) else a_se) ** 2 + (0 if math.isnan(b_se) else b_se) ** 2)
    return abs(a - b) > SIGNIFICANCE * se


def _compare(a: Entry, b: Entry, metric: str, higher_better: bool) -> str:
    """'higher'/'lower'/'no different' of a vs b on ``metric``, with the noise verdict."""
    va, vb = a.get(metric), b.get(metric)
    if math.isnan(va) or math.isnan(vb):
        return "not comparable"
    if not _differs(va, a.get(f"{metric}_se"), vb, b.get(f"{metric}_se")):
        return "no different (within noise)"
    better = (va > vb) == higher_better
    return "better" if better else "worse"


def _fmt_speed(e: Entry, measured: bool) -> str:
    if measured and not math.isnan(e.measured):
        return f"{e.measured:.2f}x measured, {e.bound:.2f}x FLOP bound"
    return f"{e.bound:.2f}x FLOP bound"


def _fmt_metric(metric: str, value: float) -> str:
    return f"{value:.3f}" if metric in ("ssim", "accuracy") else f"{value:.2f}"


@dataclass
class Verdict:
    """Whether alternative ``other`` is beaten by a BlockDance setting at least as fast."""

    other: Entry
    by: Entry | None


def dominance(
    entries: list[Entry], metric: str, higher_better: bool, measured: bool
) -> list[Verdict]:
    """For every alternative (DeepCache-style, fewer steps, FirstBlockCache): the BlockDance
    setting (N-rule or calibrated) that is at least as fast and significantly better on
    ``metric`` (the best such one), or ``None``."""
    bd = [e for e in entries if e.family in BLOCKDANCE and e.q]
    out = []
    for o in entries:
        if o.family not in ("deepcache", "steps", "fbc") or not o.q:
            continue
        so = o.speed(measured)
        if math.isnan(so) or math.isnan(o.get(metric)):
            continue
        good = [
            b
            for b in bd
            if b.speed(measured) >= so and _compare(b, o, metric, higher_better) == "better"
        ]
        sign = 1 if higher_better else -1
        out.append(Verdict(o, max(good, key=lambda b: sign * b.get(metric)) if good else None))
    return out


def _headline(verdicts: list[Verdict], label: str, basis: str) -> str:
    parts = []
    for fam in ("steps", "deepcache", "fbc"):
        vs = [v for v in verdicts if v.other.family == fam]
        if vs:
            won = sum(v.by is not None for v in vs)
            parts.append(f"{FAMILY_LABEL[fam]} in {won} of {len(vs)} setting(s)")
    return (
        f"  - {label}, {basis}: a BlockDance setting at least as fast is significantly better "
        f"than {', '.join(parts)}."
        if parts
        else ""
    )


def targets(entries: list[Entry], measured: bool) -> list[str]:
    """The issue's two targets, met or not: (1) at half the block work (FLOP bound >= 2) some
    BlockDance setting is closer to the full output (SSIM) than half the steps; (2) with
    forecasting, N=4 is at least as close to full as the copy at N=2 (same window)."""
    lines: list[str] = []
    full = next((e for e in entries if e.family == "full" and e.q), None)
    if full is None:
        return lines
    calls = int(full.get("steps"))
    half = next(
        (e for e in entries if e.family == "steps" and e.q and e.get("steps") == calls // 2), None
    )
    deep = [e for e in entries if e.family in BLOCKDANCE and e.q and e.bound >= 2.0]
    if half is not None:
        if not deep:
            best = max(
                (e for e in entries if e.family in BLOCKDANCE and e.q),
                key=lambda e: e.bound,
                default=None,
            )
            reach = f"; the most is {best.name} at {best.bound:.2f}x" if best else ""
            lines.append(
                f"**Target 1 (half the block work) NOT MET:** no BlockDance setting reaches a FLOP "
                f"bound of 2x{reach}."
            )
        else:
            best = max(deep, key=lambda e: e.get("ssim"))
            verdict = _compare(best, half, "ssim", True)
            met = best.get("ssim") > half.get("ssim")
            lines.append(
                f"**Target 1 (half the block work) {'MET' if met else 'NOT MET'}:** the closest "
                f"BlockDance setting at FLOP bound >= 2x, {best.name} ({best.bound:.2f}x, "
                f"{_fmt_speed(best, measured)}), has SSIM "
                f"{_pm(best.get('ssim'), best.get('ssim_se'), 4)} against "
                f"{_pm(half.get('ssim'), half.get('ssim_se'), 4)} for half the steps ({half.name}) "
                f"(BlockDance {verdict}); FID {best.get('fid'):.2f} vs {half.get('fid'):.2f}."
            )
    for e4 in [e for e in entries if e.family == "forecast" and e.q and e.get("interval") == 4]:
        window = e4.q.get("window", "")
        copy2 = next(
            (
                e
                for e in entries
                if e.family == "blockdance"
                and e.q
                and e.get("interval") == 2
                and e.q.get("window", "") == window
            ),
            None,
        )
        if copy2 is None:
            continue
        met = e4.get("ssim") >= copy2.get("ssim")
        lines.append(
            f"**Target 2 ({e4.name} vs copy N=2) {'MET' if met else 'NOT MET'}:** SSIM "
            f"{_pm(e4.get('ssim'), e4.get('ssim_se'), 4)} vs "
            f"{_pm(copy2.get('ssim'), copy2.get('ssim_se'), 4)} "
            f"({_compare(e4, copy2, 'ssim', True)}); FLOP bound {e4.bound:.2f}x vs "
            f"{copy2.bound:.2f}x."
        )
    return lines


def ada_claims(entries: list[Entry], window: str = "40%-95%") -> list[str]:
    """The paper's claim for each BlockDance-Ada policy: N=3's speed at better than N=3's
    quality, or more speed than N=2 at N=2's quality, against the static copy on the window
    that starts where Ada decides (rho = 40%); speed as block work (FLOP bound), quality as
    PSNR to the full output (SSIM saturates on the reference models)."""
    static = {
        int(e.get("interval")): e
        for e in entries
        if e.family == "blockdance" and e.q and e.q.get("window") == window
    }
    lines: list[str] = []
    for a in (e for e in entries if e.family == "ada" and e.q):
        n2, n3 = static.get(2), static.get(3)
        if n2 is None or n3 is None:
            lines.append(f"{a.name}: no static N=2 and N=3 on {window} to compare with.")
            continue
        p, p_se = a.get("psnr"), a.get("psnr_se")

        def vs(o: Entry, p: float = p, p_se: float = p_se) -> int:
            """+1 / -1: Ada's PSNR significantly above / below ``o``'s; 0: within the noise."""
            if not _differs(p, p_se, o.get("psnr"), o.get("psnr_se")):
                return 0
            return 1 if p > o.get("psnr") else -1

        met = (a.bound >= n3.bound and vs(n3) > 0) or (a.bound > n2.bound and vs(n2) >= 0)
        lines.append(
            f"**Ada claim ({a.name}) {'MET' if met else 'NOT MET'}:** FLOP bound {a.bound:.2f}x "
            f"({a.get('reuse_calls'):.1f} reuse steps per sample), PSNR {_pm(p, p_se, 2)} dB; "
            f"static N=2 {n2.bound:.2f}x {_pm(n2.get('psnr'), n2.get('psnr_se'), 2)} dB, "
            f"N=3 {n3.bound:.2f}x {_pm(n3.get('psnr'), n3.get('psnr_se'), 2)} dB ({window})."
        )
    return lines


def conclusions(scenario: str, entries: list[Entry], measured: bool) -> list[str]:
    """Plain sentences about one scenario, computed from its entries."""
    by_name = {e.name: e for e in entries}
    steps = [e for e in entries if e.family == "steps" and e.q]
    basis = "measured CPU speed" if measured else "FLOP-bound speed (no speed results)"
    lines: list[str] = []

    # 1. Headline: dominance per family, at measured speed (and at the FLOP bound).
    heads = []
    for metric, higher_better, label in (("ssim", True, "SSIM"), ("fid", False, "FID")):
        heads.append(_headline(dominance(entries, metric, higher_better, measured), label, basis))
        if measured:
            heads.append(
                _headline(dominance(entries, metric, higher_better, False), label, "the FLOP bound")
            )
    heads = [h for h in heads if h]
    if heads:
        lines.append(
            "**Headline** (is an alternative beaten by BlockDance at equal or higher "
            "speed?):\n" + "\n".join(heads)
        )

    # 2. Step reduction matched to each setting's FLOP bound, pair by pair.
    wins = sig = fid_wins = total = 0
    pairs = []
    for s in steps:
        for target in s.q["matches"].split("; "):
            b = by_name.get(target)
            if b is None or b.family not in BLOCKDANCE:
                continue
            total += 1
            c_ssim = _compare(b, s, "ssim", True)
            c_fid = _compare(b, s, "fid", False)
            wins += b.get("ssim") > s.get("ssim")
            sig += c_ssim == "better"
            fid_wins += c_fid == "better"
            pairs.append(
                f"  - {b.name} ({_fmt_speed(b, measured)}) vs {s.name} "
                f"({_fmt_speed(s, measured)}): SSIM {_pm(b.get('ssim'), b.get('ssim_se'), 3)} vs "
                f"{_pm(s.get('ssim'), s.get('ssim_se'), 3)}, BlockDance {c_ssim}; FID "
                f"{_pm(b.get('fid'), b.get('fid_se'), 2)} vs "
                f"{_pm(s.get('fid'), s.get('fid_se'), 2)}, BlockDance {c_fid}."
            )
    if total:
        lines.append(
            f"**Fewer steps matched to the FLOP bound** (steps = round(S / bound)): BlockDance "
            f"has the higher SSIM to the full output in {wins} of {total} pairs ({sig} by more "
            f"than {SIGNIFICANCE:g} standard errors) and a significantly lower FID in {fid_wins} "
            f"of {total}:\n" + "\n".join(pairs)
        )

    # 3. Which alternatives are beaten, by what.
    for metric, higher_better, label in (("ssim", True, "SSIM"), ("fid", False, "FID")):
        verdicts = dominance(entries, metric, higher_better, measured)
        beaten = [
            f"{v.other.name} ({v.other.speed(measured):.2f}x, "
            f"{_fmt_metric(metric, v.other.get(metric))}) by {v.by.name} "
            f"({v.by.speed(measured):.2f}x, {_fmt_metric(metric, v.by.get(metric))})"
            for v in verdicts
            if v.by is not None
        ]
        unbeaten = [
            f"{v.other.name} ({v.other.speed(measured):.2f}x, "
            f"{_fmt_metric(metric, v.other.get(metric))})"
            for v in verdicts
            if v.by is None
        ]
        if verdicts:
            text = f"**{label} at equal or higher {basis}:** "
            if beaten:
                text += f"Beaten by a BlockDance setting at least as fast: {'; '.join(beaten)}. "
            if unbeaten:
                text += (
                    "Not beaten (no BlockDance setting is both at least as fast and "
                    f"significantly better): {'; '.join(unbeaten)}."
                )
            lines.append(text.strip())

    # 4. The Pareto front on SSIM.
    pts = [
        e
        for e in entries
        if e.family != "floor"
        and e.q
        and not math.isnan(e.speed(measured))
        and not math.isnan(e.get("ssim"))
    ]
    front = [
        e
        for e in pts
        if not any(
            o.speed(measured) >= e.speed(measured)
            and o.get("ssim") >= e.get("ssim")
            and (o.speed(measured) > e.speed(measured) or o.get("ssim") > e.get("ssim"))
            for o in pts
        )
    ]
    front.sort(key=lambda e: e.speed(measured))
    if front:
        fams = sorted({FAMILY_LABEL.get(e.family, e.family) for e in front})
        lines.append(
            f"**Pareto front (speed vs SSIM, {basis}):** "
            + ", ".join(f"{e.name} ({e.speed(measured):.2f}x, {e.get('ssim'):.3f})" for e in front)
            + f"; families on it: {', '.join(fams)}."
        )

    lines += targets(entries, measured)
    lines += ada_claims(entries)

    # 5. Floors.
    other = by_name.get("full, other seeds")
    real = by_name.get(REAL_FLOOR) or by_name.get("real held-out digits")
    full = by_name.get("full")
    if other is not None:
        below = [e.name for e in pts if e.get("ssim") <= other.get("ssim")]
        lines.append(
            f"**Floors:** a different seed gives SSIM {other.get('ssim'):.3f} and PSNR "
            f"{other.get('psnr'):.1f} dB against the full output; "
            + (
                f"{len(below)} method(s) are at or below it ({', '.join(below)})."
                if below
                else "every method stays above it."
            )
        )
    if real is not None and full is not None:
        lines.append(
            f"FID of real held-out images vs the training images is {real.get('fid'):.2f} "
            f"({int(real.get('samples'))} images); the full model's samples score "
            f"{full.get('fid'):.2f}, class accuracy {full.get('accuracy'):.3f} "
            f"(real held-out: {real.get('accuracy'):.3f})."
        )
    return [f"- {line}" for line in lines] or [f"- {scenario}: nothing to compare."]


# --------------------------------------------------------------------------------------------
# Tables and figures


def _table(entries: list[Entry]) -> list[str]:
    head = (
        "| method | speedup vs inductor (CPU) | vs eager | FLOP bound | reuse/calls (quality) "
        "| SSIM vs full | PSNR dB | FID | class accuracy | matched to |"
    )
    lines = [head, "|" + "---|" * 10]
    for e in entries:
        q = e.q
        ps = e.get("psnr")
        psnr = "identical" if ps >= 99.99 else _pm(ps, e.get("psnr_se"), 2)
        measured = "" if math.isnan(e.measured) else f"{e.measured:.2f}x"
        vs_eager = "" if e.s is None else f"{_num(e.s['speedup_vs_eager']):.2f}x"
        bound = e.bound if q else _num((e.s or {}).get("flop_bound"))
        reuse = (
            f"{_num(q['reuse_calls']):g}/{q['calls']}" if q.get("calls") not in (None, "0") else ""
        )
        lines.append(
            f"| {e.name} | {measured} | {vs_eager} | "
            f"{'' if math.isnan(bound) else f'{bound:.2f}x'} | {reuse} | "
            f"{_pm(e.get('ssim'), e.get('ssim_se'), 4)} | {psnr} | "
            f"{_pm(e.get('fid'), e.get('fid_se'), 2)} | "
            f"{_pm(e.get('accuracy'), e.get('accuracy_se'), 3)} | {q.get('matches', '')} |"
        )
    return lines


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


# --------------------------------------------------------------------------------------------


def _fbc_note(q_meta: dict[str, Any], s_meta: dict[str, Any]) -> str:
    return (
        "- **FirstBlockCache** is diffusers' eager hook (not compiled: it decides per call with "
        "a device-to-host `.item()` behind `torch.compiler.disable`); thresholds "
        f"{q_meta.get('fbc_thresholds', '?')} were picked on "
        f"{q_meta.get('fbc_probe_samples', '?')} probe samples to land near the BlockDance "
        "FLOP bounds. Its decision is one per batched call (the whole batch skips or not), so "
        "it depends on the batch. Its measured speedup is against plain inductor although it "
        "runs eager; the 'vs eager' column is its gain over its own baseline. "
        + (f"Under Dynamo: {s_meta['fbc_dynamo']}." if s_meta.get("fbc_dynamo") else "")
    )


def write_report(results: Path, stem: str = "") -> Path:
    """Merge the parts' results in ``results`` (file suffix ``stem``) into the report files."""
    q_path = results / f"quality_metrics{stem}.csv"
    if not q_path.exists():
        raise SystemExit(f"report: expected {q_path} (run --part quality first)")
    s_path = results / f"quality_speed{stem}.csv"
    quality = _read_csv(q_path)
    speed = _read_csv(s_path) if s_path.exists() else None
    q_meta = _read_json(results / f"quality_metrics{stem}.json")
    s_meta = _read_json(results / f"quality_speed{stem}.json")
    groups = merge(quality, speed)
    measured = speed is not None

    merged_rows: list[dict[str, Any]] = []
    for entries in groups.values():
        for e in entries:
            row: dict[str, Any] = (
                dict(e.q)
                if e.q
                else {"scenario": (e.s or {}).get("scenario"), "family": e.family, "method": e.name}
            )
            for k, v in (e.s or {}).items():
                if k not in ("scenario", "family", "method"):
                    row[f"speed_{k}"] = v
            merged_rows.append(row)
    fields: list[str] = []
    for r in merged_rows:
        fields += [k for k in r if k not in fields]
    with open(results / f"quality{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(merged_rows)

    pareto = results / f"quality_pareto{stem}.png"
    grid = results / f"quality_grid{stem}.png"
    pareto_plot(groups, measured, pareto)
    samples_path = results / f"quality_samples{stem}.npz"
    if samples_path.exists():
        with np.load(samples_path) as samples:
            grid_plot(dict(samples), groups, grid)

    lines = [
        "# BlockDance vs the alternatives at matched speed (reference MNIST DiT)",
        "",
        "Generated by `python -m benchmarks.quality --part report`; metrics defined in "
        "benchmarks/README.md.",
        "",
        "## Runs",
        "",
        f"- **Quality:** {q_meta.get('machine', '?')}; command `{q_meta.get('command', '?')}`; "
        f"model `{q_meta.get('model', '?')}`; {q_meta.get('samples', '?')} samples per method, "
        f"seeds {q_meta.get('seeds', '?')}; error bars: standard error over "
        f"{q_meta.get('splits', '?')} seed splits; batch {q_meta.get('batch', '?')} per "
        f"generation on {q_meta.get('device', '?')}, inner compiler "
        f"{q_meta.get('inner_compiler', '?')}; guidance {q_meta.get('guidance', '?')} (batched "
        f"CFG); other-seed floor: seeds {q_meta.get('other_seeds', '?')}; "
        f"{q_meta.get('seconds', '?')} s.",
    ]
    if s_meta:
        lines.append(
            f"- **Speed:** {s_meta.get('machine', '?')}; command `{s_meta.get('command', '?')}`; "
            f"batch {s_meta.get('batch', '?')} samples (seeds {s_meta.get('seeds', '?')}), "
            f"median of {s_meta.get('repeats', '?')} generation(s) after a warm-up, all methods "
            f"interleaved in one process; {s_meta.get('seconds', '?')} s."
        )
    else:
        lines.append("- **Speed:** no speed results; speedups below are FLOP bounds.")
    fr = q_meta.get("flop_fractions") or {}
    if fr:
        lines.append(
            "- **FLOP share a reuse call skips** (torch.utils.flop_counter): "
            + ", ".join(f"{k} {v:.3f}" for k, v in fr.items() if v is not None)
            + ". Step reduction was matched to each caching setting's FLOP-bound speedup "
            "(steps = round(S / bound)); at measured speed it is usually a little faster than "
            "the setting it matches, since caching does not reach its bound."
        )
    fbc = q_meta.get("fbc_thresholds")
    if isinstance(fbc, dict) and not any(fbc.values()):
        lines.append("- **FirstBlockCache:** not run (`--fbc-thresholds` with no value).")
    else:
        lines.append(_fbc_note(q_meta, s_meta))
    for sc, entries in groups.items():
        lines += ["", f"## {sc}", "", "### What the data says", ""]
        lines += conclusions(sc, entries, measured)
        lines += ["", *_table(entries)]
    lines += [
        "",
        f"![speedup vs SSIM and FID]({pareto.name})",
        "",
        f"![the same seeds under every method]({grid.name})",
        "",
    ]
    md = results / f"quality{stem}.md"
    md.write_text("\n".join(lines))
    print(f"[report] wrote {md}, {results / f'quality{stem}.csv'}, {pareto.name}, {grid.name}")
    return md


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality.report")
    p.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    write_report(args.results, f"-{args.tag}" if args.tag else "")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
