"""BlockDance-Ada against the static schedule on the reference DiT: quality at matched block work,
and measured speed through the backend.

    python -m benchmarks.ada.evaluate --policy benchmarks/reference/ada-policy.safetensors \
        --samples 200 --tag reference [--dataset colour]

Quality: held-out seeds (never in the training pool), DDIM 50, CFG 3, the eager per-sample engine
(``benchmarks.ada.rollout``, which equals the backend: ``tests/test_ada.py::
test_rollout_engine_matches_backend``); every method starts from the same noise and the same
steps up to the decision step. Per method: reuse steps per sample, the FLOP bound of that block
work, SSIM / PSNR against the all-compute sample, class accuracy, FID against the held-out
images (classifier features; biased upward at this sample count, compare between rows only).

Speed: one model compiled with ``backend="blockdance"`` (inductor), switched between methods
with ``set_schedule`` (no recompile), generations interleaved, median of ``--repeats``; at batch
``--speed-batch`` samples (a mixed step computes the region for the whole batch) and batch 1.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import bd_compile
from bd_compile.ada import load_policy
from bd_compile.metrics import psnr, ssim
from bd_compile.sampling import denoise, make_scheduler
from benchmarks.ada import reference
from benchmarks.ada.reference import Reference
from benchmarks.ada.rollout import Prefix
from benchmarks.common import flop_bound_speedup, log, machine, write_csv
from benchmarks.fid import fid
from benchmarks.quality.plan import seeded_inputs
from benchmarks.reference.classifier_common import predict

RESULTS = Path(__file__).resolve().parents[1] / "results"


@dataclass
class Row:
    method: str
    reuse_steps: float  #: per sample, mean
    reuse_min: int
    reuse_max: int
    flop_bound: float
    ssim: float
    ssim_se: float
    psnr: float
    psnr_se: float
    accuracy: float
    fid: float
    distinct_patterns: int
    #: share of the region's sample-steps a rows-only mixed step would skip at --speed-batch
    rows_only_saving: float
    speed_batch: float = float("nan")  #: speedup vs full, measured, batch --speed-batch
    speed_1: float = float("nan")  #: batch 1


def _static(timesteps: list[float], n: int) -> list[bool]:
    return bd_compile.plan(timesteps, interval=n, window=(0.4, 0.95))


def rows_only_saving(patterns: list[str], batch: int) -> float:
    """In batches of ``batch`` consecutive samples, the share of the cached region's
    sample-steps that computing only the computing samples' rows would skip: the backend runs
    the region for the whole batch at a step where any sample computes (a mixed step)."""
    whole = rows = 0
    for lo in range(0, len(patterns), batch):
        group = patterns[lo : lo + batch]
        for step in zip(*group, strict=True):
            computing = step.count("C")
            whole += len(group) if computing else 0
            rows += computing
    return 1.0 - rows / whole if whole else 0.0


def _columns(compute: torch.Tensor, k: int) -> Callable[[int], torch.Tensor]:
    """Step ``i`` -> column ``i - k - 1`` of a ``[samples, steps after k]`` compute mask."""

    def fn(i: int) -> torch.Tensor:
        return compute[:, i - k - 1]

    return fn


def quality(ref: Reference, args: argparse.Namespace, policies: dict[str, str]) -> dict[str, Any]:
    model, sampler = ref.model, ref.sampler
    k = sampler.decision_step
    plans = {f"static N={n}": _static(sampler.timesteps, n) for n in (2, 3, 4)}
    for name, plan in plans.items():
        assert not any(plan[: k + 1]), f"{name} reuses before the decision step"
    loaded = {name: load_policy(p) for name, p in policies.items()}
    finals: dict[str, list[torch.Tensor]] = {"full": []}
    patterns: dict[str, list[str]] = {}
    all_labels = []
    for lo in range(0, args.samples, args.batch):
        ids = list(range(lo, min(args.samples, lo + args.batch)))
        labels, noise = seeded_inputs(ids, args.seed, model)
        all_labels.append(labels)
        pre: Prefix = sampler.prefix(noise, labels)
        n = len(ids)
        runs: dict[str, Callable[[int], torch.Tensor] | None] = {"full": None}
        per_sample: dict[str, torch.Tensor] = {}  # [n, steps after k] compute
        for name, plan in plans.items():
            per_sample[name] = torch.tensor([[not r for r in plan[k + 1 :]]] * n)
        for name, policy in loaded.items():
            b = sampler.bins(policy.meta.bins)
            compute = policy.logits(pre.stats, pre.progress) > 0
            per_sample[name] = compute[:, torch.tensor(b)]
        for name, comp in per_sample.items():
            runs[name] = _columns(comp, k)
            patterns.setdefault(name, []).extend(
                "C" * (k + 1) + "".join("C" if c else "R" for c in row) for row in comp.tolist()
            )
        for name, fn in runs.items():
            x, _ = sampler.finish(pre, labels, fn)
            finals.setdefault(name, []).append(x.clamp(-1, 1))
        log(f"quality: {ids[-1] + 1}/{args.samples} samples")
    labels = torch.cat(all_labels)
    out: dict[str, Any] = {}
    for name, xs in finals.items():
        out[name] = {
            "images": torch.cat(xs),
            "patterns": patterns.get(name, ["C" * sampler.steps] * len(labels)),
        }
    out["_labels"] = {"labels": labels}
    return out


def speed(
    ref: Reference, args: argparse.Namespace, policies: dict[str, str], batch: int
) -> dict[str, float]:
    """Median generation time per method through the backend (inductor), interleaved."""
    model = ref.model
    options = {"interval": 1, "inner": args.inner, "cache_block": ref.cache_block}
    compiled = torch.compile(model, backend="blockdance", options=options)
    labels, noise = seeded_inputs(range(batch), args.seed, model)
    y = torch.cat([labels, torch.full_like(labels, ref.sampler.null)])

    def generate() -> None:
        denoise(
            compiled,
            make_scheduler(ref.train_config, "ddim"),
            lambda x, t: {"hidden_states": x, "timestep": t, "class_labels": y},
            noise,
            ref.sampler.steps,
            guidance_scale=ref.sampler.guidance,
        )

    settings: dict[str, dict[str, Any]] = {"full": {"interval": 1}}
    for n in (2, 3, 4):
        settings[f"static N={n}"] = {"interval": n, "window": (ref.sampler.rho, 0.95)}
    for name, path in policies.items():
        settings[name] = {"policy": path}
    times: dict[str, list[float]] = {name: [] for name in settings}
    generate()  # compile
    for r in range(args.repeats + 1):
        for name, opts in settings.items():
            bd_compile.set_schedule(model, **{"policy": None, "interval": 1, **opts})
            t0 = time.perf_counter()
            generate()
            if r:  # the first round warms every schedule
                times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    log(f"speed at batch {batch}: " + ", ".join(f"{k} {v:.2f} s" for k, v in med.items()))
    return {name: med["full"] / v for name, v in med.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    reference.add_arguments(ap)
    ap.add_argument("--policy", action="append", default=[], help="NAME=PATH or PATH")
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--seed", type=int, default=100_000, help="first seed (held out)")
    ap.add_argument("--speed-batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--inner", default="inductor")
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--tag", default="reference")
    args = ap.parse_args(argv)
    command = " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    torch.set_num_threads(1)
    policies: dict[str, str] = {}
    for p in args.policy:
        name, _, path = p.rpartition("=")
        policies[name or f"Ada {Path(path).stem}"] = path
    t0 = time.time()
    ref = reference.load(args)
    share = ref.region_share()
    res = quality(ref, args, policies)
    labels = res.pop("_labels")["labels"]
    data = ref.data()
    classifier, held_out = data.classifier, data.split.held_out_images
    full = res["full"]["images"]
    steps = ref.sampler.steps
    rows: dict[str, Row] = {}
    for name, r in res.items():
        img = r["images"]
        reuse = torch.tensor([p.count("R") for p in r["patterns"]], dtype=torch.float64)
        s = ssim(img, full)
        d = psnr(img, full).clamp(max=100.0)
        rows[name] = Row(
            method=name,
            reuse_steps=float(reuse.mean()),
            reuse_min=int(reuse.min()),
            reuse_max=int(reuse.max()),
            flop_bound=flop_bound_speedup(steps, float(reuse.mean()), share),
            ssim=float(s.mean()),
            ssim_se=float(s.std() / len(s) ** 0.5),
            psnr=float(d.mean()),
            psnr_se=float(d.std() / len(d) ** 0.5),
            accuracy=float((predict(classifier, img) == labels).float().mean()),
            fid=fid(img, held_out, classifier.features),
            distinct_patterns=len(set(r["patterns"])),
            rows_only_saving=rows_only_saving(r["patterns"], args.speed_batch),
        )
    quality_s = time.time() - t0
    speed_note = "not measured (--no-speed)"
    if not args.no_speed:
        t1 = time.time()
        for batch, attr in ((args.speed_batch, "speed_batch"), (1, "speed_1")):
            for name, v in speed(ref, args, policies, batch).items():
                setattr(rows[name], attr, v)
        speed_note = (
            f"inner {args.inner}, one compiled model switched with set_schedule, median of "
            f"{args.repeats} interleaved generations per method, {time.time() - t1:.0f} s"
        )
    out = RESULTS / f"ada-{args.tag}.md"
    write_csv(out.with_suffix(".csv"), list(rows.values()))
    lines = [
        f"# BlockDance-Ada vs static BlockDance-N on the reference DiT ({args.tag})",
        "",
        f"Generated by `python -m benchmarks.ada.evaluate {command}`",
        "",
        f"- Machine: {machine()}.",
        f"- Quality: {args.samples} samples, seeds {args.seed}..{args.seed + args.samples - 1} "
        f"(held out from training), labels i % classes, {ref.describe()} (blocks "
        f"0-{ref.cache_block} of {ref.blocks} skipped on reuse), static window "
        f"{ref.sampler.rho:.0%}-95%, Ada rho {ref.sampler.rho}; {quality_s:.0f} s.",
        f"- Speed: {speed_note}; speedup vs the same compiled model computing every step.",
        f"- FLOP bound: {steps} / ({steps} - reuse x {share:.3f}) (region's FLOP share, "
        "torch.utils.flop_counter).",
        "",
        f"| method | reuse steps / {steps} (min-max) | FLOP bound | speed batch "
        f"{args.speed_batch} | speed batch 1 | SSIM vs full | PSNR dB | accuracy | FID | "
        "distinct patterns | region work rows-only would save (batch "
        f"{args.speed_batch}) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows.values():
        lines.append(
            f"| {row.method} | {row.reuse_steps:.1f} ({row.reuse_min}-{row.reuse_max}) | "
            f"{row.flop_bound:.2f}x | {row.speed_batch:.2f}x | {row.speed_1:.2f}x | "
            f"{row.ssim:.4f} ± {row.ssim_se:.4f} | {row.psnr:.2f} ± {row.psnr_se:.2f} | "
            f"{row.accuracy:.3f} | {row.fid:.2f} | {row.distinct_patterns} | "
            f"{row.rows_only_saving:.1%} |"
        )
    out.write_text("\n".join(lines) + "\n")
    log("\n".join(lines))
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
