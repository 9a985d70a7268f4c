"""BlockDance against its peers at FLUX.1-dev's size on one GPU (issue 20): speed only.

    python -m benchmarks.peers_gpu                        # on the device: under 9 minutes
    python -m benchmarks.peers_gpu --tiny                 # the same code on CPU, under a minute
    python -m benchmarks.peers_gpu --tiny --compiler eager --results /tmp/r   # what the test runs

A ``FluxTransformer2DModel`` with FLUX.1-dev's config (19 double + 38 single blocks, 24 heads x
128, random weights: speed does not depend on them), bf16, 1024 px (4,096 image tokens), 512
text tokens, batch 1, FLUX.1-dev's flow-matching Euler schedule (dynamic shift for 4,096 tokens,
28 steps, guidance 3.5 embedded: no CFG batch). Methods, each a structural twin of the one model
(its own modules, the same parameter tensors, so cache-dit's patching touches no other row):

- ``inductor``: ``torch.compile(dynamic=False)``, ``--inductor-mode`` (default ``default``;
  ``max-autotune-no-cudagraphs`` autotunes every GEMM shape, minutes of compile at this size);
  ``inductor + CUDA graphs``: ``mode="reduce-overhead"``.
- ``BlockDance N=2/3/4``: ``backend="blockdance"``, ``options={"interval": 2}``, default cache
  block (42 of 57) and window, N switched with ``bd_compile.set_schedule``; every generation
  inside ``bd_compile.generation(timesteps=...)`` (counted steps: no host sync per call).
- ``BlockDance calibrated +forecast 1 N=2/4``: ``options={"calibration": ..., "forecast": 1}``
  with a calibration at the reference models' calibrated depth (``CALIBRATED_DEPTH``: the shipped
  MNIST calibration's 11 of 12 blocks skipped, window 24%-95%) scaled to 57 blocks. Random weights
  have nothing to calibrate on: this times the calibrated setting's shape, not its quality.
- ``cache-dit F1B<k> (BlockDance N=n's steps) + torch.compile``: cache-dit's DBCache with the
  steps BlockDance N=n reuses as a static ``steps_computation_mask`` and ``Bn`` chosen so that
  the blocks it skips carry the FLOP share BlockDance's do: the same computed block fraction by
  construction (its residual-difference test decides nothing on random weights). Plain
  ``torch.compile``: cache-dit's ``set_compile_configs`` would change every row's inductor.
- ``BlockDance N=3 + CUDA graphs``: ``inner_options={"mode": "reduce-overhead"}``.

Each method: one warm-up generation (it compiles; ``compile s`` = its time minus the median),
then ``--repeats`` rounds, all methods interleaved in each round; median. Computed fraction: from
each method's own record (``bd_compile.stats``; ``cache_dit.summary``) weighted by per-block
FLOP shares (``torch.utils.flop_counter``). A budget (``--budget-s``) skips the methods whose
warm-up would not leave time for the rounds (the row says so); results are rewritten after every
method and round, so a run cut short still leaves a table. Writes
``<results>/peers-gpu-<tag>.md`` and ``.json`` (and ``-cal.json``, the calibration used).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import bd_compile
from benchmarks.common import log, machine, median, timed

RESULTS = Path(__file__).resolve().parent / "results"
#: The shipped MNIST calibration (benchmarks/reference/calibration.json): skip 11 of 12 blocks,
#: window 24%-95%.
CALIBRATED_DEPTH, CALIBRATED_WINDOW = 11 / 12, (0.24, 0.95)
DEFAULT_WINDOW = (0.4, 0.95)  #: bd_compile's default window, the cache-dit rows' too


@dataclass(frozen=True)
class Shape:
    """The model and the loop of one run."""

    name: str
    num_layers: int
    num_single_layers: int
    heads: int
    head_dim: int
    joint_dim: int
    pooled_dim: int
    rope: tuple[int, int, int]
    in_channels: int
    side: int  #: packed latent side: side * side image tokens
    text_tokens: int
    steps: int
    guidance: float = 3.5

    @property
    def blocks(self) -> int:
        return self.num_layers + self.num_single_layers


FLUX_DEV = Shape("FLUX.1-dev, 1024 px", 19, 38, 24, 128, 4096, 768, (16, 56, 56), 64, 64, 512, 28)
TINY = Shape("tiny Flux (2 + 2 blocks)", 2, 2, 2, 16, 32, 16, (4, 6, 6), 16, 8, 16, 8)


@dataclass(frozen=True)
class Method:
    """One row: ``engine`` names the compiled object that runs it, ``settings`` its knobs."""

    name: str
    engine: str  # inductor | inductor-cg | blockdance | calibrated | cache-dit | blockdance-cg
    settings: dict[str, Any] = field(default_factory=dict, hash=False)


def plan(shape: Shape) -> list[Method]:
    """The methods in priority order (a tight budget drops the last ones)."""
    out = [Method("inductor", "inductor")]
    out += [Method(f"BlockDance N={n}", "blockdance", {"interval": n}) for n in (2, 3, 4)]
    out += [Method(f"cache-dit (BlockDance N={n}'s steps)", "cache-dit", {"interval": n})
            for n in (2, 3, 4)]  # fmt: skip
    out.append(Method("inductor + CUDA graphs", "inductor-cg"))
    out += [Method(f"BlockDance calibrated +forecast 1 N={n}", "calibrated", {"interval": n})
            for n in (2, 4)]  # fmt: skip
    out.append(Method("BlockDance N=3 + CUDA graphs", "blockdance-cg", {"interval": 3}))
    return out


@dataclass
class Row:
    method: str
    engine: str
    status: str = "not run"
    settings: str = ""
    compile_s: float = math.nan
    gen_s: float = math.nan
    gen_min_s: float = math.nan
    gen_max_s: float = math.nan
    repeats: int = 0
    speedup_vs_inductor: float = math.nan
    speedup_vs_cudagraphs: float = math.nan
    computed_fraction: float = math.nan
    flop_bound: float = math.nan
    efficiency: float = math.nan
    pattern: str = ""
    peak_gb: float = math.nan
    recompiles_timed: int = 0


# --------------------------------------------------------------------------------------------
# The model, its inputs and the loop


def build_model(shape: Shape, device: torch.device, dtype: torch.dtype) -> Any:
    """FluxTransformer2DModel at ``shape``, random weights, made directly on ``device`` in
    ``dtype`` (no fp32 copy of 12B parameters on the host)."""
    from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = FluxTransformer2DModel(
                patch_size=1,
                in_channels=shape.in_channels,
                num_layers=shape.num_layers,
                num_single_layers=shape.num_single_layers,
                attention_head_dim=shape.head_dim,
                num_attention_heads=shape.heads,
                joint_attention_dim=shape.joint_dim,
                pooled_projection_dim=shape.pooled_dim,
                guidance_embeds=True,
                axes_dims_rope=shape.rope,
            )
    finally:
        torch.set_default_dtype(previous)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def twin(model: torch.nn.Module) -> Any:
    """A copy of ``model``'s modules that shares its parameters and buffers (no memory)."""
    memo: dict[int, Any] = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


