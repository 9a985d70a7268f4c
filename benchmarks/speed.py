"""Speed of the blockdance backend against eager and plain inductor, side by side.

    python -m benchmarks.speed              # CPU, one thread, PixArt-shaped 28-block DiT
    python -m benchmarks.speed --quick      # smaller model and fewer repeats (minutes)
    python -m benchmarks.speed --device cuda --width 1152 --latent 128 --dtype bfloat16

For a 30-step DPM-Solver++ loop and a 50-step DDIM loop (batched CFG, batch 2) it reports the
median per-generation time of eager, inductor and blockdance N=2,3,4 (one compiled model, the
schedule switched with ``bd_compile.set_schedule``: no recompile), the speedup over inductor,
the FLOP-bound speedup of the schedule that actually ran (reuse calls x FLOP fraction of the
skipped blocks, counted by torch.utils.flop_counter), their ratio (efficiency), peak memory
above the resting level and the cache bytes; and the cold and warm compile time of inductor
and blockdance, each measured in a fresh subprocess (cold: empty TORCHINDUCTOR_CACHE_DIR; warm:
the same directory again). Writes benchmarks/results/speed[-<tag>].md and .csv.
"""

from __future__ import annotations

import argparse
import copy
import csv
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import PixArtTransformer2DModel

import bd_compile
from bd_compile.sampling import denoise, make_scheduler
from benchmarks.common import (
    flop_bound_speedup,
    machine,
    median,
    peak_memory,
    region_flop_fraction,
    timed,
)

RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Scenario:
    name: str
    sampler: str  # "dpm" | "ddim"
    steps: int


SCENARIOS = (Scenario("DPM-Solver++ 30", "dpm", 30), Scenario("DDIM 50", "ddim", 50))


@dataclass
class Row:
    scenario: str
    method: str
    gen_time_s: float
    speedup_vs_inductor: float
    flop_bound: float
    efficiency: float
    reuse_calls: int
    calls: int
    peak_mem_mb: float
    cache_mb: float


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(0)
    heads = args.width // 64
    model = PixArtTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=64,
        in_channels=4,
        out_channels=8,
        num_layers=args.blocks,
        cross_attention_dim=args.width,
        caption_channels=args.caption_channels,
        sample_size=args.latent,
        patch_size=2,
        norm_type="ada_norm_single",
        use_additional_conditions=False,
    )
    return model.eval().to(args.device, getattr(torch, args.dtype))


class Loop:
    """One generation: ``bd_compile.sampling.denoise`` with batched classifier-free guidance
    (batch 2: one sample, cond and uncond), scale 4.5."""

    def __init__(self, args: argparse.Namespace, scenario: Scenario) -> None:
        dev, dt = torch.device(args.device), getattr(torch, args.dtype)
        g = torch.Generator().manual_seed(0)
        self.latents = torch.randn(1, 4, args.latent, args.latent, generator=g).to(dev, dt)
        self.text = torch.randn(2, 16, args.caption_channels, generator=g).to(dev, dt)
        # DPM-Solver++ (the scheduler's default algorithm) or DDIM, 1000 training steps.
        self.scheduler = make_scheduler(None, scenario.sampler)
        self.steps, self.device = scenario.steps, dev

    def inputs(self, x: torch.Tensor, t: torch.Tensor) -> dict[str, Any]:
        """The kwargs of one model call on the doubled batch ``x`` at timesteps ``t [2]``."""
        return {
            "hidden_states": x,
            "encoder_hidden_states": self.text,
            "timestep": t,
            "return_dict": False,
        }

    def example(self, t: int = 999) -> dict[str, Any]:
        """The kwargs of the first call of a generation (for FLOP counting and compiling)."""
        x = torch.cat([self.latents, self.latents])
        return self.inputs(x, torch.full((2,), t, device=self.device))

    def __call__(self, model: Any) -> torch.Tensor:
        return denoise(
            model, self.scheduler, self.inputs, self.latents, self.steps, guidance_scale=4.5
        )


def probe_compile(args: argparse.Namespace) -> None:
    """In a fresh process: compile time of the first call = first call - a steady call."""
    torch.set_num_threads(args.threads)
    model = build_model(args)
    loop = Loop(args, SCENARIOS[0])
    kwargs = loop.example()
    options = {"interval": 2} if args.probe_compile == "blockdance" else None
    compiled = torch.compile(model, backend=args.probe_compile, options=options)
    with torch.no_grad():
        t0 = time.perf_counter()
        compiled(**kwargs)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        compiled(**kwargs)
        steady = time.perf_counter() - t0
    print(json.dumps({"compile_s": first - steady}))


