"""Where a generation's time goes: inside the compiled graphs, and outside them.

    OMP_NUM_THREADS=1 python -m benchmarks.step_split          # the 12 x 128 reference shape

The FLOP bound of ``benchmarks.speed`` assumes a whole denoising step scales with the model's
arithmetic. What a step also pays outside the compiled graphs (the sampler's step and the CFG
arithmetic, Dynamo's guards, the AOT and inductor wrappers, and for blockdance its runtime) does
not shrink on a reuse step. This splits each generation of plain inductor and of blockdance
``N=...`` (``benchmarks.speed``'s model, loop and sampler) into the seconds spent inside the
compiled graphs (wall clock around each call of a compiled graph) and the rest, and reports two
ceilings next to the FLOP bound:

- **no-overhead ceiling**: inductor's generation time over (blockdance's time inside its graphs
  + inductor's time outside its graph): the speedup if blockdance cost nothing outside its graphs
  beyond what plain inductor costs there. Its ratio to the FLOP bound is the best efficiency any
  runtime could reach with these graphs and this sampler.
- **graph ratio**: the reuse graph's time per call over the compute graph's, against the FLOP
  share the reuse graph keeps (``1 - fraction``).

Generations are interleaved (inductor, then each N), median of ``--repeats``. CPU only: on a GPU
the clock around a graph times its launches, not its kernels.

Writes benchmarks/results/step-split[-<tag>].md and .json.
"""

from __future__ import annotations

import argparse
import copy
import functools
import itertools
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch

import bd_compile
from benchmarks.common import (
    SKIP_MODULE_GUARDS_HELP,
    clocked,
    flop_bound_speedup,
    guard_options,
    log,
    machine,
    median,
    timed,
    variants_clocked,
    write_json,
)
from benchmarks.speed import SCENARIO_KEYS, Loop, build_model, select_scenarios, skipped_fraction

RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Split:
    scenario: str
    method: str
    gen_s: float
    inside_s: float  #: in the compiled graphs, per generation
    outside_s: float  #: the rest of the generation
    compute_graph_ms: float  #: per call (inductor: its one graph)
    reuse_graph_ms: float  #: per call; 0 where nothing reused
    speedup: float
    flop_bound: float
    no_overhead_ceiling: float


def inductor_clocking(seconds: list[float]) -> Callable[..., Any]:
    """A backend: inductor, every call of its compiled graph clocked into ``seconds``."""
    from torch._inductor.compile_fx import compile_fx

    def backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        return clocked(cast(Callable[..., Any], compile_fx(gm, example_inputs)), seconds)

    return backend


def guard_seconds(compiled: Any, kwargs: dict[str, Any], repeats: int) -> float:
    """Median seconds per call that Dynamo's guards cost ``compiled`` on ``kwargs``: calls with
    and without ``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``, interleaved."""
    with_guards: list[float] = []
    without: list[float] = []
    with torch.no_grad():
        for _ in range(repeats):
            for skip, xs in ((False, with_guards), (True, without)):
                with torch.compiler.set_stance("default", skip_guard_eval_unsafe=skip):
                    xs.append(timed(lambda: compiled(**kwargs), torch.device("cpu")))
    return median(with_guards) - median(without)


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    log(f"machine: {machine()}")
    model = build_model(args)
    ind_graph: list[float] = []
    # a new dict per torch.compile: it pops the guard filter out of the dict it is given
    inductor = torch.compile(
        copy.deepcopy(model),
        backend=inductor_clocking(ind_graph),
        options=guard_options(args.skip_module_guards),
    )
    options = {"interval": args.intervals[0], **guard_options(args.skip_module_guards)}
    bd = torch.compile(copy.deepcopy(model), backend="blockdance", options=options)
    device = torch.device(args.device)
    splits: list[Split] = []
    fraction = None
    compute: list[float] = []
    reuse: list[float] = []
    for scenario in select_scenarios(args.scenarios):
        loop = Loop(args, scenario)
        log(f"{scenario.name}: warm-up")
        with torch.no_grad():
            loop(inductor)
            for i, n in enumerate(args.intervals):
                if i or fraction is not None:  # set_schedule needs a model called once
                    bd_compile.set_schedule(bd, interval=n)
                loop(bd)
        if fraction is None:
            fraction = skipped_fraction(bd, model, loop)
        names = ["inductor", *(f"blockdance N={n}" for n in args.intervals)]
        gen: dict[str, list[float]] = {m: [] for m in names}
        inside: dict[str, list[float]] = {m: [] for m in names}
        per_call: dict[str, tuple[list[float], list[float]]] = {m: ([], []) for m in names}
        reused: dict[str, int] = {}
        with variants_clocked(bd, lambda variant: compute if variant == "compute" else reuse):
            for rep, (name, n) in itertools.product(
                range(args.repeats), zip(names, (None, *args.intervals), strict=True)
            ):
                for xs in (ind_graph, compute, reuse):
                    xs.clear()
                if n is not None:
                    bd_compile.set_schedule(bd, interval=n)
                m = inductor if n is None else bd
                with torch.no_grad():
                    gen[name].append(timed(functools.partial(loop, m), device))
                graphs = ind_graph if n is None else compute
                inside[name].append(sum(graphs) + sum(reuse))
                per_call[name][0].extend(graphs)
                per_call[name][1].extend(reuse)
                if n is not None:
                    reused[name] = bd_compile.stats(bd).last.reused_calls
                log(f"  rep {rep} {name}: {gen[name][-1]:.3f} s")
        base = median(gen["inductor"])
        base_outside = base - median(inside["inductor"])
        for name in names:
            t, t_in = median(gen[name]), median(inside[name])
            r = reused.get(name, 0)
            splits.append(
                Split(
                    scenario.name,
                    name,
                    t,
                    t_in,
                    t - t_in,
                    1e3 * median(per_call[name][0]),
                    1e3 * median(per_call[name][1]) if per_call[name][1] else 0.0,
                    base / t,
                    flop_bound_speedup(scenario.steps, r, fraction) if r else 1.0,
                    base / (t_in + base_outside),
                )
            )
    log("Dynamo's guards per call (plain inductor)")
    guards = guard_seconds(inductor, Loop(args, select_scenarios(args.scenarios)[0]).example(), 30)
    return {
        "guards_ms": 1e3 * guards,
        "machine": machine(),
        "args": vars(args),
        "fraction": fraction,
        "rows": [asdict(s) for s in splits],
    }


