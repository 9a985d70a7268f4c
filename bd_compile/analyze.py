"""``python -m bd_compile.analyze``: measure a DiT's STSS pattern and write a calibration.

Runs ``bd_compile.analysis.analyze`` on a saved diffusers transformer (or a built-in tiny model
for smoke tests), writes the figures, ``analysis.json`` and ``summary.txt`` to ``--out``, and a
calibration JSON for ``torch.compile(model, backend="blockdance", options={"calibration": PATH})``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bd_compile.analysis import analyze
from bd_compile.calibration import (
    DEFAULT_END,
    DEFAULT_STRUCTURE_THRESHOLD,
    DEFAULT_THRESHOLD,
    calibrate,
    save_calibration,
)

log = logging.getLogger(__name__)

BUILTINS = ("tiny-dit", "tiny-pixart")

# DiT-XL/2's (and PixArt-alpha's) DDPM training schedule: the sampler config used when the model
# folder has no scheduler config next to it.
DIT_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "prediction_type": "epsilon",
    "clip_sample": False,
}

HELP = """\
Measure, for every transformer block and every denoising step, how similar the block's output
is to the previous step's (cosine similarity and relative L2), the step x step similarity of
one block, and the SSIM of adjacent steps' predicted x0; then pick BlockDance's cache_block and
reuse window from it (see bd_compile/calibration.py, Note [The calibration rule]).

Supported models: a folder saved by diffusers' save_pretrained holding a class-conditional
DiT (DiTTransformer2DModel: labels 0..num_embeds_ada_norm-1, null class num_embeds_ada_norm for
guidance; e.g. the reference model, null class 10), and the built-in random-weight smoke-test
models tiny-dit and tiny-pixart. The blocks are found on any DiT (the backend's own tagging);
for other model families call bd_compile.analysis.analyze from Python with your own
make_inputs. The sampler is built from <model>/scheduler or <model>/../scheduler if present,
otherwise from DiT's DDPM schedule (linear betas 1e-4..0.02, 1000 steps).
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


def _tiny_dit(batch: int, seed: int) -> Subject:
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    model: Any = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=6,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
    )
    return class_conditional(model.eval(), batch)


def _tiny_pixart(batch: int, seed: int) -> Subject:
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    seq, caption = 8, 24
    model: Any = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=6,
        cross_attention_dim=32,
        sample_size=8,
        patch_size=2,
        caption_channels=caption,
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        use_additional_conditions=False,
    )
    model.eval()
    gen = torch.Generator().manual_seed(seed + 1)
    cond = torch.randn(batch, seq, caption, generator=gen)  # stand-ins for prompt embeddings
    uncond = torch.randn(batch, seq, caption, generator=gen)

    def make_inputs(x: torch.Tensor, t: torch.Tensor) -> dict[str, Any]:
        text = torch.cat([cond, uncond]) if x.shape[0] == 2 * batch else cond
        return {
            "hidden_states": x,
            "encoder_hidden_states": text,
            "timestep": t,
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        }

    return Subject(model, make_inputs, (4, 8, 8), DIT_SCHEDULER_CONFIG, "tiny-pixart")


def _scheduler_config(folder: Path) -> dict[str, Any] | None:
    for candidate in (folder / "scheduler", folder.parent / "scheduler"):
        path = candidate / "scheduler_config.json"
        if path.is_file():
            cfg: dict[str, Any] = json.loads(path.read_text())
            return cfg
    return None


def load_subject(spec: str, batch: int, seed: int, device: str) -> Subject:
    """A built-in name or a saved diffusers transformer folder (class from ``_class_name``)."""
    if spec in BUILTINS:
        subject = _tiny_dit(batch, seed) if spec == "tiny-dit" else _tiny_pixart(batch, seed)
    else:
        folder = Path(spec)
        config = folder / "config.json"
        if not config.is_file():
            raise SystemExit(
                f"--model: expected one of {list(BUILTINS)} or a folder with a diffusers "
                f"config.json, got {spec!r}"
            )
        class_name = json.loads(config.read_text()).get("_class_name")
        import diffusers

        cls = getattr(diffusers, str(class_name), None)
        if cls is None or not hasattr(cls, "from_pretrained"):
            raise SystemExit(f"--model: expected a diffusers model class, got {class_name!r}")
        if class_name != "DiTTransformer2DModel":
            raise SystemExit(
                f"--model: the CLI builds inputs for class-conditional DiTTransformer2DModel only, "
                f"got {class_name}; call bd_compile.analysis.analyze from Python instead"
            )
        model = cls.from_pretrained(folder, local_files_only=True, torch_dtype=torch.float32).eval()
        subject = class_conditional(model, batch)
        subject.scheduler_config = _scheduler_config(folder) or DIT_SCHEDULER_CONFIG
        subject.name = f"{class_name} ({folder})"
    subject.model.to(device)
    return subject


def make_scheduler(config: dict[str, Any], sampler: str) -> Any:
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if sampler == "ddim":
        return DDIMScheduler.from_config(config)
    if sampler == "dpm":
        return DPMSolverMultistepScheduler.from_config(config)
    raise ValueError(f"expected sampler 'ddim' or 'dpm', got {sampler!r}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bd_compile.analyze",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help=f"model folder or one of {list(BUILTINS)}")
    p.add_argument("--steps", type=int, default=50, help="denoising steps (default 50, as DiT)")
    p.add_argument("--sampler", choices=("ddim", "dpm"), default="ddim")
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
    subject = load_subject(args.model, args.batch, args.seed, args.device)
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