def fixed_inputs(shape: Shape, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """The model's inputs other than latents and timestep, as FluxPipeline builds them."""
    gen = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.zeros(shape.side, shape.side, 3)
    ids[..., 1] = torch.arange(shape.side)[:, None]
    ids[..., 2] = torch.arange(shape.side)[None, :]

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(size, generator=gen).to(device, dtype)

    return {
        "encoder_hidden_states": randn(1, shape.text_tokens, shape.joint_dim),
        "pooled_projections": randn(1, shape.pooled_dim),
        "img_ids": ids.reshape(-1, 3).to(device, dtype),
        "txt_ids": torch.zeros(shape.text_tokens, 3, device=device, dtype=dtype),
        "guidance": torch.full((1,), shape.guidance, device=device, dtype=torch.float32),
    }


def make_scheduler(shape: Shape) -> Any:
    """FLUX.1-dev's scheduler, set for ``shape.steps`` steps at its token count."""
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import (
        FlowMatchEulerDiscreteScheduler,
    )

    sched = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
        max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
    )  # fmt: skip
    tokens = shape.side * shape.side
    mu = 0.5 + (1.15 - 0.5) * (tokens - 256) / (4096 - 256)  # FluxPipeline's calculate_shift
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / shape.steps, shape.steps), mu=mu)
    return sched