def write(result: dict[str, Any], argv: str) -> Path:
    args = result["args"]
    path = write_json(RESULTS, "step-split", args["tag"], result)
    keep = 1 - result["fraction"]
    lines = [
        "# Where a generation's time goes: inside the compiled graphs and outside them",
        "",
        f"Machine: {result['machine']}. Model: `benchmarks.speed`'s PixArt-shaped DiT, "
        f"{args['blocks']} blocks x {args['width']}, {(args['latent'] // 2) ** 2} tokens, batch 2 "
        f"(batched CFG); its loops and samplers. FLOP fraction of the skipped blocks: "
        f"{result['fraction']:.3f} (a reuse graph keeps {keep:.3f} of the arithmetic). Median of "
        f"{args['repeats']} generations per method, interleaved. Inside: wall clock around every "
        "call of a compiled graph; outside: the rest of the generation (sampler, CFG, Dynamo's "
        "guards, wrappers, blockdance's runtime). No-overhead ceiling: inductor's time over "
        "(blockdance's time inside its graphs + inductor's time outside): what a runtime costing "
        "nothing beyond plain inductor would reach.",
        f"Dynamo's guard evaluation alone costs {result['guards_ms']:.2f} ms of every call "
        "(plain inductor's model on the first call's inputs, 30 calls each with and without "
        "`torch.compiler.set_stance(skip_guard_eval_unsafe=True)`, interleaved: medians' "
        "difference); it is part of outside, for every method."
        + (
            " `--skip-module-guards`: both models compiled with `options={'guard_filter_fn': "
            "torch.compiler.skip_guard_on_all_nn_modules_unsafe}`, no guards on the modules' "
            "weights and attributes."
            if args.get("skip_module_guards")
            else ""
        ),
        f"Reproduce: `OMP_NUM_THREADS=1 python -m benchmarks.step_split {argv}`.",
        "",
        "| sampler | method | s/gen | inside s | outside s | compute graph ms | reuse graph ms "
        "(/ compute) | speedup | FLOP bound | efficiency | no-overhead ceiling (/ bound) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        reuse = (
            f"{r['reuse_graph_ms']:.2f} ({r['reuse_graph_ms'] / r['compute_graph_ms']:.3f})"
            if r["reuse_graph_ms"]
            else ""
        )
        lines.append(
            f"| {r['scenario']} | {r['method']} | {r['gen_s']:.3f} | {r['inside_s']:.3f} | "
            f"{r['outside_s']:.3f} | {r['compute_graph_ms']:.2f} | {reuse} | "
            f"{r['speedup']:.3f}x | {r['flop_bound']:.3f}x | "
            f"{r['speedup'] / r['flop_bound']:.3f} | {r['no_overhead_ceiling']:.3f}x "
            f"({r['no_overhead_ceiling'] / r['flop_bound']:.3f}) |"
        )
    path.write_text("\n".join(lines) + "\n")
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--blocks", type=int, default=12)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--latent", type=int, default=14)
    p.add_argument("--caption-channels", type=int, default=64)
    p.add_argument("--intervals", type=int, nargs="+", default=[4])
    p.add_argument("--scenarios", nargs="+", choices=SCENARIO_KEYS, default=None)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tag", default="", help="suffix of the results files")
    p.add_argument("--skip-module-guards", action="store_true", help=SKIP_MODULE_GUARDS_HELP)
    args = p.parse_args(argv)
    args.device, args.dtype = "cpu", "float32"
    return args


def main(argv: list[str] | None = None) -> None:
    import shlex
    import sys

    args = parse_args(argv)
    path = write(run(args), shlex.join(sys.argv[1:] if argv is None else argv))
    print(path.read_text(), flush=True)


if __name__ == "__main__":
    main()
