"""Host overhead per call: blockdance's compute and reuse calls against plain inductor.

    OMP_NUM_THREADS=1 python -m benchmarks.overhead            # CPU, one thread (~3 min warm)
    python -m benchmarks.overhead --device cuda --tag gpu      # the same on a GPU

On a 28-block PixArt-shaped DiT so narrow (width 64, 4 image tokens, 8 text tokens) that its
arithmetic is negligible, the time of a call is what the host spends on it: Dynamo's guards,
the runtime, argument gathering, the AOT and inductor wrappers, the generated code's kernel
launches. Each method runs generations of ``--steps`` model calls at falling timesteps (the
input tensors fixed, batch 2 as in batched CFG), ``--repeats`` times, interleaved call by call
(call ``i`` of every method, their order rotating, then call ``i + 1``): on a shared machine
whose speed drifts over seconds, a call is compared with inductor's call timed next to it. Every
call is timed on its own and labelled by what it did (blockdance's ``compute`` calls run the
whole forward, also returning the cached values; ``reuse`` calls the blocks outside the region,
Note [One graph per call]). Reported per method and kind: the median microseconds per call and
the overhead, the median over calls of (this call - inductor's paired call), with quartiles.

Then one generation per method under ``torch.profiler`` with the Python tracer: the self time of
every event inside a model call is charged to a category by the file it runs in (Python
built-ins to the Python function that called them): Dynamo (eval frame and guards), the
blockdance runtime (``bd_compile/``), argument gathering (``passes/build_variants.py``),
AOT autograd's wrappers (``torch/_functorch``), inductor's wrappers (``torch/_inductor``), the
generated code (the inductor cache's modules), copies and allocations (``aten::copy_``,
``clone``, ``empty``), other ATen ops and the rest. The profiler slows every call down, so its
table is microseconds per call *under the profiler*: read it for where the time goes, the first
table for how much.

Writes benchmarks/results/overhead[-<tag>].md and .json.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
from diffusers import PixArtTransformer2DModel
from torch.autograd.profiler_util import FunctionEvent
from torch.profiler import ProfilerActivity, profile, record_function

import bd_compile
from bd_compile.runtime import GraphRuntime
from benchmarks.common import (
    SKIP_MODULE_GUARDS_HELP,
    guard_options,
    log,
    machine,
    median,
    timed,
    variants_clocked,
    write_json,
)

RESULTS = Path(__file__).parent / "results"

#: (category, substrings of an event's name), first match wins; Python built-ins take the
#: category of the Python function that called them.
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("argument gathering", ("passes/build_variants.py",)),
    ("blockdance runtime", ("bd_compile/",)),
    ("Dynamo (eval frame, guards)", ("torch/_dynamo/", "torch/_guards.py", "eval_frame")),
    ("AOT wrappers", ("torch/_functorch/",)),
    ("inductor wrappers", ("torch/_inductor/",)),
    ("copies, allocations", ("aten::copy_", "aten::clone", "aten::empty")),
    ("ATen ops", ("aten::",)),
)
GENERATED = "generated code (kernels, launches)"
OTHER = "other Python"


@dataclass(frozen=True)
class Method:
    name: str
    model: Any
    #: per call of a generation: "compute" or "reuse" (learned from an untimed generation)
    kinds: tuple[str, ...] = ()


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(0)
    model = PixArtTransformer2DModel(
        num_attention_heads=1,
        attention_head_dim=args.width,
        in_channels=4,
        out_channels=8,
        num_layers=args.blocks,
        cross_attention_dim=args.width,
        caption_channels=args.width,
        sample_size=args.latent,
        patch_size=2,
        norm_type="ada_norm_single",
        use_additional_conditions=False,
    )
    return model.eval().to(args.device)


class Calls:
    """``steps`` model calls at falling timesteps on fixed inputs: the host's work per call,
    without a sampler's arithmetic between the calls."""

    def __init__(self, args: argparse.Namespace) -> None:
        g = torch.Generator().manual_seed(0)
        dev = torch.device(args.device)
        self.device = dev
        self.kwargs = {
            "hidden_states": torch.randn(2, 4, args.latent, args.latent, generator=g).to(dev),
            "encoder_hidden_states": torch.randn(2, 8, args.width, generator=g).to(dev),
            "return_dict": False,
        }
        step = 1000 // args.steps
        self.timesteps = [float(999 - i * step) for i in range(args.steps)]
        self.t = [torch.full((2,), t, device=dev) for t in self.timesteps]

    def call(self, model: Any, i: int) -> float:
        """Call ``i`` of a generation (after calls ``0..i-1`` of that model); its seconds."""
        with torch.no_grad():
            return timed(lambda: model(timestep=self.t[i], **self.kwargs), self.device)

    def run(self, model: Any, label: Callable[[int], str] | None = None) -> None:
        """One generation, each call inside a profiler ``record_function`` named ``label(i)``
        when given."""
        with torch.no_grad():
            for i, t in enumerate(self.t):
                with record_function(label(i)) if label else contextlib.nullcontext():
                    model(timestep=t, **self.kwargs)


