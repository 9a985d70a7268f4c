"""The Pareto plot of ``benchmarks.ada.evaluate``'s CSV: FLOP-bound speedup (block work) against
PSNR to the all-compute sample, static BlockDance-N and the Ada policies.

    python -m benchmarks.ada.plot benchmarks/results/ada-reference.csv
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path((argv if argv is not None else sys.argv[1:])[0])
    rows = [r for r in csv.DictReader(path.open()) if r["method"] != "full"]
    fig, ax = plt.subplots(figsize=(6, 4))
    static = [r for r in rows if r["method"].startswith("static")]
    ax.plot(
        [float(r["flop_bound"]) for r in static],
        [float(r["psnr"]) for r in static],
        "o-",
        label="static BlockDance-N (N=2, 3, 4)",
    )
    for r in rows:
        if r["method"].startswith("static"):
            continue
        x, y = float(r["flop_bound"]), float(r["psnr"])
        ax.errorbar(x, y, yerr=float(r["psnr_se"]), fmt="s", label=r["method"])
    ax.set_xlabel("FLOP-bound speedup (block work)")
    ax.set_ylabel("PSNR to the all-compute sample (dB)")
    ax.set_title(f"BlockDance-Ada vs static BlockDance-N ({path.stem}), DDIM 50")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out = path.with_name(path.stem + "-pareto.png")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
