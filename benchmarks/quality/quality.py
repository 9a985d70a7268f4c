"""The quality part: every method on the same seeds; SSIM/PSNR against ``full``, FID and class
accuracy on the reference classifier's features; mean and standard error over seed splits."""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch

from bd_compile.metrics import psnr, ssim
from benchmarks.common import log, machine, write_csv
from benchmarks.fid import frechet_distance
from benchmarks.quality.engines import Engines, generate_all
from benchmarks.quality.fbc import match_blockdance
from benchmarks.quality.plan import (
    GRID_SAMPLES,
    OTHER_SEED_OFFSET,
    PSNR_CAP_DB,
    Method,
    Scenario,
    Setup,
    command_line,
    fixed_inputs,
    flop_fractions,
    fmt_window,
    load_dataset,
    load_model,
    plan_methods,
    timesteps_of,
)
from benchmarks.quality.verdicts import REAL_FLOOR
from benchmarks.reference.classifier_common import predict


@dataclass
class QualityRow:
    scenario: str
    family: str
    method: str
    steps: int
    interval: int
    window: str
    cache_block: str
    threshold: str
    matches: str
    samples: int
    reuse_calls: float  # mean per generation (chunks of the quality batch)
    calls: int
    flop_bound: float
    ssim: float
    ssim_se: float
    psnr: float
    psnr_se: float
    fid: float
    fid_se: float
    accuracy: float
    accuracy_se: float
    seconds: float


