"""What computing the cached region only for the rows that need it would save on a mixed step.

    python -m benchmarks.ada.rows [--dataset colour] --batch 8 --repeats 20

On a BlockDance-Ada *mixed* step (some samples of the batch reuse, others compute) the backend
runs the cached region (blocks ``0..cache_block``) for the whole batch and keeps the cached rows
with ``torch.where`` (``bd_compile/runtime.py``): one compiled graph, no recompile, whatever the
decisions. Computing only the ``k`` computing samples' rows needs a region graph at another
batch size: a compile per row count (static shapes), one graph with a symbolic batch
(``dynamic=True``), or eager. This script times each on the real inputs of block 0 (captured
from one call of the reference DiT at t = 500, batched CFG: 2 rows per sample), one thread,
median of ``--repeats`` interleaved calls, and reports each as a fraction of the whole-batch
call; the row gather and the scatter into the cached rows are included in the rows-only times.
What that is worth per generation depends on how often steps are mixed: the ``rows-only work``
column of ``benchmarks.ada.evaluate``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bd_compile.ada import sample_rows
from benchmarks.ada import reference
from benchmarks.common import log, machine, write_csv
from benchmarks.quality.plan import seeded_inputs

RESULTS = Path(__file__).resolve().parents[1] / "results"


class Region(nn.Module):
    """Blocks ``0..cache_block`` of a diffusers DiT, called as ``DiTTransformer2DModel`` calls
    them (``timestep`` and ``class_labels`` per row)."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(
        self, h: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor
    ) -> torch.Tensor:
        for block in self.blocks:
            h = block(h, timestep=timestep, class_labels=class_labels)
        return h


def block_inputs(ref: reference.Reference, samples: int) -> tuple[torch.Tensor, ...]:
    """``(hidden_states, timestep, class_labels)`` as block 0 receives them: ``2 * samples``
    rows ``[cond; uncond]`` at t = 500."""
    got: dict[str, Any] = {}

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        got["h"], got["t"], got["y"] = args[0], kwargs["timestep"], kwargs["class_labels"]

    labels, noise = seeded_inputs(range(samples), 0, ref.model)
    handle = ref.model.transformer_blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            ref.model(
                torch.cat([noise, noise]),
                timestep=torch.full((2 * samples,), 500),
                class_labels=torch.cat([labels, torch.full_like(labels, ref.sampler.null)]),
            )
    finally:
        handle.remove()
    return got["h"], got["t"], got["y"]


@dataclass
class Row:
    computing_samples: int
    batch_samples: int
    whole_compiled: float  #: seconds: region at the whole batch + torch.where (the backend)
    rows_static: float  #: fraction of whole_compiled: a static compile per row count
    rows_dynamic: float  #: one compile with a symbolic batch
    rows_eager: float  #: no compile
    static_compile_s: float  #: compiling the region at this row count