class Loop:
    """One generation: the same noise and conditions for every method."""

    def __init__(self, shape: Shape, device: torch.device, dtype: torch.dtype) -> None:
        self.shape, self.device = shape, device
        self.kwargs = fixed_inputs(shape, device, dtype)
        gen = torch.Generator(device="cpu").manual_seed(0)
        self.noise = torch.randn(1, shape.side**2, shape.in_channels, generator=gen)
        self.noise = self.noise.to(device, dtype)
        self.timesteps = make_scheduler(shape).timesteps
        #: the model-facing timesteps (FluxPipeline divides by 1000), for counted steps
        self.model_timesteps = [float(t) / 1000 for t in self.timesteps]

    def example(self) -> dict[str, Any]:
        t = (self.timesteps[:1] / 1000).to(self.device)
        return {"hidden_states": self.noise, "timestep": t, **self.kwargs}

    @torch.no_grad()
    def run(self, fn: Callable[..., Any]) -> torch.Tensor:
        sched = make_scheduler(self.shape)
        x = self.noise.clone()
        for t in sched.timesteps:
            timestep = (t / 1000).expand(1).to(self.device, torch.float32)
            out = fn(hidden_states=x, timestep=timestep, return_dict=False, **self.kwargs)[0]
            x = sched.step(out, t, x, return_dict=False)[0]
        return x