@torch.no_grad()
def features(clf: Any, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.cat(
        [
            clf.features(images[i : i + 500].to(device)).double().cpu()
            for i in range(0, images.shape[0], 500)
        ]
    )


def split_stats(values: torch.Tensor, splits: int) -> tuple[float, float]:
    """Mean over all samples and the standard error from ``splits`` contiguous seed splits."""
    parts = [p.double().mean().item() for p in values.tensor_split(splits)]
    mean = values.double().mean().item()
    se = statistics.stdev(parts) / math.sqrt(splits) if splits > 1 else float("nan")
    return mean, se


def fid_stats(feats: torch.Tensor, reference: torch.Tensor, splits: int) -> tuple[float, float]:
    """FID of all samples, and the standard error of the per-split FIDs (each on N/splits
    samples: biased upward, so the error is a scale of seed noise, not an interval)."""
    value = frechet_distance(feats, reference)
    parts = [frechet_distance(p, reference) for p in feats.tensor_split(splits)]
    return value, statistics.stdev(parts) / math.sqrt(splits) if splits > 1 else float("nan")


def quality_row(
    sc: Scenario,
    m: Method,
    images: torch.Tensor,
    ref: torch.Tensor | None,
    labels: torch.Tensor,
    feats: torch.Tensor,
    train_feats: torch.Tensor,
    predicted: torch.Tensor,
    splits: int,
    reuse: float,
    calls: int,
    seconds: float,
) -> QualityRow:
    nan = float("nan")
    if ref is not None:
        s, s_se = split_stats(ssim(images, ref), splits)
        p, p_se = split_stats(psnr(images, ref).clamp(max=PSNR_CAP_DB), splits)
    else:
        s = s_se = p = p_se = nan
    f, f_se = fid_stats(feats, train_feats, splits)
    a, a_se = split_stats((predicted == labels).double(), splits)
    return QualityRow(
        scenario=sc.name,
        family=m.family,
        method=m.name,
        steps=m.steps,
        interval=m.interval,
        window=fmt_window(m.window)
        if m.family in ("blockdance", "forecast", "calibrated", "deepcache")
        else "",
        cache_block="" if m.cache_block is None else str(m.cache_block),
        threshold="" if m.threshold is None else f"{m.threshold:g}",
        matches=m.matches,
        samples=images.shape[0],
        reuse_calls=reuse,
        calls=calls,
        flop_bound=m.flop_bound(sc.steps, reuse),
        ssim=s,
        ssim_se=s_se,
        psnr=p,
        psnr_se=p_se,
        fid=f,
        fid_se=f_se,
        accuracy=a,
        accuracy_se=a_se,
        seconds=seconds,
    )


def run_quality(setup: Setup) -> None:
    args = setup.args
    device = torch.device(args.device)
    t_start = time.perf_counter()
    model, train_sched = load_model(args.model, device)
    num_blocks = len(model.transformer_blocks)
    data = load_dataset(args.dataset, args.classifier, args.data, device)
    clf, split = data.classifier, data.split
    train_feats = features(clf, split.train_images, device)
    n = args.samples
    labels, noise = fixed_inputs(n, args.seed, model)
    _, other_noise = fixed_inputs(n, args.seed + OTHER_SEED_OFFSET, model)
    batch = min(args.batch, n)
    log(
        f"[quality] machine: {machine()}; {n} samples (seeds {args.seed}..{args.seed + n - 1}), "
        f"batch {batch}, {num_blocks} blocks, inner compiler {args.compiler}"
    )
    fr = flop_fractions(model, setup.calibration)
    log(
        f"[quality] FLOP share skipped: BlockDance {fr.bd:.3f}, DeepCache {fr.deepcache:.3f}, "
        f"FirstBlockCache {fr.fbc:.3f}"
        + (f", calibrated {fr.calibrated:.3f}" if fr.calibrated is not None else "")
    )
    engines = Engines(model, train_sched.config, args.compiler, setup.calibration_path, "quality")
    rows: list[QualityRow] = []
    grid_images: dict[str, np.ndarray] = {}
    chosen_fbc: dict[str, list[float]] = {}

    # Floor: held-out real images against the training images (FID), and the classifier on them.
    gen = torch.Generator().manual_seed(0)
    held = torch.randperm(split.held_out_images.shape[0], generator=gen)[: min(n, 500)]
    real, real_labels = split.held_out_images[held], split.held_out_labels[held]
    real_feats = features(clf, real, device)
    real_pred = predict(clf, real)
    f_real, f_real_se = fid_stats(real_feats, train_feats, args.splits)
    a_real, a_real_se = split_stats((real_pred == real_labels).double(), args.splits)

    for sc in setup.scenarios:
        ts = timesteps_of(train_sched.config, sc, sc.steps)
        plan0 = plan_methods(setup, sc, num_blocks, ts, fr, [])
        fbc_matches: dict[float, str] = {}
        if args.fbc_thresholds is not None:
            thresholds = list(args.fbc_thresholds)
        else:
            k = min(n, args.fbc_probe_samples)
            thresholds, fbc_matches = match_blockdance(
                engines, setup, sc, plan0, labels[:k].to(device), noise[:k].to(device), fr.fbc
            )
        chosen_fbc[sc.key] = thresholds
        methods = [
            replace(m, matches=fbc_matches.get(float(m.threshold or 0.0), ""))
            if m.family == "fbc"
            else m
            for m in plan_methods(setup, sc, num_blocks, ts, fr, thresholds)
        ]
        log(f"[quality] {sc.name}: {len(methods)} methods: " + ", ".join(m.name for m in methods))
        ref: torch.Tensor | None = None
        for m in methods + [replace(methods[0], name="full, other seeds", family="floor")]:
            t0 = time.perf_counter()
            other = m.family == "floor"
            images, reuse, calls = generate_all(
                engines,
                m,
                sc,
                labels,
                other_noise if other else noise,
                batch,
                args.guidance,
                device,
                t_start,
            )
            seconds = time.perf_counter() - t0
            if m.family == "full":
                ref = images
            feats = features(clf, images, device)
            row = quality_row(
                sc,
                m,
                images,
                ref,
                labels,
                feats,
                train_feats,
                predict(clf, images),
                args.splits,
                reuse,
                calls,
                seconds,
            )
            rows.append(row)
            grid_images[f"{sc.name}|{m.name}"] = data.to_uint8(images[:GRID_SAMPLES])
            log(
                f"  -> SSIM {row.ssim:.4f} ± {row.ssim_se:.4f}, PSNR {row.psnr:.2f}, "
                f"FID {row.fid:.3f}, accuracy {row.accuracy:.3f}, reuse {reuse:g}/{calls}, "
                f"FLOP bound {row.flop_bound:.2f}x, {seconds:.1f} s"
            )
        engines.drop_fbc()
        nan = float("nan")
        rows.append(
            QualityRow(
                scenario=sc.name,
                family="floor",
                method=REAL_FLOOR,
                steps=0,
                interval=0,
                window="",
                cache_block="",
                threshold="",
                matches="",
                samples=real.shape[0],
                reuse_calls=0,
                calls=0,
                flop_bound=nan,
                ssim=nan,
                ssim_se=nan,
                psnr=nan,
                psnr_se=nan,
                fid=f_real,
                fid_se=f_real_se,
                accuracy=a_real,
                accuracy_se=a_real_se,
                seconds=0.0,
            )
        )
    grid_images["labels"] = labels[:GRID_SAMPLES].numpy()
    write_csv(setup.path("quality_metrics", ".csv"), rows)
    np.savez_compressed(setup.path("quality_samples", ".npz"), **grid_images)  # type: ignore[arg-type]
    meta = {
        "part": "quality",
        "machine": machine(),
        "command": command_line(),
        "model": str(args.model),
        "dataset": args.dataset,
        "samples": n,
        "seeds": f"{args.seed}..{args.seed + n - 1} (sample i: seed {args.seed} + i, "
        f"label i % {int(labels.max()) + 1})",
        "other_seeds": f"{args.seed + OTHER_SEED_OFFSET}..{args.seed + OTHER_SEED_OFFSET + n - 1}",
        "splits": args.splits,
        "batch": batch,
        "device": str(device),
        "inner_compiler": args.compiler,
        "guidance": args.guidance,
        "num_blocks": num_blocks,
        "flop_fractions": asdict(fr),
        "fbc_thresholds": chosen_fbc,
        "fbc_probe_samples": min(n, args.fbc_probe_samples),
        "real_floor_samples": int(real.shape[0]),
        "train_images": int(split.train_images.shape[0]),
        "fid_train_vs_train_check": frechet_distance(train_feats, train_feats),
        "calibration": setup.calibration_meta(),
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    setup.path("quality_metrics", ".json").write_text(json.dumps(meta, indent=1) + "\n")
    log(
        f"[quality] wrote {setup.path('quality_metrics', '.csv')} "
        f"({time.perf_counter() - t_start:.0f} s)"
    )
