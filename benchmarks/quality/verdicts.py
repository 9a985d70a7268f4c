"""The verdicts of ``benchmarks.quality``'s report: the merged rows (:class:`Entry`) and every
comparison the report states, computed from the numbers (none is written in advance).

A difference counts as real when it exceeds ``SIGNIFICANCE`` combined standard errors (unpaired,
so conservative for SSIM/PSNR, which are paired by seed). :mod:`benchmarks.quality.figures` draws
these rows and :mod:`benchmarks.quality.writing` writes them out; this module imports neither.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: The name of the real-image floor row (older results: "real held-out digits").
REAL_FLOOR = "real held-out images"
#: The families that are BlockDance settings (copy, forecast, calibrated cache block, Ada).
BLOCKDANCE = ("blockdance", "forecast", "calibrated", "ada")
#: A difference counts as real when it exceeds this many combined standard errors.
SIGNIFICANCE = 2.0
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


def to_float(text: str | None) -> float:
    """A CSV cell as a float; empty or not a number: NaN."""
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
        return to_float(self.q.get(key))

    @property
    def name(self) -> str:
        return self.q.get("method") or (self.s or {}).get("method", "")

    @property
    def family(self) -> str:
        return self.q.get("family") or (self.s or {}).get("family", "")

    @property
    def measured(self) -> float:
        return to_float(self.s["speedup_vs_inductor"]) if self.s else math.nan

    @property
    def bound(self) -> float:
        return self.get("flop_bound")

    def speed(self, measured: bool) -> float:
        return self.measured if measured else self.bound


# --------------------------------------------------------------------------------------------
# Sentences


def with_se(value: float, se: float, digits: int) -> str:
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
                f"{with_se(best.get('ssim'), best.get('ssim_se'), 4)} against "
                f"{with_se(half.get('ssim'), half.get('ssim_se'), 4)} for half the steps "
                f"({half.name}) "
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
            f"{with_se(e4.get('ssim'), e4.get('ssim_se'), 4)} vs "
            f"{with_se(copy2.get('ssim'), copy2.get('ssim_se'), 4)} "
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
            f"({a.get('reuse_calls'):.1f} reuse steps per sample), PSNR {with_se(p, p_se, 2)} dB; "
            f"static N=2 {n2.bound:.2f}x {with_se(n2.get('psnr'), n2.get('psnr_se'), 2)} dB, "
            f"N=3 {n3.bound:.2f}x {with_se(n3.get('psnr'), n3.get('psnr_se'), 2)} dB ({window})."
        )
    return lines


def pareto_front(entries: list[Entry], measured: bool, metric: str) -> list[Entry]:
    """The entries no other entry beats on both speed and ``metric`` (higher is better), by
    speed; entries without either number are left out."""
    pts = [
        e for e in entries if not math.isnan(e.speed(measured)) and not math.isnan(e.get(metric))
    ]
    front = [
        e
        for e in pts
        if not any(
            o.speed(measured) >= e.speed(measured)
            and o.get(metric) >= e.get(metric)
            and (o.speed(measured) > e.speed(measured) or o.get(metric) > e.get(metric))
            for o in pts
        )
    ]
    return sorted(front, key=lambda e: e.speed(measured))


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
                f"({_fmt_speed(s, measured)}): SSIM "
                f"{with_se(b.get('ssim'), b.get('ssim_se'), 3)} vs "
                f"{with_se(s.get('ssim'), s.get('ssim_se'), 3)}, BlockDance {c_ssim}; FID "
                f"{with_se(b.get('fid'), b.get('fid_se'), 2)} vs "
                f"{with_se(s.get('fid'), s.get('fid_se'), 2)}, BlockDance {c_fid}."
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
    front = pareto_front(pts, measured, "ssim")
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
