"""What a reference-model training run writes: the EMA export (``save_pretrained`` weights and
scheduler), the loss curve, a CFG sample grid, and ``training.json`` with the held-out denoising
loss and, where a classifier is given, the samples' class accuracy and FID
(:func:`write_artifacts`). ``benchmarks.reference.evaluate`` reuses the grid and the evaluation.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from diffusers.models.transformers.dit_transformer_2d import DiTTransformer2DModel
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from torch import nn

from benchmarks.reference.data import stratified_subset
from benchmarks.reference.presets import TrainConfig
from benchmarks.reference.sampling import SCHEDULER_SUBFOLDER, make_sampler, sample
from benchmarks.reference.training import (
    DatasetSpec,
    Run,
    config_json,
    device_name,
    num_train_timesteps,
)

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a run produced: the paths it wrote and its final numbers."""

    out: Path
    steps: int
    final_loss: float
    files: list[Path]
    info: dict[str, Any]


def export_ema(
    ema: DiTTransformer2DModel, scheduler: DDPMScheduler, out: Path, fp16: bool
) -> list[Path]:
    """``save_pretrained`` a CPU copy of the EMA weights (fp16 if asked) and the scheduler."""
    out.mkdir(parents=True, exist_ok=True)
    ema_cpu = copy.deepcopy(ema)
    cast(nn.Module, ema_cpu).to("cpu", dtype=torch.float16 if fp16 else torch.float32)
    ema_cpu.save_pretrained(out, safe_serialization=True)
    scheduler.save_pretrained(out / SCHEDULER_SUBFOLDER)
    return [
        out / "config.json",
        out / "diffusion_pytorch_model.safetensors",
        out / SCHEDULER_SUBFOLDER / "scheduler_config.json",
    ]


