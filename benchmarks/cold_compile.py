"""Cold start: what a fresh process pays to compile, per way of compiling (issue 19).

    OMP_NUM_THREADS=1 python -m benchmarks.cold_compile                # both models, ~20 min
    OMP_NUM_THREADS=1 python -m benchmarks.cold_compile --models pixart28 --repeats 3

For each model and each configuration, two fresh processes share one new, empty
``TORCHINDUCTOR_CACHE_DIR``: the first is **cold** (nothing cached), the second **warm** (the
FX graph and AOT caches hit). Each runs two generations; the compile cost is the first
generation's time minus the second's (so it includes every graph compiled during the
generation: blockdance's reuse graph compiles at the first reuse step), and the second
generation's time is the **run time** next to it (nothing may be bought with run-time speed).

Configurations: plain inductor on the whole model; diffusers' regional compilation
(``model.compile_repeated_blocks()``, inductor on one block reused for all of them; PixArt and DiT
declare no ``_repeated_blocks`` in diffusers 0.42, so their block class is named here); blockdance
(default options: each kind of block compiled once, Note [Compile-once blocks]; inductor's C++
toolchain probes run while Dynamo traces, Note [Toolchain warm-up]); blockdance-no-warmup (the
same with those probes where inductor runs them, ``TORCH_WARM_POOL=0``); blockdance-inline
(``compile_once=False``: every block inlined, as before). Models: the 28-block PixArt shape of
``benchmarks.speed`` (width 384, 32x32 latent, 256 tokens, DDIM) and the shipped 12-block reference
DiT (DDIM); batch 2 (batched guidance). ``--repeats N`` measures every configuration N times,
round by round (so a busy minute on the shared machine hits all configurations alike), and reports
the median with the range. Writes benchmarks/results/cold_compile[-<tag>].md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import log, machine, median

RESULTS = Path(__file__).parent / "results"
CONFIGS = ("inductor", "regional", "blockdance", "blockdance-no-warmup", "blockdance-inline")
MODELS = ("pixart28", "reference12")


def _model_and_loop(name: str, steps: int) -> tuple[torch.nn.Module, Any]:
    """The model and a ``loop(model)`` running one generation of ``steps`` DDIM steps."""
    from bd_compile.sampling import REFERENCE_MODEL, denoise, load_reference, make_scheduler

    if name == "pixart28":
        from benchmarks.speed import build_model

        a = argparse.Namespace(
            blocks=28, width=384, latent=32, caption_channels=64, device="cpu", dtype="float32"
        )
        model = build_model(a)
        g = torch.Generator().manual_seed(0)
        latents = torch.randn(1, 4, 32, 32, generator=g)
        text = torch.randn(2, 16, 64, generator=g)

        def inputs(x: torch.Tensor, t: torch.Tensor) -> dict[str, Any]:
            return {"hidden_states": x, "encoder_hidden_states": text, "timestep": t}

        scheduler = make_scheduler(None, "ddim")
    else:
        model, train = load_reference(REFERENCE_MODEL)
        cfg: Any = model.config
        g = torch.Generator().manual_seed(0)
        latents = torch.randn(1, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
        labels = torch.tensor([3, int(cfg.num_embeds_ada_norm)])

        def inputs(x: torch.Tensor, t: torch.Tensor) -> dict[str, Any]:
            return {"hidden_states": x, "timestep": t, "class_labels": labels}

        scheduler = make_scheduler(train.config, "ddim")

    def loop(m: Any) -> torch.Tensor:
        with torch.no_grad():
            return denoise(m, scheduler, inputs, latents, steps, guidance_scale=4.0)

    return model, loop


def probe(model_name: str, config: str, steps: int) -> dict[str, float]:
    """In this (fresh) process: compile ``config``, time two generations."""
    torch.set_num_threads(1)
    model, loop = _model_and_loop(model_name, steps)
    if config == "regional":
        block = type(model.transformer_blocks[0]).__name__  # type: ignore[index]
        model._repeated_blocks = [block]  # type: ignore[assignment]
        model.compile_repeated_blocks()  # type: ignore[operator]
        compiled: Any = model
    elif config == "blockdance-no-warmup":  # Note [Toolchain warm-up], off by inductor's switch
        os.environ["TORCH_WARM_POOL"] = "0"
        compiled = torch.compile(model, backend="blockdance")
    elif config == "blockdance-inline":
        compiled = torch.compile(model, backend="blockdance", options={"compile_once": False})
    else:
        compiled = torch.compile(model, backend=config)
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        loop(compiled)
        times.append(time.perf_counter() - t0)
    return {"compile_s": times[0] - times[1], "run_s": times[1]}


def measure(model_name: str, config: str, steps: int) -> dict[str, float]:
    """Cold and warm compile and the run time, each in a fresh process."""
    argv = [sys.executable, "-m", "benchmarks.cold_compile", "--probe", model_name, config]
    argv += ["--steps", str(steps)]
    result: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "OMP_NUM_THREADS": "1"}
        for kind in ("cold", "warm"):
            out = subprocess.run(argv, env=env, check=True, capture_output=True, text=True)
            got = json.loads(out.stdout.strip().splitlines()[-1])
            result[f"{kind}_compile_s"] = got["compile_s"]
            result[f"{kind}_run_s"] = got["run_s"]
            log(
                f"  {model_name} {config} {kind}: compile {got['compile_s']:.1f} s, "
                f"generation {got['run_s']:.2f} s"
            )
    return result


def summarize(runs: list[dict[str, float]]) -> dict[str, Any]:
    """The median of each measurement over the repeats, and every repeat's values."""
    out: dict[str, Any] = {k: median([r[k] for r in runs]) for k in runs[0]}
    out["repeats"] = runs
    return out


