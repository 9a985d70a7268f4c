"""The data behind calibration's default threshold: sweep it and measure what the cache costs.

For each model: sample once uncached (the reference), run the STSS analysis on the same noise,
then for every threshold calibrate, sample again through ``backend="blockdance"`` with that
calibration file (inner compiler ``eager``: only the cache semantics matter here), and compare
the final samples with the reference (SSIM, PSNR). The paper's hand-picked settings (cache
block at 75% depth, windows 25%-95% and 40%-95%) are measured the same way as the yardstick.
``saved`` is the share of block evaluations skipped (reuse calls x skipped blocks / all).

    python -m benchmarks.threshold_sweep --model bd_compile/data/reference_model
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch._dynamo
from torch._dynamo.utils import counters

import bd_compile
from bd_compile.analysis import analyze, calibrate, save_calibration
from bd_compile.analysis.__main__ import load_subject
from bd_compile.metrics import psnr, ssim
from bd_compile.sampling import denoise, make_scheduler
from bd_compile.settings import default_cache_block

log = logging.getLogger(__name__)

THRESHOLDS = (0.9, 0.98, 0.99, 0.995, 0.998, 0.999)
STRUCTURE_THRESHOLDS: tuple[float | None, ...] = (None, 0.98, 0.99, 0.995)
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Row:
    model: str
    setting: str
    threshold: float | None
    structure_threshold: float | None
    cache_block: int
    window: str
    reuse_steps: int
    saved: float
    ssim: float
    psnr: float


def _images(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, *x.shape[-3:]).float()


def _compare(out: torch.Tensor, ref: torch.Tensor, pixel: bool) -> tuple[float, float]:
    a, b = _images(out), _images(ref)
    if pixel:  # images in [-1, 1], as the reference sampler returns them
        a, b, data_range = a.clamp(-1, 1), b.clamp(-1, 1), 2.0
    else:
        data_range = float(b.max() - b.min())
    window = min(11, 2 * min(a.shape[-2:]) - 1)
    window -= 1 - window % 2
    s = float(ssim(a, b, data_range=data_range, window_size=window).mean())
    p = float(psnr(a, b, data_range=data_range).clamp(max=99.0).mean())
    return s, p


def sweep(
    spec: str,
    steps: int,
    sampler: str,
    guidance: float,
    batch: int,
    seed: int,
    thresholds: Sequence[float],
    structure_thresholds: Sequence[float | None] = STRUCTURE_THRESHOLDS,
) -> list[Row]:
    subject = load_subject(spec, batch, "cpu")
    model = subject.model
    num_blocks: int | None = None
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn((batch, *subject.latent_shape), generator=gen)
    pixel = subject.latent_shape[0] in (1, 3)  # images in [-1, 1]

    def sample(fn: Any) -> torch.Tensor:
        sched = make_scheduler(subject.scheduler_config, sampler)
        return denoise(fn, sched, subject.make_inputs, latents, steps, guidance_scale=guidance)

    ref = sample(model)
    analysis = analyze(
        model,
        make_scheduler(subject.scheduler_config, sampler),
        subject.make_inputs,
        latents,
        steps,
        guidance_scale=guidance,
        progress=False,
    )
    num_blocks = analysis.num_blocks
    settings: list[tuple[str, float | None, float | None, dict[str, Any]]] = []
    deflt = default_cache_block(num_blocks)
    for paper_window in ((0.25, 0.95), (0.4, 0.95)):
        name = f"paper {paper_window[0]:.0%}-{paper_window[1]:.0%}"
        settings.append((name, None, None, {"cache_block": deflt, "window": paper_window}))
    tmp = Path(tempfile.mkdtemp(prefix="bd-sweep-"))
    for structure in structure_thresholds:
        for threshold in thresholds:
            cal = calibrate(analysis, threshold=threshold, structure_threshold=structure)
            path = save_calibration(cal, tmp / f"cal-{threshold}-{structure}.json")
            options = {"calibration": str(path)}
            settings.append(("calibrated", threshold, structure, options))

    rows = []
    for name, thr, structure, options in settings:
        torch._dynamo.reset()
        counters["blockdance"].clear()
        compiled = torch.compile(model, backend="blockdance", options={**options, "inner": "eager"})
        out = sample(compiled)
        st = bd_compile.stats(model)
        layout, window = st.graphs[-1], st.settings.window
        reuse, calls = counters["blockdance"]["reuse_steps"], counters["blockdance"]["cache_steps"]
        calls += reuse
        s, p = _compare(out, ref, pixel)
        rows.append(
            Row(
                model=spec,
                setting=name,
                threshold=thr,
                structure_threshold=structure,
                cache_block=layout.cache_block,
                window=f"{window[0]:.2f}-{window[1]:.2f}" if window else "?",
                reuse_steps=reuse,
                saved=round(reuse * (layout.cache_block + 1) / (calls * num_blocks), 4),
                ssim=round(s, 4),
                psnr=round(p, 2),
            )
        )
        log.info("%s", rows[-1])
    return rows


def write(rows: list[Row], stem: Path, header: str) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        w.writeheader()
        for r in rows:
            w.writerow(asdict(r))
    cols = list(asdict(rows[0]))
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        vals = [
            "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)
            for v in asdict(r).values()
        ]
        lines.append("| " + " | ".join(vals) + " |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.threshold_sweep", description=__doc__)
    p.add_argument("--model", action="append", required=True)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sampler", choices=("ddim", "dpm"), default="ddim")
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threshold", type=float, action="append", default=None)
    p.add_argument(
        "--structure-threshold",
        type=lambda v: None if v.lower() == "none" else float(v),
        action="append",
        default=None,
    )
    p.add_argument("--out", type=Path, default=RESULTS / "threshold-sweep")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    rows: list[Row] = []
    for spec in args.model:
        rows += sweep(
            spec,
            args.steps,
            args.sampler,
            args.guidance,
            args.batch,
            args.seed,
            args.threshold or THRESHOLDS,
            args.structure_threshold or STRUCTURE_THRESHOLDS,
        )
    header = (
        f"# Calibration threshold sweep\n\n{args.steps} steps {args.sampler}, guidance "
        f"{args.guidance}, batch {args.batch}, seed {args.seed}; SSIM/PSNR of the final samples "
        "against the uncached run; saved = share of block evaluations skipped."
    )
    write(rows, args.out, header)
    print(args.out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