def write_loss_curve(out: Path, rows: list[dict[str, float]]) -> list[Path]:
    """``loss.csv`` and ``loss.png`` of the logged windows."""
    csv_path = out / "loss.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "loss", "lr", "elapsed_s"])
        writer.writeheader()
        writer.writerows(rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    if rows:
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel(r"$\epsilon$-MSE (mean over logging window)")
    ax.set_yscale("log")
    ax.set_title("reference DiT training loss")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    png_path = out / "loss.png"
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return [csv_path, png_path]


def write_grid(path: Path, images: torch.Tensor, rows: int, cols: int) -> Path:
    """Tile [rows*cols, C, H, W] images in [-1, 1] (row-major) into a PNG, 2x upscaled.

    C = 1 gives a grayscale PNG, C = 3 an RGB one.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    channels, h, w = images.shape[-3:]
    pad = 2
    grid = torch.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, channels))
    pixels = ((images.float().cpu().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)
    for k in range(rows * cols):
        r, c = divmod(k, cols)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        grid[top : top + h, left : left + w] = pixels[k]
    grid = grid.repeat_interleave(2, 0).repeat_interleave(2, 1)
    if channels == 1:
        plt.imsave(path, grid[..., 0].numpy(), cmap="gray", vmin=0.0, vmax=1.0)
    else:
        plt.imsave(path, grid.numpy())
    return path


@torch.no_grad()
def denoising_loss(
    model: DiTTransformer2DModel,
    scheduler: DDPMScheduler,
    images: torch.Tensor,
    labels: torch.Tensor,
    repeats: int = 4,
    seed: int = 1234,
    batch_size: int = 500,
) -> float:
    """Mean epsilon-MSE over ``repeats`` fixed (seeded) noise/timestep draws per image (eval mode).

    Comparing it on train vs held-out images shows over-fitting (memorisation).
    """
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    total, count = 0.0, 0
    for _ in range(repeats):
        for i in range(0, images.shape[0], batch_size):
            x0 = images[i : i + batch_size]
            noise = torch.randn(x0.shape, generator=gen)
            t = torch.randint(0, num_train_timesteps(scheduler), (x0.shape[0],), generator=gen)
            xt = scheduler.add_noise(x0, noise, cast(torch.IntTensor, t))
            pred = model(xt.to(device), t.to(device), labels[i : i + batch_size].to(device)).sample
            total += float(F.mse_loss(pred.float().cpu(), noise, reduction="sum"))
            count += noise.numel()
    return total / max(count, 1)


def evaluate_samples(
    ema: DiTTransformer2DModel,
    train_scheduler: DDPMScheduler,
    cfg: TrainConfig,
    device: torch.device,
    eval_samples: int,
    data: DatasetSpec,
) -> dict[str, float]:
    """Class accuracy and classifier-feature FID of ``eval_samples`` DDIM samples (if possible).

    The FID floor is the same statistic for ``eval_samples`` real *train* images against the
    held-out images: what a perfect generator would score with these set sizes.
    """
    if eval_samples <= 0 or cfg.classifier is None or not Path(cfg.classifier).exists():
        return {}
    split = data.split
    from benchmarks.fid import fid
    from benchmarks.reference import load_dataset_classifier
    from benchmarks.reference.classifier_common import predict

    clf = load_dataset_classifier(cfg.dataset, cfg.classifier, device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 2)
    labels = torch.arange(eval_samples, device=device) % data.num_classes
    images = torch.cat(
        [
            sample(
                ema,
                make_sampler(train_scheduler.config, "ddim"),
                labels[i : i + 500],
                cfg.sample_steps,
                cfg.guidance_scale,
                generator=gen,
            )
            for i in range(0, eval_samples, 500)
        ]
    )
    acc = float((predict(clf, images) == labels.cpu()).float().mean())
    # The floor: as many real train images per class as the samples have, capped by the smallest
    # class (the colour set's "activities" group has 76 train images).
    counts = torch.bincount(split.train_labels, minlength=data.num_classes)
    per_class = min(eval_samples // data.num_classes, int(counts.min()))
    floor = stratified_subset(split.train_labels, per_class, num_classes=data.num_classes)

    def feature_fn(x: torch.Tensor) -> torch.Tensor:
        return clf.features(x.to(device))

    return {
        "eval_samples": float(eval_samples),
        "sample_class_accuracy": acc,
        "fid_samples_vs_held_out": fid(images, split.held_out_images, feature_fn),
        "fid_floor_train_real_vs_held_out": fid(
            split.train_images[floor], split.held_out_images, feature_fn
        ),
        "fid_floor_images": float(floor.numel()),
    }


def _diffusers_version() -> str:
    import diffusers

    return str(diffusers.__version__)


def write_artifacts(
    cfg: TrainConfig,
    run: Run,
    data: DatasetSpec,
    device: torch.device,
    train_time: float,
    eval_samples: int,
) -> TrainResult:
    """After the loop: the EMA export, loss curve, sample grid and ``training.json`` in
    ``cfg.out``."""
    ema, scheduler, split = run.ema, run.scheduler, data.split
    out = cfg.out
    files = export_ema(ema, scheduler, out, cfg.save_fp16)
    files += write_loss_curve(out, run.rows)

    ema.eval()
    grid_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    grid_labels = torch.arange(data.num_classes, device=device).repeat_interleave(
        cfg.samples_per_class
    )
    t0 = time.perf_counter()
    grid = sample(
        ema,
        make_sampler(scheduler.config, "ddim"),
        grid_labels,
        cfg.sample_steps,
        cfg.guidance_scale,
        generator=grid_gen,
    )
    sample_time = time.perf_counter() - t0
    files.append(write_grid(out / "samples.png", grid, data.num_classes, cfg.samples_per_class))

    n_train = split.train_images.shape[0]
    final_loss = run.rows[-1]["loss"] if run.rows else float("nan")
    info: dict[str, Any] = {
        "steps": run.step,
        "steps_before_init": run.steps_before_init,  #: steps of the --init-from model (0: none)
        "batch_size": cfg.batch_size,
        "images_seen": run.step * cfg.batch_size,
        "epochs": run.step * cfg.batch_size / n_train,
        "wall_time_s": round(run.elapsed_before + train_time, 1),
        "wall_time_this_run_s": round(train_time, 1),
        "device": device_name(device),
        "precision": cfg.precision,
        "compile": cfg.compile,
        "final_loss": final_loss,
        "ema_decay": cfg.ema_decay,
        "params": sum(p.numel() for p in run.model.parameters()),
        "beta_schedule": cfg.beta_schedule,
        "train_images": n_train,
        "data": data.description,
        "sample_grid": {
            "sampler": "DDIM",
            "steps": cfg.sample_steps,
            "guidance_scale": cfg.guidance_scale,
            "seconds": round(sample_time, 2),
        },
        "torch": torch.__version__,
        "diffusers": _diffusers_version(),
        "config": config_json(cfg),
    }
    # As many as held out, all classes (MNIST: 50 per class; colour: 186 held out, 20 per class).
    per_class = split.held_out_labels.numel() // data.num_classes
    subset = stratified_subset(split.train_labels, per_class, num_classes=data.num_classes)
    info["ema_loss_train"] = denoising_loss(
        ema, scheduler, split.train_images[subset], split.train_labels[subset]
    )
    info["ema_loss_held_out"] = denoising_loss(
        ema, scheduler, split.held_out_images, split.held_out_labels
    )
    info.update(evaluate_samples(ema, scheduler, cfg, device, eval_samples, data))
    info_path = out / "training.json"
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    files.append(info_path)
    logger.info("wrote %s", ", ".join(str(f) for f in files))
    return TrainResult(out=out, steps=run.step, final_loss=final_loss, files=files, info=info)