def _seconds(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    reference.add_arguments(ap)
    ap.add_argument("--batch", type=int, default=8, help="samples per call (2 rows each)")
    ap.add_argument(
        "--computing", type=int, nargs="+", default=None, help="default 1, B/4, B/2, 3B/4"
    )
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--tag", default=None, help="default: the dataset")
    args = ap.parse_args(argv)
    command = " ".join(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(1)
    ref = reference.load(args)
    b = args.batch
    ks = args.computing or sorted({1, max(1, b // 4), max(1, b // 2), max(1, 3 * b // 4)})
    if not all(0 < k < b for k in ks):
        raise SystemExit(f"--computing: expected counts in 1..{b - 1}, got {ks}")
    region = Region(list(ref.model.transformer_blocks[: ref.cache_block + 1])).eval()
    h, t, y = block_inputs(ref, b)
    cached = region(h, t, y).detach()
    _, sample_of_row = sample_rows(2 * b, "cfg")  # rows [cond; uncond]: sample i is i and b + i

    def computing_rows(k: int) -> torch.Tensor:
        """The rows of samples ``0..k-1`` (the ones that compute)."""
        return (sample_of_row < k).nonzero().flatten()

    def compiled(dynamic: bool) -> Any:
        return torch.compile(copy.deepcopy(region), backend="inductor", dynamic=dynamic)

    whole = compiled(False)
    dyn = compiled(True)
    rows_fns: dict[str, Any] = {"eager": region, "dynamic": dyn}
    times: dict[tuple[str, int], list[float]] = {}
    compile_s: dict[int, float] = {}
    static: dict[int, Any] = {}
    with torch.no_grad():
        whole(h, t, y)  # compile
        for k in ks:
            static[k] = compiled(False)
            idx = computing_rows(k)
            t0 = time.perf_counter()
            static[k](h[idx], t[idx], y[idx])
            compile_s[k] = time.perf_counter() - t0
            dyn(h[idx], t[idx], y[idx])  # compiles once (first k), then reuses
        log(f"compiled: region at {2 * b} rows, at {[2 * k for k in ks]} rows, one dynamic")

        def mixed_whole(k: int) -> Callable[[], Any]:
            keep = (sample_of_row >= k).view(-1, 1, 1)  # the first k samples compute

            def fn() -> Any:
                return torch.where(keep, cached, whole(h, t, y))

            return fn

        def rows_only(fn_k: Any, k: int) -> Callable[[], Any]:
            idx = computing_rows(k)

            def fn() -> Any:
                out = cached.clone()
                out[idx] = fn_k(h[idx], t[idx], y[idx])
                return out

            return fn

        for r in range(args.repeats):
            for k in ks:
                runs = {"whole": mixed_whole(k), "static": rows_only(static[k], k)}
                runs.update({name: rows_only(fn, k) for name, fn in rows_fns.items()})
                for name, fn in runs.items():
                    times.setdefault((name, k), []).append(_seconds(fn))
            if (r + 1) % 5 == 0:
                log(f"repeat {r + 1}/{args.repeats}")
    rows = []
    for k in ks:
        med = {name: statistics.median(ts) for (name, kk), ts in times.items() if kk == k}
        rows.append(
            Row(
                computing_samples=k,
                batch_samples=b,
                whole_compiled=med["whole"],
                rows_static=med["static"] / med["whole"],
                rows_dynamic=med["dynamic"] / med["whole"],
                rows_eager=med["eager"] / med["whole"],
                static_compile_s=compile_s[k],
            )
        )
    tag = args.tag or args.dataset
    out = RESULTS / f"ada-rows-{tag}.md"
    write_csv(out.with_suffix(".csv"), rows)
    lines = [
        f"# Rows-only region on a BlockDance-Ada mixed step ({tag})",
        "",
        f"Generated by `python -m benchmarks.ada.rows {command}`",
        "",
        f"- Machine: {machine()}; one thread; median of {args.repeats} interleaved calls.",
        f"- {ref.describe()}; region = blocks 0-{ref.cache_block}, batch {b} samples "
        f"({2 * b} rows, batched CFG), inputs of block 0 at t = 500.",
        "- `whole`: the backend today, region compiled (inductor) at the whole batch + "
        "`torch.where` with the cached rows. The other columns: time of computing only the "
        "computing samples' rows (gather, region, scatter into the cached rows) / `whole`.",
        "",
        "| computing samples / batch | whole (ms) | rows-only, compile per row count | "
        "rows-only, one dynamic-batch compile | rows-only, eager | compiling one row count (s) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.computing_samples} / {b} | {row.whole_compiled * 1e3:.2f} | "
            f"{row.rows_static:.2f} | {row.rows_dynamic:.2f} | {row.rows_eager:.2f} | "
            f"{row.static_compile_s:.1f} |"
        )
    out.write_text("\n".join(lines) + "\n")
    log("\n".join(lines))
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