def block_flop_shares(model: Any, kwargs: dict[str, Any]) -> list[float]:
    """Each block's share of one forward's FLOPs, in execution order (double, then single)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(**kwargs)
    counts = counter.get_flop_counts()
    root = type(model).__name__
    total = sum(counts["Global"].values()) or 1
    names = [f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks))]
    names += [f"single_transformer_blocks.{i}" for i in range(len(model.single_transformer_blocks))]
    return [sum(counts.get(f"{root}.{n}", {}).values()) / total for n in names]


# --------------------------------------------------------------------------------------------
# The methods' engines and one generation of each


class Bench:
    """The compiled objects (made at their first method) and one timed generation of a method."""

    def __init__(self, args: argparse.Namespace, shape: Shape, model: Any, loop: Loop) -> None:
        self.args, self.shape, self.model, self.loop = args, shape, model, loop
        self.engines: dict[str, Any] = {}
        self.shares = block_flop_shares(model, loop.example())
        self.cache_block = bd_compile.default_cache_block(shape.blocks)
        self.skipped = sum(self.shares[: self.cache_block + 1])  #: BlockDance's reuse skips this
        # cache-dit computes the first Fn and last Bn blocks: Fn=1, Bn closest to BlockDance's
        self.bn = min(
            range(shape.blocks - 1), key=lambda b: abs(self._cd_skipped(b) - self.skipped)
        )

    def _cd_skipped(self, bn: int) -> float:
        return sum(self.shares[1 : self.shape.blocks - bn])

    def _compile(self, m: Any, mode: str | None = None, **kw: Any) -> Any:
        if self.args.compiler == "inductor" and mode not in (None, "default"):
            kw["mode"] = mode
        return torch.compile(m, backend=self.args.compiler, dynamic=False, **kw)

    def _blockdance(self, **options: Any) -> Any:
        options |= {"inner": self.args.compiler, "strict": True}
        mode = options.pop("mode", self.args.inductor_mode)
        if self.args.compiler == "inductor" and mode != "default":
            options["inner_options"] = {"mode": mode}
        return torch.compile(twin(self.model), backend="blockdance", options=options, dynamic=False)

    def engine(self, name: str, interval: int = 2) -> Any:
        """The compiled object ``name``, made on first use with ``interval`` (a blockdance
        engine's schedule can be set only once it has run: its first method's N is compiled
        in)."""
        if name in self.engines:
            return self.engines[name]
        if name == "inductor":
            e = self._compile(twin(self.model), self.args.inductor_mode)
        elif name == "inductor-cg":
            e = self._compile(twin(self.model), "reduce-overhead")
        elif name == "blockdance":
            e = self._blockdance(interval=interval)
        elif name == "blockdance-cg":
            e = self._blockdance(interval=interval, mode="reduce-overhead")
        elif name == "calibrated":
            cal = str(self._calibration())
            e = self._blockdance(calibration=cal, forecast=1, interval=interval)
        elif name == "cache-dit":
            import cache_dit

            m = twin(self.model)
            cache_dit.enable_cache(m, cache_config=self._cd_config(2))
            e = (m, self._compile(m, self.args.inductor_mode))
        else:
            raise ValueError(f"expected an engine of plan(), got {name!r}")
        self.engines[name] = e
        return e

    def _calibration(self) -> Path:
        from bd_compile.analysis import Calibration, save_calibration

        n = self.shape.blocks
        cal = Calibration(
            cache_block=min(round(CALIBRATED_DEPTH * n) - 1, n - 2), window=CALIBRATED_WINDOW,
            threshold=0.99, num_blocks=n, num_steps=self.shape.steps,
            model="FluxTransformer2DModel", block_name="scaled from the MNIST calibration",
        )  # fmt: skip
        return save_calibration(cal, self.args.results / f"peers-gpu-{self.args.tag}-cal.json")

    def _cd_config(self, interval: int) -> Any:
        from cache_dit import DBCacheConfig

        reuse = bd_compile.paper_rule(self.shape.steps, DEFAULT_WINDOW, interval)
        return DBCacheConfig(
            Fn_compute_blocks=1, Bn_compute_blocks=self.bn, residual_diff_threshold=0.08,
            max_warmup_steps=0, num_inference_steps=self.shape.steps, enable_separate_cfg=False,
            steps_computation_mask=[0 if r else 1 for r in reuse],
            steps_computation_policy="static",
        )  # fmt: skip

    def generate(self, m: Method) -> tuple[float, float, str]:
        """One timed generation: seconds, computed block fraction, pattern (C/R per step)."""
        n = m.settings.get("interval", 2)
        e, dev = self.engine(m.engine, n), self.loop.device
        if m.engine in ("inductor", "inductor-cg"):
            return timed(lambda: self.loop.run(e), dev), 1.0, ""
        if m.engine == "cache-dit":
            import cache_dit

            module, fn = e
            cache_dit.refresh_context(module, cache_config=self._cd_config(n))
            s = timed(lambda: self.loop.run(fn), dev)
            st = cache_dit.summary(module)[0]
            cached = set(st.cached_steps)
            pattern = "".join("R" if i in cached else "C" for i in range(self.shape.steps))
            computed = 1 - len(cached) / self.shape.steps * self._cd_skipped(self.bn)
            return s, computed, pattern
        if bd_compile.runtimes_of(e):
            bd_compile.set_schedule(e, interval=n)

        def run() -> None:
            with bd_compile.generation(e, timesteps=self.loop.model_timesteps):
                self.loop.run(e)

        s = timed(run, dev)
        st = bd_compile.stats(e)
        skipped = sum(self.shares[: st.graphs[0].cache_block + 1])
        return s, 1 - st.last.reused_calls / st.last.calls * skipped, st.last.pattern


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


# --------------------------------------------------------------------------------------------
# The run


def run(args: argparse.Namespace) -> Path:
    t_start = time.perf_counter()
    device = torch.device(args.device)
    shape = TINY if args.tiny else FLUX_DEV
    shape = replace(shape, steps=args.steps or shape.steps)
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    torch._dynamo.config.recompile_limit = 64  # one code object, several backends
    log(f"[peers-gpu] {machine()}; {shape.name}, {shape.steps} steps, {args.compiler}")
    model = build_model(shape, device, dtype)
    loop = Loop(shape, device, dtype)
    bench = Bench(args, shape, model, loop)
    methods = plan(shape)
    rows = {m.name: Row(m.name, m.engine, settings=json.dumps(m.settings)) for m in methods}
    warm: dict[str, float] = {}
    per_gen: dict[str, float] = {}
    compiled_before: set[str] = set()

    def left() -> float:
        return args.budget_s - (time.perf_counter() - t_start)

    def save() -> Path:
        return write(args, shape, list(rows.values()), time.perf_counter() - t_start)

    for m in methods:  # warm-ups (compiles), while the rounds still fit
        reserve = args.repeats * (sum(per_gen.values()) + max(per_gen.values(), default=0))
        needed = reserve + (max(warm.values(), default=0) if m.engine not in bench.engines else 0)
        if warm and needed > left():  # the first (the baseline) always runs
            rows[m.name].status = f"skipped: budget ({left():.0f} s left, ~{needed:.0f} s needed)"
            continue
        t0, new = time.perf_counter(), m.engine not in bench.engines
        try:
            s, frac, pattern = bench.generate(m)
        except ImportError as e:  # cache-dit absent
            rows[m.name].status = f"not run: {e} (pip install -e .[peers])"
            continue
        except Exception as e:  # a method that fails here is reported, not fatal
            rows[m.name].status = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            log(f"[peers-gpu] {m.name}: {rows[m.name].status}")
            bench.engines.pop(m.engine, None)
            continue
        warm[m.name], per_gen[m.name] = time.perf_counter() - t0, s
        if not new:  # its engine was compiled by an earlier row: no compile time of its own
            compiled_before.add(m.name)
        rows[m.name].status, rows[m.name].computed_fraction = "warm", frac
        rows[m.name].pattern = pattern
        log(f"[peers-gpu] {m.name}: warm-up {warm[m.name]:.1f} s (left {left():.0f} s)")
        save()

    ready = [m for m in methods if m.name in warm]
    times: dict[str, list[float]] = {m.name: [] for m in ready}
    for rnd in range(args.repeats):
        if rnd and sum(per_gen.values()) > left():
            log(f"[peers-gpu] stopping after {rnd} round(s): budget")
            break
        for m in list(ready):
            graphs = _graphs()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            try:
                s, frac, pattern = bench.generate(m)
            except Exception as e:  # e.g. out of memory: the row says so, the others go on
                rows[m.name].status = f"failed in round {rnd + 1}: {type(e).__name__}: "
                rows[m.name].status += str(e).splitlines()[0][:200]
                ready.remove(m)
                times.pop(m.name)
                continue
            r = rows[m.name]
            times[m.name].append(s)
            r.recompiles_timed += _graphs() - graphs
            r.computed_fraction, r.pattern = frac, pattern
            if device.type == "cuda":
                r.peak_gb = torch.cuda.max_memory_allocated(device) / 2**30
        summarise(rows, times, {k: v for k, v in warm.items() if k not in compiled_before})
        log(f"[peers-gpu] round {rnd + 1} done (left {left():.0f} s)")
        save()
    return save()


def summarise(rows: dict[str, Row], times: dict[str, list[float]], warm: dict[str, float]) -> None:
    """Medians, speedups, bounds of the rows with timings; compile time for those in ``warm``
    (the rows whose warm-up compiled their engine)."""
    for name, ts in times.items():
        r = rows[name]
        r.gen_s, r.gen_min_s, r.gen_max_s, r.repeats = median(ts), min(ts), max(ts), len(ts)
        r.compile_s, r.status = warm[name] - r.gen_s if name in warm else math.nan, "ok"
        r.flop_bound = 1 / r.computed_fraction
    base = rows["inductor"].gen_s if "inductor" in times else math.nan
    cg = rows["inductor + CUDA graphs"].gen_s if "inductor + CUDA graphs" in times else math.nan
    for name in times:
        r = rows[name]
        r.speedup_vs_inductor, r.speedup_vs_cudagraphs = base / r.gen_s, cg / r.gen_s
        r.efficiency = r.speedup_vs_inductor / r.flop_bound


def _f(x: float, fmt: str) -> str:
    return "" if isinstance(x, float) and math.isnan(x) else format(x, fmt)


def write(args: argparse.Namespace, shape: Shape, rows: list[Row], seconds: float) -> Path:
    """``peers-gpu-<tag>.md`` (caption and table) and ``.json`` (meta and rows)."""
    stem = args.results / f"peers-gpu-{args.tag}"
    args.results.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": machine(),
        "command": "python -m benchmarks.peers_gpu " + " ".join(args.argv),
        "shape": asdict(shape),
        "compiler": args.compiler,
        "inductor_mode": args.inductor_mode,
        "dtype": args.dtype,
        "repeats": args.repeats,
        "seconds": round(seconds, 1),
    }
    stem.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1) + "\n"
    )
    lines = [
        f"# BlockDance and its peers: {shape.name} (random weights), speed",
        "",
        f"Machine: {meta['machine']}. Command: `{meta['command']}`. "
        f"{shape.blocks} blocks ({shape.num_layers} double + {shape.num_single_layers} single), "
        f"{shape.heads} heads x {shape.head_dim}, {shape.side**2} image + {shape.text_tokens} "
        f"text tokens, batch 1, {shape.steps} flow-matching Euler steps, {args.dtype}, compiler "
        f"{args.compiler} (mode {args.inductor_mode}). Median of up to {args.repeats} "
        "generations per method, methods interleaved in each round, after one warm-up "
        f"generation each (compile s = warm-up minus median). Run took {seconds:.0f} s. "
        "Computed fraction: blocks computed, FLOP-weighted, from each method's own record; "
        "FLOP bound = 1 / computed fraction; efficiency = speedup vs inductor / bound; "
        "peak GB: the allocator's peak in the last timed generation, the shared weights "
        "included. "
        "See the module docstring of benchmarks/peers_gpu.py for each method.",
        "",
        "| method | status | s/gen | vs inductor | vs inductor + CUDA graphs | computed | "
        "FLOP bound | efficiency | compile s | pattern | peak GB | recompiles (timed) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.method} | {r.status} | {_f(r.gen_s, '.3f')} | "
            f"{_f(r.speedup_vs_inductor, '.2f')} | {_f(r.speedup_vs_cudagraphs, '.2f')} | "
            f"{_f(r.computed_fraction, '.3f')} | {_f(r.flop_bound, '.2f')} | "
            f"{_f(r.efficiency, '.2f')} | {_f(r.compile_s, '.1f')} | `{r.pattern}` | "
            f"{_f(r.peak_gb, '.1f')} | {r.recompiles_timed} |"
        )
    md = stem.with_suffix(".md")
    md.write_text("\n".join(lines) + "\n")
    return md


def _gpu_tag() -> str:
    if not torch.cuda.is_available():
        return "cpu"
    found = re.search(r"[A-Z]\d{2,}", torch.cuda.get_device_name())
    return found.group(0).lower() if found else "gpu"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.peers_gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--tiny", action="store_true", help="2 + 2-block Flux on CPU, float32")
    p.add_argument("--device", default=None, help="default: cuda (--tiny: cpu)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None)
    p.add_argument("--compiler", choices=("inductor", "aot_eager", "eager"), default=None,
                   help="every row's compiler (default inductor; --tiny: aot_eager)")  # fmt: skip
    p.add_argument(
        "--inductor-mode",
        default="default",
        help="mode of the rows without CUDA graphs (max-autotune-no-cudagraphs: slow to compile)",
    )
    p.add_argument("--steps", type=int, default=None, help="default 28 (--tiny: 8)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=None, help="default 510 (--tiny: 60)")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--tag", default=None, help="file suffix; default the GPU's name, or tiny")
    args = p.parse_args(argv)
    args.argv = list(argv) if argv is not None else []
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    args.dtype = args.dtype or ("float32" if args.tiny else "bfloat16")
    args.compiler = args.compiler or ("aot_eager" if args.tiny else "inductor")
    args.budget_s = args.budget_s or (60.0 if args.tiny else 510.0)
    args.tag = args.tag or ("tiny" if args.tiny else _gpu_tag())
    return args


def main(argv: Sequence[str] | None = None) -> int:
    import logging
    import sys

    args = parse_args(sys.argv[1:] if argv is None else argv)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    for name in ("cache_dit", "Cache-DiT"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with contextlib.suppress(ImportError):  # cache-dit's loggers exist once it is imported
        import cache_dit  # noqa: F401

        for name in list(logging.root.manager.loggerDict):
            if "cache_dit" in name or "Cache-DiT" in name:
                logging.getLogger(name).setLevel(logging.ERROR)
    md = run(args)
    log(f"[peers-gpu] wrote {md} and {md.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