def _cell(r: dict[str, Any], key: str, digits: int) -> str:
    values = [run[key] for run in r["repeats"]]
    text = f"{r[key]:.{digits}f}"
    return (
        text if len(values) == 1 else f"{text} ({min(values):.{digits}f}-{max(values):.{digits}f})"
    )


def write(rows: dict[str, dict[str, dict[str, Any]]], steps: int, repeats: int, tag: str) -> Path:
    name = f"cold_compile{'-' + tag if tag else ''}"
    (RESULTS / f"{name}.json").write_text(
        json.dumps(
            {"machine": machine(), "steps": steps, "repeats": repeats, "rows": rows}, indent=2
        )
        + "\n"
    )
    how = (
        "One measurement each: a first look on a shared machine."
        if repeats == 1
        else f"Median of {repeats} repeats, taken round by round (range in brackets); x regional "
        "is the ratio of the medians."
    )
    flags = "" if repeats == 1 else f" --repeats {repeats}"
    configs = list(next(iter(rows.values())))
    if configs != list(CONFIGS):
        flags = f" --configs {' '.join(configs)}{flags}"
    flags += f" --tag {tag}" if tag else ""
    models = " ".join(rows)
    lines = [
        "# Cold start: compile time per way of compiling",
        "",
        f"Machine: {machine()}; one thread. Each configuration in two fresh processes sharing a "
        f"new, empty inductor cache (cold, then warm); compile = first {steps}-step DDIM "
        "generation minus the second (every graph compiled during the generation included); "
        f"run = the second generation. {how}",
        "Reproduce: `OMP_NUM_THREADS=1 python -m benchmarks.cold_compile "
        f"--models {models}{flags}`.",
        "",
        "| model | configuration | cold compile s | x regional | warm compile s | run s |",
        "|---|---|---|---|---|---|",
    ]
    for model_name, by_config in rows.items():
        regional = by_config.get("regional", {}).get("cold_compile_s")
        for config, r in by_config.items():
            ratio = f"{r['cold_compile_s'] / regional:.2f}" if regional else "-"
            lines.append(
                f"| {model_name} | {config} | {_cell(r, 'cold_compile_s', 1)} | {ratio} | "
                f"{_cell(r, 'warm_compile_s', 1)} | {_cell(r, 'warm_run_s', 2)} |"
            )
    path = RESULTS / f"{name}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    p.add_argument("--steps", type=int, default=10, help="DDIM steps per generation")
    p.add_argument("--repeats", type=int, default=1, help="measurements per configuration")
    p.add_argument("--tag", default="", help="results/cold_compile-<tag>.md")
    p.add_argument("--probe", nargs=2, metavar=("MODEL", "CONFIG"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe:
        print(json.dumps(probe(args.probe[0], args.probe[1], args.steps)))
        return
    log(f"machine: {machine()}")
    if args.repeats < 1:
        p.error(f"--repeats: expected a positive number of measurements, got {args.repeats}")
    runs: dict[str, dict[str, list[dict[str, float]]]] = {
        m: {c: [] for c in args.configs} for m in args.models
    }
    for round_ in range(args.repeats):
        if args.repeats > 1:
            log(f"round {round_ + 1} of {args.repeats}")
        for m in args.models:
            for c in args.configs:
                runs[m][c].append(measure(m, c, args.steps))
    rows = {m: {c: summarize(rs) for c, rs in by.items()} for m, by in runs.items()}
    log(f"wrote {write(rows, args.steps, args.repeats, args.tag)}")


if __name__ == "__main__":
    main()
