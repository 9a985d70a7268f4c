"""Re-evaluate a trained reference model in place: sample grid, class accuracy, FID.

    python -m benchmarks.reference.evaluate --model bd_compile/data/reference_model --samples 500

Uses the current sampler settings of ``sampling.py`` (the scheduler config in the model folder is
rewritten from ``make_train_scheduler`` with the model's beta schedule) and records the result
under ``"evaluation"`` in the folder's ``training.json``. ``--half`` stores the weights as fp16
(half the size in git; ``load_reference`` loads them back as fp32).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from benchmarks.reference.artifacts import evaluate_samples, write_grid
from benchmarks.reference.data import NUM_CLASSES
from benchmarks.reference.presets import TrainConfig
from benchmarks.reference.sampling import (
    SCHEDULER_SUBFOLDER,
    load_reference,
    make_sampler,
    make_train_scheduler,
    sample,
)
from benchmarks.reference.training import load_dataset


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, default=TrainConfig.out)
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--half", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    model, old = load_reference(args.model)
    scheduler = make_train_scheduler(old.config.beta_schedule, old.config.num_train_timesteps)
    scheduler.save_pretrained(args.model / SCHEDULER_SUBFOLDER)
    if args.half:
        model.to(torch.float16).save_pretrained(args.model, safe_serialization=True)
        model, scheduler = load_reference(args.model)
    cfg = TrainConfig(out=args.model, data=args.data, device="cpu")
    grid_labels = torch.arange(NUM_CLASSES).repeat_interleave(cfg.samples_per_class)
    grid = sample(
        model,
        make_sampler(scheduler.config, "ddim"),
        grid_labels,
        cfg.sample_steps,
        cfg.guidance_scale,
        generator=torch.Generator().manual_seed(cfg.seed + 1),
    )
    write_grid(args.model / "samples.png", grid, NUM_CLASSES, cfg.samples_per_class)
    t0 = time.perf_counter()
    result = evaluate_samples(
        model, scheduler, cfg, torch.device("cpu"), args.samples, load_dataset(cfg)
    )
    result["eval_seconds_cpu_1_thread"] = time.perf_counter() - t0
    info_path = args.model / "training.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    info["evaluation"] = {
        **result,
        "sampler": f"DDIM {cfg.sample_steps} steps, guidance {cfg.guidance_scale}",
        "weights_dtype": "float16" if args.half else "float32",
    }
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    logging.info("evaluation: %s", info["evaluation"])
    return result


if __name__ == "__main__":
    main()
