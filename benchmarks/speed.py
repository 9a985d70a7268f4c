"""Speed of the blockdance backend against eager and plain inductor, side by side.

    python -m benchmarks.speed              # CPU, one thread, PixArt-shaped 28-block DiT
    python -m benchmarks.speed --quick      # smaller model and fewer repeats (minutes)
    python -m benchmarks.speed --device cuda --width 1152 --latent 128 --dtype bfloat16
    python -m benchmarks.speed --scenarios dpm30 --cudagraphs --counted --no-compile-times

``--scenarios`` picks scenarios by short name; ``--cudagraphs`` adds inductor and blockdance with
inductor's ``mode="reduce-overhead"`` (CUDA graphs; on CPU inductor ignores the mode and the rows
time plain inductor again); ``--counted`` runs the blockdance rows inside
``bd_compile.generation(model, timesteps=..., branches=1)`` (Note [Counted steps]: no
device-to-host sync per call; the warm-up generation is the one that checks the counting, Note
[Counted steps check themselves], with one host read per call, and is not timed) and, on CUDA,
checks one extra generation per blockdance model with ``torch.cuda.set_sync_debug_mode("error")``
around its model calls; ``--no-compile-times`` skips
the compile-time subprocesses; ``--warm-only`` compiles and runs the warm-up generations, times
nothing, and leaves TORCHINDUCTOR_CACHE_DIR warm for a timed run (benchmarks/gpu.sh runs it beside
another job). See benchmarks/README.md ("GPU run") and benchmarks/gpu.sh.

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
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import PixArtTransformer2DModel
from torch._dynamo.utils import counters

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
    key: str  # the short name ``--scenarios`` takes


SCENARIOS = (
    Scenario("DPM-Solver++ 30", "dpm", 30, "dpm30"),
    Scenario("DDIM 50", "ddim", 50, "ddim50"),
)
SCENARIO_KEYS = tuple(s.key for s in SCENARIOS)
#: the suffix of the rows that compile with inductor's ``mode="reduce-overhead"``
CG = " + CUDA graphs"


def select_scenarios(keys: list[str] | None) -> list[Scenario]:
    """The scenarios named by ``keys`` (short names), in the order given; all when ``None``."""
    if keys is None:
        return list(SCENARIOS)
    by_key = {s.key: s for s in SCENARIOS}
    unknown = [k for k in keys if k not in by_key]
    if unknown:
        raise ValueError(f"expected scenarios among {list(SCENARIO_KEYS)}, got {unknown}")
    return [by_key[k] for k in dict.fromkeys(keys)]


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
    #: inductor + CUDA graphs' s/gen / this row's (``--cudagraphs``; else 0)
    speedup_vs_inductor_cg: float = 0.0
    #: ``--counted`` on CUDA: the sync check of this blockdance model ("pass", "fail: ...")
    sync_check: str = ""


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
        # The model-facing timesteps of the loop (``denoise`` sets the same ones), for
        # ``bd_compile.generation(..., timesteps=...)``.
        probe = make_scheduler(None, scenario.sampler)
        probe.set_timesteps(scenario.steps)
        self.timesteps: list[float] = [float(t) for t in probe.timesteps.tolist()]

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


@dataclass
class Method:
    """One row's model: ``interval`` set means a blockdance model switched to N = interval."""

    model: Any
    interval: int | None = None

    @property
    def blockdance(self) -> bool:
        return self.interval is not None


def build_methods(args: argparse.Namespace, model: torch.nn.Module) -> dict[str, Method]:
    """eager, inductor, blockdance N=... and with ``--cudagraphs`` their CUDA-graph variants
    (one compiled blockdance model per mode, its schedule switched per row)."""
    methods: dict[str, Method] = {"eager": Method(model)}
    methods["inductor"] = Method(torch.compile(copy.deepcopy(model), backend="inductor"))
    if args.cudagraphs:
        methods[f"inductor{CG}"] = Method(
            torch.compile(copy.deepcopy(model), backend="inductor", mode="reduce-overhead")
        )
    # Compiled at the first row's N, so that its warm-up generation runs that schedule.
    first = args.intervals[0]
    variants: list[tuple[str, dict[str, Any]]] = [("", {"interval": first})]
    if args.cudagraphs:
        variants.append((CG, {"interval": first, "inner_options": {"mode": "reduce-overhead"}}))
    for suffix, options in variants:
        bd = torch.compile(copy.deepcopy(model), backend="blockdance", options=options)
        for n in args.intervals:
            methods[f"blockdance N={n}{suffix}"] = Method(bd, n)
    return methods