def compile_times(args: argparse.Namespace, backend: str) -> tuple[float, float]:
    argv = [sys.executable, "-m", "benchmarks.speed", "--probe-compile", backend]
    argv += [f"--{k}={getattr(args, k)}" for k in ("blocks", "width", "latent", "device", "dtype")]
    argv += [f"--threads={args.threads}"]
    times = []
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "OMP_NUM_THREADS": str(args.threads)}
        for _ in ("cold", "warm"):
            out = subprocess.run(argv, env=env, check=True, capture_output=True, text=True)
            times.append(json.loads(out.stdout.strip().splitlines()[-1])["compile_s"])
            print(f"  {backend} compile: {times[-1]:.1f} s", flush=True)
    return times[0], times[1]


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"machine: {machine()}", flush=True)
    model = build_model(args)
    methods: dict[str, Any] = {"eager": model}
    methods["inductor"] = torch.compile(copy.deepcopy(model), backend="inductor")
    bd = torch.compile(copy.deepcopy(model), backend="blockdance", options={"interval": 2})
    for n in args.intervals:
        methods[f"blockdance N={n}"] = (bd, n)

    rows: list[Row] = []
    fraction = None
    for scenario in SCENARIOS:
        loop = Loop(args, scenario)
        print(f"{scenario.name}: warm-up", flush=True)
        loop(methods["eager"])
        loop(methods["inductor"])
        loop(bd)
        if fraction is None:
            lay = bd_compile.stats(bd).graphs[0]
            paths = list(lay.blocks[: lay.cache_block + 1])
            fraction = region_flop_fraction(model, loop.example(), paths)
            print(f"  FLOP fraction of blocks 0..{lay.cache_block}: {fraction:.3f}", flush=True)
        times: dict[str, list[float]] = {m: [] for m in methods}
        peaks: dict[str, int] = {}
        stats: dict[str, tuple[int, int, int]] = {}
        for rep in range(args.repeats):
            for name, m in methods.items():
                target = m
                if isinstance(m, tuple):
                    target, n = m
                    bd_compile.set_schedule(target, interval=n)
                with peak_memory(device) as mem:
                    times[name].append(timed(functools.partial(loop, target), device))
                peaks[name] = max(peaks.get(name, 0), mem["peak"])
                if isinstance(m, tuple):
                    st = bd_compile.stats(target)
                    g = st.last
                    stats[name] = (g.calls, g.reused_calls, g.cache_bytes)
                print(f"  rep {rep} {name}: {times[name][-1]:.3f} s", flush=True)
        base = median(times["inductor"])
        for name in methods:
            calls, reused, cache = stats.get(name, (scenario.steps, 0, 0))
            bound = flop_bound_speedup(calls, reused, fraction) if reused else 1.0
            speedup = base / median(times[name])
            rows.append(
                Row(
                    scenario.name,
                    name,
                    median(times[name]),
                    speedup,
                    bound,
                    speedup / bound,
                    reused,
                    calls,
                    peaks[name] / 2**20,
                    cache / 2**20,
                )
            )
    compile_rows = {b: compile_times(args, b) for b in ("inductor", "blockdance")}
    write(args, rows, compile_rows, machine(), fraction or 0.0)


def write(
    args: argparse.Namespace,
    rows: list[Row],
    compile_rows: dict[str, tuple[float, float]],
    where: str,
    fraction: float,
) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "speed" + (f"-{args.tag}" if args.tag else "")
    with open(RESULTS / f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        w.writeheader()
        w.writerows(asdict(r) for r in rows)
    ind = {r.scenario: r for r in rows if r.method == "inductor"}
    lines = [
        f"# Speed: blockdance vs inductor ({args.blocks} blocks x {args.width} wide, "
        f"{args.latent}x{args.latent} latent, batch 2 CFG, {args.dtype})",
        "",
        f"Machine: {where}. Command: `python -m benchmarks.speed {' '.join(sys.argv[1:])}`.",
        f"Median of {args.repeats} generations per method, methods interleaved in one process. "
        f"FLOP fraction of the skipped blocks: {fraction:.3f}. Peak memory: above the level "
        "before the generation (CUDA: allocator peak; CPU: malloc in-use bytes sampled every "
        "~0.2 ms; see benchmarks/README.md).",
        "",
        "| sampler | method | s/gen | speedup vs inductor | FLOP-bound | efficiency | reuse/calls "
        "| peak mem MB (vs inductor) | cache MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        dm = r.peak_mem_mb - ind[r.scenario].peak_mem_mb
        lines.append(
            f"| {r.scenario} | {r.method} | {r.gen_time_s:.3f} | {r.speedup_vs_inductor:.3f}x | "
            f"{r.flop_bound:.3f}x | {r.efficiency:.3f} | {r.reuse_calls}/{r.calls} | "
            f"{r.peak_mem_mb:.1f} ({dm:+.1f}) | {r.cache_mb:.2f} |"
        )
    lines += ["", "| compile | cold s | warm s | warm vs inductor |", "|---|---|---|---|"]
    warm_ind = compile_rows["inductor"][1]
    for b, (cold, warm) in compile_rows.items():
        lines.append(f"| {b} | {cold:.1f} | {warm:.1f} | {warm / warm_ind:.2f}x |")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--blocks", type=int, default=28)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--latent", type=int, default=32)
    p.add_argument("--caption-channels", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--intervals", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--tag", default="", help="suffix of the results files")
    p.add_argument("--quick", action="store_true", help="12 blocks x 128, 16x16 latent, 1 repeat")
    p.add_argument("--probe-compile", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.blocks, args.width, args.latent, args.repeats = 12, 128, 16, 1
        args.tag = args.tag or "quick"
    if args.probe_compile:
        probe_compile(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
