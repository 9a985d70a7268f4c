"""The reference model an Ada script works on (``--dataset mnist`` or ``colour``): the DiT, its
DDIM sampler with per-sample cache decisions, its classifier and held-out images."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bd_compile.sampling import make_scheduler
from benchmarks.ada.rollout import Sampler
from benchmarks.common import region_flop_fraction
from benchmarks.quality.cli import COLOUR, DEFAULT_CLASSIFIER, DEFAULT_MODEL
from benchmarks.quality.plan import Dataset, example_kwargs, load_dataset, load_model
from passes import default_cache_block

#: the sampler the Ada scripts use by default (the shipped policies were trained for it)
STEPS, GUIDANCE, RHO = 50, 3.0, 0.4


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--dataset",
        choices=("mnist", "colour"),
        default="mnist",
        help="reference model: MNIST digits (default) or colour emoji (benchmarks/reference)",
    )
    ap.add_argument("--model", type=Path, default=None, help="default: the dataset's model")
    ap.add_argument(
        "--cache-block", type=int, default=None, help="default: passes.default_cache_block"
    )


@dataclass
class Reference:
    dataset: str
    model_path: Path
    model: Any
    train_config: Any
    cache_block: int
    sampler: Sampler

    @property
    def blocks(self) -> int:
        return len(self.model.transformer_blocks)

    def describe(self) -> str:
        """For result files and policy metadata."""
        name = "MNIST DiT" if self.dataset == "mnist" else "colour emoji DiT"
        return (
            f"reference {name} ({self.model_path.name}: {self.blocks} blocks), "
            f"DDIM {self.sampler.steps}, CFG {self.sampler.guidance:g}, "
            f"cache_block {self.cache_block}"
        )

    def data(self) -> Dataset:
        """Classifier (eval mode) and train/held-out images of the data set."""
        clf = DEFAULT_CLASSIFIER if self.dataset == "mnist" else COLOUR / "classifier.safetensors"
        return load_dataset(self.dataset, clf, None, torch.device("cpu"))

    def region_share(self) -> float:
        """FLOP share of one call that blocks ``0..cache_block`` take (what a reuse call skips)."""
        paths = [f"transformer_blocks.{i}" for i in range(self.cache_block + 1)]
        return region_flop_fraction(self.model, example_kwargs(self.model), paths)


def load(
    args: argparse.Namespace, steps: int = STEPS, guidance: float = GUIDANCE, rho: float = RHO
) -> Reference:
    """The model of ``--dataset``/``--model`` (frozen, eval) and its DDIM sampler."""
    path = Path(args.model or (DEFAULT_MODEL if args.dataset == "mnist" else COLOUR / "model"))
    model, train_sched = load_model(path, torch.device("cpu"))
    model.requires_grad_(False)
    blocks = len(model.transformer_blocks)
    cb = args.cache_block if args.cache_block is not None else default_cache_block(blocks)
    if not 0 <= cb < blocks - 1:
        raise SystemExit(f"--cache-block: expected 0..{blocks - 2} for {blocks} blocks, got {cb}")
    sampler = Sampler(model, make_scheduler(train_sched.config, "ddim"), cb, steps, guidance, rho)
    return Reference(args.dataset, path, model, train_sched.config, cb, sampler)
