"""``python -m bd_compile.analysis``: measure a DiT's STSS pattern and write a calibration.

Runs ``bd_compile.analysis.analyze`` on a saved class-conditional diffusers DiT, writes the
figures, ``analysis.json`` and ``summary.txt`` to ``--out``, and a calibration JSON for
``torch.compile(model, backend="blockdance", options={"calibration": PATH})``.
(``python -m bd_compile.analyze`` is the same command under its old name.)
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bd_compile.analysis.calibration import (
    DEFAULT_END,
    DEFAULT_STRUCTURE_THRESHOLD,
    DEFAULT_THRESHOLD,
    calibrate,
    save_calibration,
)
from bd_compile.analysis.record import analyze
from bd_compile.sampling import DIT_SCHEDULER_CONFIG, SAMPLERS, load_reference, make_scheduler

log = logging.getLogger(__name__)

HELP = """\
Measure, for every transformer block and every denoising step, how similar the block's output
is to the previous step's (cosine similarity and relative L2), the step x step similarity of
one block, and the SSIM of adjacent steps' predicted x0; then pick BlockDance's cache_block and
reuse window from it (see bd_compile/analysis/calibration.py, Note [The calibration rule]).

Supported models: a folder saved by diffusers' save_pretrained holding a class-conditional
DiT (DiTTransformer2DModel: labels 0..num_embeds_ada_norm-1, null class num_embeds_ada_norm for
guidance; e.g. the reference model in bd_compile/data/reference_model, null class 10). The
blocks are found on any DiT (the backend's own tagging); for other model families call
bd_compile.analysis.analyze from Python with your own make_inputs. The sampler is built from
<model>/scheduler or <model>/../scheduler if present, otherwise from DiT's DDPM schedule
(linear betas 1e-4..0.02, 1000 steps).
"""


@dataclass
class Subject:
    """A model and how to call it: ``make_inputs(x, t_1d) -> kwargs`` and the latent shape."""

    model: torch.nn.Module
    make_inputs: Callable[[torch.Tensor, torch.Tensor], dict[str, Any]]
    latent_shape: tuple[int, ...]
    scheduler_config: dict[str, Any]
    name: str


def class_conditional(model: Any, batch: int) -> Subject:
    """Inputs for a diffusers ``DiTTransformer2DModel``: labels 0, 1, ...; null = num classes."""
    cfg: Any = model.config
    num_classes = cfg.num_embeds_ada_norm
    if not num_classes:
        raise ValueError(
            "expected a class-conditional DiT (config num_embeds_ada_norm set), "
            f"got {num_classes!r}"
        )
    labels = torch.arange(batch) % num_classes
    null = torch.full((batch,), num_classes, dtype=torch.int64)
    device = next(model.parameters()).device

    def make_inputs(x: torch.Tensor, t: torch.Tensor) -> dict[str, Any]:
        y = torch.cat([labels, null]) if x.shape[0] == 2 * batch else labels
        return {"hidden_states": x, "timestep": t, "class_labels": y.to(device)}

    size = cfg.sample_size
    return Subject(
        model,
        make_inputs,
        (cfg.in_channels, size, size),
        DIT_SCHEDULER_CONFIG,
        type(model).__name__,
    )


def load_subject(spec: str | Path, batch: int, device: str) -> Subject:
    """A saved class-conditional DiT folder (``bd_compile.sampling.load_reference``)."""
    try:
        model, train_scheduler = load_reference(spec, device)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"--model: {e}") from e
    subject = class_conditional(model, batch)
    subject.scheduler_config = dict(train_scheduler.config)
    subject.name = f"{type(model).__name__} ({spec})"
    return subject


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bd_compile.analysis",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="folder of a saved class-conditional DiT")
    p.add_argument("--steps", type=int, default=50, help="denoising steps (default 50, as DiT)")
    p.add_argument("--sampler", choices=SAMPLERS, default="ddim")
    p.add_argument("--guidance", type=float, default=4.0, help="CFG scale; <= 1 disables CFG")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=4, help="samples (CFG doubles the model batch)")
    p.add_argument("--out", type=Path, default=Path("blockdance-analysis"), help="output folder")
    p.add_argument(
        "--threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help=f"cosine similarity every reuse step must meet (default {DEFAULT_THRESHOLD})",
    )
    p.add_argument(
        "--structure-threshold",
        type=lambda v: None if v.lower() == "none" else float(v),
        default=DEFAULT_STRUCTURE_THRESHOLD,
        help="x0 SSIM of adjacent steps every reuse step must meet, or 'none' "
        f"(default {DEFAULT_STRUCTURE_THRESHOLD})",
    )
    p.add_argument("--end", type=float, default=DEFAULT_END, help="window end (default 0.95)")
    p.add_argument(
        "--calibration-out",
        type=Path,
        default=None,
        help="calibration JSON path (default OUT/calibration.json)",
    )
    p.add_argument(
        "--chosen-block",
        type=int,
        default=None,
        help="block for the step x step matrix (default: 75%% depth)",
    )
    p.add_argument(
        "--x0-data-range",
        type=float,
        default=None,
        help="SSIM data range of x0 (default: max - min of each pair)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.batch < 1 or args.steps < 2:
        raise SystemExit(f"expected --batch >= 1 and --steps >= 2, got {args.batch}, {args.steps}")
    subject = load_subject(args.model, args.batch, args.device)
    scheduler = make_scheduler(subject.scheduler_config, args.sampler)
    gen = torch.Generator().manual_seed(args.seed)
    latents = torch.randn((args.batch, *subject.latent_shape), generator=gen).to(args.device)
    result = analyze(
        subject.model,
        scheduler,
        subject.make_inputs,
        latents,
        args.steps,
        guidance_scale=args.guidance,
        chosen_block=args.chosen_block,
        progress=not args.no_progress,
        x0_data_range=args.x0_data_range,
        seed=args.seed,
    )
    result.meta.update(source=args.model, sampler=args.sampler, seed=args.seed)
    cal = calibrate(
        result,
        threshold=args.threshold,
        end=args.end,
        structure_threshold=args.structure_threshold,
    )
    paths = result.save(args.out, calibration=cal)
    cal_path = save_calibration(cal, args.calibration_out or args.out / "calibration.json")
    print(result.summary(cal))
    print()
    for key, path in paths.items():
        print(f"{key:>12}: {path}")
    print(f"{'calibration':>12}: {cal_path}")
    print(
        f'\nuse it: torch.compile(model, backend="blockdance", '
        f'options={{"calibration": "{cal_path}"}})'
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
