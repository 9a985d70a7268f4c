"""The speed part: every method on CPU, one thread, a fixed batch; median per-generation time,
speedup over plain inductor and eager, the FLOP bound of the schedule that ran."""

from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from benchmarks.common import log, machine, median, timed, write_csv
from benchmarks.quality.engines import Engines
from benchmarks.quality.fbc import fbc_graph_breaks, match_blockdance
from benchmarks.quality.plan import (
    Method,
    Scenario,
    Setup,
    command_line,
    fixed_inputs,
    flop_fractions,
    load_model,
    plan_methods,
    timesteps_of,
)


@dataclass
class SpeedRow:
    scenario: str
    family: str
    method: str
    steps: int
    threshold: str
    batch: int
    gen_time_s: float
    speedup_vs_inductor: float
    speedup_vs_eager: float
    flop_bound: float
    efficiency: float
    reuse_calls: float  # BlockDance-Ada: mean over the samples
    calls: int
    pattern: str


def thresholds_from(path: Path, scenario: str) -> list[float] | None:
    if not path.exists():
        return None
    with open(path) as f:
        found = [
            float(r["threshold"])
            for r in csv.DictReader(f)
            if r["scenario"] == scenario and r["family"] == "fbc"
        ]
    return found or None


def run_speed(setup: Setup) -> None:
    args = setup.args
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    t_start = time.perf_counter()
    model, train_sched = load_model(args.model, cpu)
    num_blocks = len(model.transformer_blocks)
    labels, noise = fixed_inputs(args.speed_batch, args.seed, model)
    fr = flop_fractions(model, setup.calibration)
    log(f"[speed] machine: {machine()}; batch {args.speed_batch}, {args.repeats} repeat(s)")
    engines = Engines(model, train_sched.config, "inductor", setup.calibration_path, "speed")
    rows: list[SpeedRow] = []
    fbc_note = fbc_graph_breaks(model)
    log(f"[speed] FirstBlockCache under Dynamo: {fbc_note}")
    for sc in setup.scenarios:
        ts = timesteps_of(train_sched.config, sc, sc.steps)
        thresholds = (
            list(args.fbc_thresholds)
            if args.fbc_thresholds is not None
            else thresholds_from(setup.path("quality_metrics", ".csv"), sc.name)
        )
        if thresholds is None:
            plan0 = plan_methods(setup, sc, num_blocks, ts, fr, [])
            thresholds, _ = match_blockdance(engines, setup, sc, plan0, labels, noise, fr.fbc)
        methods = plan_methods(setup, sc, num_blocks, ts, fr, thresholds)
        methods.insert(1, replace(methods[0], name="full (blockdance, N=1)", engine="bd"))
        methods.insert(1, replace(methods[0], name="full (eager)", engine="eager"))
        times: dict[str, list[float]] = {m.name: [] for m in methods}
        stats: dict[str, tuple[float, int, str]] = {}
        for rep in range(args.repeats + 1):  # repeat 0 is the warm-up (and compiles)
            for m in methods:
                result: list[tuple[float, int, str]] = []

                def run(
                    m: Method = m, sc: Scenario = sc, result: list[tuple[float, int, str]] = result
                ) -> None:
                    _, reuse, calls, pattern = engines.generate(m, sc, labels, noise, args.guidance)
                    result.append((reuse, calls, pattern))

                elapsed = timed(run, cpu)
                stats[m.name] = result[0]
                if rep:
                    times[m.name].append(elapsed)
                log(
                    f"[speed] {sc.name} | {'warm-up' if rep == 0 else f'repeat {rep}'} | "
                    f"{m.name}: {elapsed:.3f} s (total {time.perf_counter() - t_start:.0f} s)"
                )
        base = median(times["full"])
        eager = median(times["full (eager)"])
        for m in methods:
            t = median(times[m.name])
            reuse, calls, pattern = stats[m.name]
            bound = m.flop_bound(sc.steps if m.family == "steps" else calls, reuse)
            rows.append(
                SpeedRow(
                    scenario=sc.name,
                    family=m.family,
                    method=m.name,
                    steps=m.steps,
                    threshold="" if m.threshold is None else f"{m.threshold:g}",
                    batch=args.speed_batch,
                    gen_time_s=t,
                    speedup_vs_inductor=base / t,
                    speedup_vs_eager=eager / t,
                    flop_bound=bound,
                    efficiency=(base / t) / bound,
                    reuse_calls=reuse,
                    calls=calls,
                    pattern=pattern,
                )
            )
        engines.drop_fbc()
    write_csv(setup.path("quality_speed", ".csv"), rows)
    meta = {
        "part": "speed",
        "machine": machine(),
        "command": command_line(),
        "model": str(args.model),
        "batch": args.speed_batch,
        "seeds": f"{args.seed}..{args.seed + args.speed_batch - 1}",
        "repeats": args.repeats,
        "threads": args.threads,
        "flop_fractions": asdict(fr),
        "fbc_dynamo": fbc_note,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    setup.path("quality_speed", ".json").write_text(json.dumps(meta, indent=1) + "\n")
    log(
        f"[speed] wrote {setup.path('quality_speed', '.csv')} "
        f"({time.perf_counter() - t_start:.0f} s)"
    )