def blockdance_models(methods: dict[str, Method]) -> dict[str, Any]:
    """Each compiled blockdance model once, under the name of its first row."""
    seen: dict[int, tuple[str, Any]] = {}
    for name, m in methods.items():
        if m.blockdance and id(m.model) not in seen:
            seen[id(m.model)] = (name, m.model)
    return dict(seen.values())


def warm_up_methods(args: argparse.Namespace, methods: dict[str, Method]) -> dict[str, Method]:
    """What the warm-up generations run: each model once (the first call compiles), blockdance
    at its first N. With ``--cudagraphs`` every row once: each schedule's call pattern is then
    recorded by CUDA graph trees before the timed generations."""
    if args.cudagraphs:
        return methods
    return {
        name: m
        for name, m in methods.items()
        if not m.blockdance or name in blockdance_models(methods)
    }


def generation_context(
    args: argparse.Namespace, loop: Loop, method: Method
) -> AbstractContextManager[None]:
    """``--counted``: the blockdance rows run as one explicit generation with the loop's
    timesteps, counted on the host (batched CFG: one call per step)."""
    if args.counted and method.blockdance:
        return bd_compile.generation(method.model, timesteps=loop.timesteps, branches=1)
    return nullcontext()


@contextmanager
def sync_debug_error() -> Iterator[None]:
    """CUDA's sync debug mode "error" inside the block: a device-to-host sync raises."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def checked_calls(model: Any) -> Callable[..., Any]:
    """``model`` with each call under ``sync_debug_error``: the sampler's own steps (DDIM indexes
    a CPU table with the timestep, DPM-Solver++ looks its step index up) stay outside the check."""

    def call(*a: Any, **kw: Any) -> Any:
        with sync_debug_error():
            return model(*a, **kw)

    return call


def sync_check(args: argparse.Namespace, loop: Loop, method: Method) -> str:
    """One extra generation of a warmed-up blockdance model with every model call under
    ``set_sync_debug_mode("error")``: "pass", or "fail: <the error>" (caught, not raised)."""
    assert method.interval is not None
    bd_compile.set_schedule(method.model, interval=method.interval)
    try:
        with generation_context(args, loop, method):
            loop(checked_calls(method.model))
        torch.cuda.synchronize()
    except Exception as e:  # the check reports, the benchmark goes on
        first = (str(e).strip().splitlines() or [""])[0][:160]
        return f"fail: {type(e).__name__}: {first}"
    return "pass"


def skipped_fraction(compiled: Any, model: torch.nn.Module, loop: Loop) -> float:
    """The FLOP fraction of one forward of ``model`` in the blocks a reuse step of blockdance
    model ``compiled`` (called once) skips."""
    lay = bd_compile.stats(compiled).graphs[0]
    paths = list(lay.blocks[: lay.cache_block + 1])
    return region_flop_fraction(model, loop.example(), paths)


def probe_compile(args: argparse.Namespace) -> None:
    """In a fresh process: compile time of the first call = first call - a steady call."""
    torch.set_num_threads(args.threads)
    model = build_model(args)
    loop = Loop(args, select_scenarios(args.scenarios)[0])
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
    if args.scenarios:
        argv += ["--scenarios", *args.scenarios]
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
    methods = build_methods(args, model)
    bd_models = blockdance_models(methods)
    check = args.counted and device.type == "cuda"

    rows: list[Row] = []
    fraction = None
    for scenario in select_scenarios(args.scenarios):
        loop = Loop(args, scenario)
        print(f"{scenario.name}: warm-up", flush=True)
        called: set[int] = set()  # set_schedule needs a model called once
        for name, m in warm_up_methods(args, methods).items():
            if m.blockdance and id(m.model) in called:
                bd_compile.set_schedule(m.model, interval=m.interval)
            with generation_context(args, loop, m):
                seconds = timed(functools.partial(loop, m.model), device)
            called.add(id(m.model))
            print(f"  warm-up {name}: {seconds:.3f} s", flush=True)
        if args.cudagraphs:  # Note [Static inputs]: the weights must not be among them
            copied = counters["inductor"]["cudagraph_recorded_non_static_inputs"]
            print(f"  CUDA graphs recorded so far copy {copied} inputs per replay", flush=True)
        if args.warm_only:
            continue
        if fraction is None:
            fraction = skipped_fraction(next(iter(bd_models.values())), model, loop)
            print(f"  FLOP fraction of the skipped blocks: {fraction:.3f}", flush=True)
        times: dict[str, list[float]] = {m: [] for m in methods}
        peaks: dict[str, int] = {}
        stats: dict[str, tuple[int, int, int]] = {}
        for rep in range(args.repeats):
            for name, m in methods.items():
                if m.blockdance:
                    bd_compile.set_schedule(m.model, interval=m.interval)
                with peak_memory(device) as mem, generation_context(args, loop, m):
                    times[name].append(timed(functools.partial(loop, m.model), device))
                peaks[name] = max(peaks.get(name, 0), mem["peak"])
                if m.blockdance:
                    g = bd_compile.stats(m.model).last
                    stats[name] = (g.calls, g.reused_calls, g.cache_bytes)
                print(f"  rep {rep} {name}: {times[name][-1]:.3f} s", flush=True)
        checks: dict[str, str] = {}
        if check:
            for name in bd_models:
                checks[name] = sync_check(args, loop, methods[name])
                print(f"  sync check {name}: {checks[name]}", flush=True)
        base = median(times["inductor"])
        base_cg = median(times[f"inductor{CG}"]) if args.cudagraphs else 0.0
        for name in methods:
            calls, reused, cache = stats.get(name, (scenario.steps, 0, 0))
            bound = flop_bound_speedup(calls, reused, fraction) if reused else 1.0
            t = median(times[name])
            speedup = base / t
            # Efficiency against the row's own baseline: inductor + CUDA graphs for CG rows.
            own = (base_cg if name.endswith(CG) else base) / t
            rows.append(
                Row(
                    scenario.name,
                    name,
                    t,
                    speedup,
                    bound,
                    own / bound,
                    reused,
                    calls,
                    peaks[name] / 2**20,
                    cache / 2**20,
                    base_cg / t if args.cudagraphs else 0.0,
                    checks.get(name, ""),
                )
            )
        # Results so far, so that a run stopped in a later scenario still leaves this one.
        write(args, rows, {}, machine(), fraction or 0.0, quiet=True)
    if args.warm_only:
        print("--warm-only: compiled and warmed up; nothing timed", flush=True)
        return
    compile_rows: dict[str, tuple[float, float]] = {}
    if not args.no_compile_times:
        compile_rows = {b: compile_times(args, b) for b in ("inductor", "blockdance")}
    write(args, rows, compile_rows, machine(), fraction or 0.0)


def device_name(args: argparse.Namespace) -> str:
    """The accelerator the rows ran on (``torch.cuda.get_device_name``), or "CPU"."""
    if torch.device(args.device).type == "cuda":
        return torch.cuda.get_device_name()
    return "CPU"


def write(
    args: argparse.Namespace,
    rows: list[Row],
    compile_rows: dict[str, tuple[float, float]],
    where: str,
    fraction: float,
    quiet: bool = False,
) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "speed" + (f"-{args.tag}" if args.tag else "")
    with open(RESULTS / f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        w.writeheader()
        w.writerows(asdict(r) for r in rows)
    ind = {r.scenario: r for r in rows if r.method == "inductor"}
    tokens = (args.latent // 2) ** 2
    lines = [
        f"# Speed: blockdance vs inductor ({args.blocks} blocks x {args.width} wide, "
        f"{args.latent}x{args.latent} latent, batch 2 CFG, {args.dtype})",
        "",
        f"Device: {device_name(args)}, {args.dtype}. Shapes: PixArt-shaped DiT "
        f"(`PixArtTransformer2DModel`, random weights), {args.blocks} blocks x {args.width} "
        f"({args.width // 64} heads x 64), latent 4x{args.latent}x{args.latent}, patch 2: "
        f"{tokens} tokens; batch 2 (batched CFG), 16 text tokens x {args.caption_channels}."
        + (f" {args.note}" if args.note else ""),
        "",
        f"Machine: {where}. Command: `python -m benchmarks.speed {shlex.join(sys.argv[1:])}`.",
        f"Median of {args.repeats} generations per method, methods interleaved in one process. "
        f"FLOP fraction of the skipped blocks: {fraction:.3f}. Peak memory: above the level "
        "before the generation (CUDA: allocator peak; CPU: malloc in-use bytes sampled every "
        "~0.2 ms; see benchmarks/README.md).",
    ]
    if args.cudagraphs:
        lines.append(
            f'Rows ending `{CG}`: inductor\'s `mode="reduce-overhead"` (blockdance: '
            '`inner_options={"mode": "reduce-overhead"}`); the last speedup column is '
            f"against `inductor{CG}`, and their efficiency is that speedup / FLOP-bound."
            + (
                " On CPU inductor ignores the mode: those rows are plain inductor again."
                if torch.device(args.device).type != "cuda"
                else ""
            )
        )
    if args.counted:
        lines.append(
            "Blockdance rows run inside `bd_compile.generation(model, timesteps=<the loop's "
            "timesteps>, branches=1)` (counted steps: no device-to-host sync per call)."
            + (
                " Sync check: one extra generation per blockdance model, every model call under "
                '`torch.cuda.set_sync_debug_mode("error")`.'
                if any(r.sync_check for r in rows)
                else ""
            )
        )
    head = (
        "| sampler | method | s/gen | speedup vs inductor | FLOP-bound | efficiency | reuse/calls "
        "| peak mem MB (vs inductor) | cache MB |"
    )
    rule = "|---|---|---|---|---|---|---|---|---|"
    if args.cudagraphs:
        head, rule = head + f" speedup vs inductor{CG} |", rule + "---|"
    checked = any(r.sync_check for r in rows)
    if checked:
        head, rule = head + " sync check |", rule + "---|"
    lines += ["", head, rule]
    for r in rows:
        dm = r.peak_mem_mb - ind[r.scenario].peak_mem_mb
        line = (
            f"| {r.scenario} | {r.method} | {r.gen_time_s:.3f} | {r.speedup_vs_inductor:.3f}x | "
            f"{r.flop_bound:.3f}x | {r.efficiency:.3f} | {r.reuse_calls}/{r.calls} | "
            f"{r.peak_mem_mb:.1f} ({dm:+.1f}) | {r.cache_mb:.2f} |"
        )
        if args.cudagraphs:
            line += f" {r.speedup_vs_inductor_cg:.3f}x |"
        if checked:
            line += f" {r.sync_check.replace('|', '/')} |"
        lines.append(line)
    if compile_rows:
        lines += ["", "| compile | cold s | warm s | warm vs inductor |", "|---|---|---|---|"]
        warm_ind = compile_rows["inductor"][1]
        for b, (cold, warm) in compile_rows.items():
            lines.append(f"| {b} | {cold:.1f} | {warm:.1f} | {warm / warm_ind:.2f}x |")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    if not quiet:
        print("\n".join(lines))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
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
    p.add_argument(
        "--scenarios",
        nargs="+",
        choices=SCENARIO_KEYS,
        default=None,
        help="scenarios by short name (default: all)",
    )
    p.add_argument(
        "--cudagraphs",
        action="store_true",
        help="also inductor and blockdance with mode='reduce-overhead' (CUDA graphs)",
    )
    p.add_argument(
        "--counted",
        action="store_true",
        help="blockdance rows inside bd_compile.generation(timesteps=...); CUDA: sync check",
    )
    p.add_argument(
        "--no-compile-times", action="store_true", help="skip the compile-time subprocesses"
    )
    p.add_argument(
        "--warm-only",
        action="store_true",
        help="compile and run the warm-up generations only (fills TORCHINDUCTOR_CACHE_DIR)",
    )
    p.add_argument("--note", default="", help="a sentence appended to the results' caption")
    p.add_argument("--probe-compile", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.blocks, args.width, args.latent, args.repeats = 12, 128, 16, 1
        args.tag = args.tag or "quick"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.probe_compile:
        probe_compile(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
