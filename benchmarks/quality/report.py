"""The report part of ``benchmarks.quality``: merge quality and speed results, say what they show.

    python -m benchmarks.quality.report [--results benchmarks/results] [--tag T]

Reads ``quality_metrics[-tag].csv/.json`` (required), ``quality_speed[-tag].csv/.json`` (optional:
without it speedups are the FLOP bounds) and ``quality_samples[-tag].npz``; writes
``quality[-tag].md``, ``quality[-tag].csv``, ``quality_pareto[-tag].png`` and
``quality_grid[-tag].png``. The work is in three modules, each importing only the one before it:
:mod:`~benchmarks.quality.verdicts` (the rows and every comparison the report states),
:mod:`~benchmarks.quality.figures` (the PNGs) and :mod:`~benchmarks.quality.writing` (the files).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from benchmarks.quality.writing import write_report

__all__ = ["main", "write_report"]

RESULTS = Path(__file__).resolve().parents[1] / "results"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality.report")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    write_report(args.results, f"-{args.tag}" if args.tag else "")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