def quartiles(xs: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return q[0], q[2]


def median_ci(xs: list[float], resamples: int = 2000) -> tuple[float, float]:
    """A 95% bootstrap interval of the median of ``xs`` (seeded: the same data, the same
    interval). The quartiles say how far single calls scatter; this, how well the median is
    known, which more repeats narrow."""
    a = np.asarray(xs)
    idx = np.random.default_rng(0).integers(0, len(a), (resamples, len(a)))
    lo, hi = np.percentile(np.median(a[idx], axis=1), [2.5, 97.5])
    return float(lo), float(hi)


def kinds_of(model: Any) -> tuple[str, ...]:
    """What each call of the last generation did (one call per step: batched CFG)."""
    pattern = bd_compile.stats(model).last.pattern
    return tuple("reuse" if p == "R" else "compute" for p in pattern)


def category(event: FunctionEvent) -> str:
    e: FunctionEvent | None = event
    while e is not None and e.name.startswith("<built-in"):
        e = e.cpu_parent
    name = e.name if e is not None else event.name
    for cat, keys in CATEGORIES:
        if any(k in name for k in keys):
            return cat
    if "inductor-cache" in name or "torchinductor" in name or "/tmp" in name:
        return GENERATED
    if not name.endswith(")") and "(" not in name:  # a C++ op or kernel that is not ATen's
        return GENERATED
    return OTHER


def call_of(event: FunctionEvent) -> str | None:
    """The ``record_function`` label of the model call ``event`` ran in, if any."""
    e: FunctionEvent | None = event
    while e is not None:
        if e.name.startswith("call:"):
            return e.name
        e = e.cpu_parent
    return None


def runtime_share(calls: Calls, m: Method, repeats: int) -> dict[str, float]:
    """Median microseconds per call, per kind, that blockdance's runtime spends around the
    compiled graph it runs (``GraphRuntime.__call__`` minus the variant's call): measured in
    place, each call after the previous call's kernels, not in a hot loop of the runtime alone."""
    inside: list[float] = []
    around: dict[str, list[float]] = defaultdict(list)
    kind = [""]  # what the call being timed does
    call = GraphRuntime.__call__

    def measured(self: GraphRuntime, *args: Any) -> Any:
        inside.clear()
        t0 = time.perf_counter()
        out = call(self, *args)
        around[kind[0]].append(time.perf_counter() - t0 - sum(inside))
        return out

    with (
        variants_clocked(m.model, lambda _: inside),
        mock.patch.object(GraphRuntime, "__call__", measured),
    ):
        for _ in range(repeats):
            for i, kind[0] in enumerate(m.kinds):
                calls.call(m.model, i)
    return {k: 1e6 * median(v) for k, v in around.items()}


def breakdown(calls: Calls, m: Method) -> dict[str, dict[str, float]]:
    """Microseconds per call, per kind and category, of one generation under the profiler."""
    kinds = m.kinds or ("call",) * len(calls.t)
    with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
        calls.run(m.model, label=lambda i: f"call:{kinds[i]}:{i}")
    per_kind: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for e in prof.events():
        label = call_of(e)
        if label is None or e.name == label:
            continue
        per_kind[label.split(":")[1]][category(e)] += e.self_cpu_time_total
    n = {k: kinds.count(k) for k in set(kinds)}
    return {k: {c: us / n[k] for c, us in cats.items()} for k, cats in per_kind.items()}


def compiled_methods(
    model: torch.nn.Module, calls: Calls, interval: int, skip_module_guards: bool = False
) -> dict[str, Any]:
    """The methods compared (also by ``benchmarks.instructions``), by name; the first is the
    baseline."""

    def options(**given: Any) -> dict[str, Any]:
        # a new dict per torch.compile: it pops the guard filter out of the dict it is given
        return {**guard_options(skip_module_guards), **given}

    whole = {"interval": interval, "window": (0.0, 1.0)}
    return {
        "inductor": torch.compile(model, backend="inductor", options=options() or None),
        "blockdance": torch.compile(model, backend="blockdance", options=options(**whole)),
        "blockdance counted": torch.compile(
            model, backend="blockdance", options=options(**whole, timesteps=calls.timesteps)
        ),
        "blockdance compile_once=False": torch.compile(
            model, backend="blockdance", options=options(**whole, compile_once=False)
        ),
        "blockdance interval=1": torch.compile(
            model, backend="blockdance", options=options(interval=1)
        ),
    }


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The model and generation flags (also ``benchmarks.instructions``')."""
    p.add_argument("--blocks", type=int, default=28)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--latent", type=int, default=4, help="latent side; tokens = (latent/2)^2")
    p.add_argument("--steps", type=int, default=50, help="model calls per generation")
    p.add_argument("--interval", type=int, default=2, help="blockdance N")


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    log(f"machine: {machine()}")
    model = build_model(args)
    calls = Calls(args)
    compiled = compiled_methods(model, calls, args.interval, args.skip_module_guards)
    methods = [Method(name, m) for name, m in compiled.items()]
    for i, m in enumerate(methods):
        log(f"warm-up {m.name}")
        calls.run(m.model)
        calls.run(m.model)  # the counted model's check generation, then a plain one
        if m.name.startswith("blockdance"):
            methods[i] = Method(m.name, m.model, kinds_of(m.model))
    # Interleaved call by call, the order of the methods rotating: each method's call i of a
    # round is timed next to inductor's call i of the same round (paired differences).
    times: dict[str, dict[str, list[float]]] = {m.name: defaultdict(list) for m in methods}
    paired: dict[str, dict[str, list[float]]] = {m.name: defaultdict(list) for m in methods}
    for rep in range(args.repeats):
        for i in range(len(calls.t)):
            k = (rep * len(calls.t) + i) % len(methods)
            seconds = {m.name: calls.call(m.model, i) for m in methods[k:] + methods[:k]}
            for m in methods:
                kind = m.kinds[i] if m.kinds else "call"
                times[m.name][kind].append(seconds[m.name])
                paired[m.name][kind].append(seconds[m.name] - seconds["inductor"])
        log(f"repeat {rep + 1}/{args.repeats} done")
    rows = [
        {
            "method": m.name,
            "kind": kind,
            "calls": len(ts),
            "us_per_call": 1e6 * median(ts),
            "over_inductor_us": 1e6 * median(paired[m.name][kind]),
            "over_inductor_iqr_us": [1e6 * q for q in quartiles(paired[m.name][kind])],
            "over_inductor_ci_us": [1e6 * q for q in median_ci(paired[m.name][kind])],
        }
        for m in methods
        for kind, ts in sorted(times[m.name].items())
    ]
    log("timing the blockdance runtime in place")
    runtime = runtime_share(calls, methods[1], args.repeats)
    profiled = {}
    if not args.no_profile:
        for m in methods[:2]:
            log(f"profiling {m.name}")
            profiled[m.name] = breakdown(calls, m)
    return {
        "machine": machine(),
        "args": vars(args),
        "rows": rows,
        "runtime_us": runtime,
        "profile": profiled,
    }


def model_line(a: dict[str, Any]) -> str:
    """The model ``build_model`` makes from these flags, in words."""
    return (
        f"PixArt-shaped DiT, {a['blocks']} blocks, width {a['width']}, "
        f"{(a['latent'] // 2) ** 2} image tokens, batch 2"
    )


def write(result: dict[str, Any], tag: str) -> Path:
    path = write_json(RESULTS, "overhead", tag, result)
    a = result["args"]
    lines = [
        "# Host overhead per call: blockdance vs plain inductor",
        "",
        f"Machine: {result['machine']}.",
        f"Model: {model_line(a)}; {a['steps']} calls per generation, "
        f"blockdance interval={a['interval']} over the whole trajectory; {a['repeats']} "
        "generations per method, interleaved call by call (the methods' order rotating), every "
        "call timed on its own. Minus inductor's: the median over calls of a call's time minus "
        "inductor's call at the same step of the same round, with its quartiles (how far single "
        "calls scatter) and a 95% bootstrap interval of the median (how well it is known)."
        + (
            " Every model without guards on its modules (`--skip-module-guards`)."
            if a.get("skip_module_guards")
            else ""
        ),
        "Reproduce: `OMP_NUM_THREADS=1 python -m benchmarks.overhead"
        + (" --skip-module-guards" if a.get("skip_module_guards") else "")
        + (f" --tag {tag}" if tag else "")
        + "`.",
        "",
        "| method | call | calls | us per call | minus inductor's (paired) | quartiles | "
        "median's 95% CI |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['method']} | {r['kind']} | {r['calls']} | {r['us_per_call']:.0f} | "
            f"{r['over_inductor_us']:+.0f} | "
            f"{r['over_inductor_iqr_us'][0]:+.0f} .. {r['over_inductor_iqr_us'][1]:+.0f} | "
            f"{r['over_inductor_ci_us'][0]:+.0f} .. {r['over_inductor_ci_us'][1]:+.0f} |"
        )
    lines += [
        "",
        "The blockdance runtime's own time per call, measured in place (`GraphRuntime.__call__` "
        "minus the compiled graph it runs; median over the generations; blockdance row): "
        + ", ".join(f"{k} {v:.0f} us" for k, v in sorted(result["runtime_us"].items()))
        + ".",
    ]
    if result["profile"]:
        cats = [c for c, _ in CATEGORIES] + [GENERATED, OTHER]
        cols = [(m, k) for m, kinds in result["profile"].items() for k in sorted(kinds)]
        lines += [
            "",
            "Where the time goes: self time per call under `torch.profiler` (Python tracer on, "
            "which slows every call: shares, not speeds), microseconds.",
            "",
            "| category | " + " | ".join(f"{m} {k}" for m, k in cols) + " |",
            "|---|" + "---|" * len(cols),
        ]
        for c in cats:
            vals = [result["profile"][m][k].get(c, 0.0) for m, k in cols]
            lines.append(f"| {c} | " + " | ".join(f"{v:.0f}" for v in vals) + " |")
        totals = [sum(result["profile"][m][k].values()) for m, k in cols]
        lines.append("| **total** | " + " | ".join(f"**{v:.0f}**" for v in totals) + " |")
    path.write_text("\n".join(lines) + "\n")
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_args(p)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-profile", action="store_true", help="skip the torch.profiler table")
    p.add_argument("--tag", default="", help="results/overhead-<tag>.md")
    p.add_argument("--skip-module-guards", action="store_true", help=SKIP_MODULE_GUARDS_HELP)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    path = write(run(args), args.tag)
    log(f"wrote {path}")
    print(path.read_text())


if __name__ == "__main__":
    main()
