"""The files of ``benchmarks.quality``'s report: reads the parts' results, merges them into
:class:`~benchmarks.quality.verdicts.Entry` rows and writes ``quality[-tag].md`` (the verdicts and
a table per scenario), ``quality[-tag].csv`` (both parts merged) and the figures.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.quality.figures import grid_plot, pareto_plot
from benchmarks.quality.verdicts import Entry, conclusions, to_float, with_se

#: The data sets' models and where the shipped ones live (the older MNIST folder included).
MODEL_LABEL = {"mnist": "MNIST DiT", "colour": "colour emoji DiT"}
SHIPPED = {
    "mnist": ("bd_compile/data/reference_model", "benchmarks/reference/model"),
    "colour": ("benchmarks/reference/colour/model",),
}


def model_title(q_meta: dict[str, Any]) -> str:
    """The model the quality part ran, as the report's title names it: "reference MNIST DiT"
    for a shipped model (results from before ``--dataset`` are MNIST's), else the data set's
    model with its folder."""
    dataset = str(q_meta.get("dataset") or "mnist")
    label = MODEL_LABEL.get(dataset, f"{dataset} DiT")
    model = Path(str(q_meta.get("model") or "")).as_posix()
    if not model or model == "." or model.endswith(SHIPPED.get(dataset, ())):
        return f"reference {label}"
    return f"{label} `{model}`"


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


def _table(entries: list[Entry]) -> list[str]:
    head = (
        "| method | speedup vs inductor (CPU) | vs eager | FLOP bound | reuse/calls (quality) "
        "| SSIM vs full | PSNR dB | FID | class accuracy | matched to |"
    )
    lines = [head, "|" + "---|" * 10]
    for e in entries:
        q = e.q
        ps = e.get("psnr")
        psnr = "identical" if ps >= 99.99 else with_se(ps, e.get("psnr_se"), 2)
        measured = "" if math.isnan(e.measured) else f"{e.measured:.2f}x"
        vs_eager = "" if e.s is None else f"{to_float(e.s['speedup_vs_eager']):.2f}x"
        bound = e.bound if q else to_float((e.s or {}).get("flop_bound"))
        reuse = (
            f"{to_float(q['reuse_calls']):g}/{q['calls']}"
            if q.get("calls") not in (None, "0")
            else ""
        )
        lines.append(
            f"| {e.name} | {measured} | {vs_eager} | "
            f"{'' if math.isnan(bound) else f'{bound:.2f}x'} | {reuse} | "
            f"{with_se(e.get('ssim'), e.get('ssim_se'), 4)} | {psnr} | "
            f"{with_se(e.get('fid'), e.get('fid_se'), 2)} | "
            f"{with_se(e.get('accuracy'), e.get('accuracy_se'), 3)} | {q.get('matches', '')} |"
        )
    return lines


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
    model = model_title(q_meta)
    pareto_plot(groups, measured, pareto, f"BlockDance vs the alternatives: {model}")
    samples_path = results / f"quality_samples{stem}.npz"
    if samples_path.exists():
        with np.load(samples_path) as samples:
            grid_plot(dict(samples), groups, grid)

    lines = [
        f"# BlockDance vs the alternatives at matched speed ({model})",
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
        f"![speedup vs PSNR, one panel per sampler]({pareto.name})",
        "",
        f"![the same seeds under every method]({grid.name})",
        "",
    ]
    md = results / f"quality{stem}.md"
    md.write_text("\n".join(lines))
    print(f"[report] wrote {md}, {results / f'quality{stem}.csv'}, {pareto.name}, {grid.name}")
    return md
