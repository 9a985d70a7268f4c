"""The README's main job: BlockDance on the project's trained reference DiT, against inductor.

    python -m bd_compile.demo [--model PATH] [--steps 50] [--samples 10] [--repeats 3]

Compiles the model twice (plain inductor; ``backend="blockdance"`` with default options), samples
one digit per class with DDIM and batched classifier-free guidance, and prints the per-generation
time of both (one thread, interleaved, median), the speedup, and how far the BlockDance images are
from the all-compute ones (SSIM, PSNR, max abs difference).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import bd_compile
from bd_compile.metrics import psnr, ssim
from bd_compile.sampling import REFERENCE_MODEL, denoise, load_reference, make_scheduler


def load(path: Path) -> tuple[torch.nn.Module, Any, int]:
    """The reference model, its DDIM sampler, and its null class id (for guidance)."""
    model, train_scheduler = load_reference(path)
    scheduler = make_scheduler(train_scheduler.config, "ddim")
    config: Any = model.config  # a diffusers FrozenDict with attribute access
    return model, scheduler, int(config.num_embeds_ada_norm)


@torch.no_grad()
def generate(
    model: Any, scheduler: Any, labels: torch.Tensor, null: int, steps: int, scale: float
) -> torch.Tensor:
    """One generation: DDIM with batched classifier-free guidance (labels ``[y; null]``)."""
    size, channels = model.config.sample_size, model.config.in_channels
    x = torch.randn(len(labels), channels, size, size, generator=torch.Generator().manual_seed(0))
    both = torch.cat([labels, torch.full_like(labels, null)])

    def inputs(x_in: torch.Tensor, t: torch.Tensor) -> dict[str, Any]:
        return {"hidden_states": x_in, "timestep": t, "class_labels": both}

    return denoise(model, scheduler, inputs, x, steps, guidance_scale=scale).clamp(-1, 1)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, default=REFERENCE_MODEL)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    model, scheduler, null = load(args.model)
    labels = torch.arange(args.samples) % 10
    n_params = sum(x.numel() for x in model.parameters()) / 1e6
    print(f"model: {args.model} ({type(model).__name__}, {n_params:.1f}M parameters)")
    compiled: dict[str, Any] = {
        "inductor": torch.compile(copy.deepcopy(model), backend="inductor"),
        "blockdance": torch.compile(copy.deepcopy(model), backend="blockdance"),
    }
    images: dict[str, torch.Tensor] = {}
    for name, m in compiled.items():
        print(f"compiling with {name} (cold cache: about a minute)...", flush=True)
        t0 = time.perf_counter()
        images[name] = generate(m, scheduler, labels, null, args.steps, args.guidance)
        print(f"  first generation incl. compile: {time.perf_counter() - t0:.1f} s", flush=True)
    times: dict[str, list[float]] = {name: [] for name in compiled}
    for rep in range(args.repeats):
        for name, m in compiled.items():
            t0 = time.perf_counter()
            generate(m, scheduler, labels, null, args.steps, args.guidance)
            times[name].append(time.perf_counter() - t0)
        print(f"  timing {rep + 1}/{args.repeats}", flush=True)

    full, fast = images["inductor"], images["blockdance"]
    t_full = statistics.median(times["inductor"])
    t_fast = statistics.median(times["blockdance"])
    print()
    print(bd_compile.explain(compiled["blockdance"]))
    print()
    print(f"DDIM {args.steps} steps, {args.samples} samples, guidance {args.guidance}, 1 thread")
    print(f"plain inductor : {t_full:.3f} s/generation (median of {args.repeats})")
    print(f"blockdance     : {t_fast:.3f} s/generation")
    print(f"speedup        : {t_full / t_fast:.2f}x over plain inductor")
    print(
        f"vs all-compute : SSIM {ssim(fast, full).mean():.4f}, "
        f"PSNR {psnr(fast, full).mean():.1f} dB, max |diff| {(fast - full).abs().max():.4f}"
    )


if __name__ == "__main__":
    main()
