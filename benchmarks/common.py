"""Shared pieces of the benchmarks: timing, peak memory, FLOP fraction of the cached region, the
FLOP-bound speedup (the one formula), CSV output and progress lines."""

from __future__ import annotations

import csv
import ctypes
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode


def machine() -> str:
    """A one-line description of where the numbers came from."""
    if torch.cuda.is_available():
        dev = torch.cuda.get_device_name()
    else:
        dev = f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    return (
        f"{dev}; torch {torch.__version__}; {torch.get_num_threads()} thread(s); "
        f"{platform.platform()}"
    )


#: ``--skip-module-guards``' help text (``benchmarks.step_split``, ``benchmarks.overhead``)
SKIP_MODULE_GUARDS_HELP = (
    "compile every model with options={'guard_filter_fn': "
    "torch.compiler.skip_guard_on_all_nn_modules_unsafe}: no Dynamo guards on the modules' "
    "weights and attributes (unsafe if they change between calls)"
)


def guard_options(skip_module_guards: bool) -> dict[str, Any]:
    """The ``torch.compile`` options of ``--skip-module-guards``, a new dict per call: torch
    pops the filter out of the options dict it is given (before the backend reads them), so a
    dict shared by two ``torch.compile`` calls filters only the first one's guards."""
    if not skip_module_guards:
        return {}
    return {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def clocked(fn: Callable[..., Any], seconds: list[float]) -> Callable[..., Any]:
    """``fn``, appending the wall-clock seconds of each call to ``seconds`` (host time: on a
    GPU it times launches, not kernels)."""

    def run(*args: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args)
        seconds.append(time.perf_counter() - t0)
        return out

    return run


@contextmanager
def variants_clocked(model: Any, seconds_for: Callable[[str], list[float]]) -> Iterator[None]:
    """Inside the block, every compiled variant of blockdance ``model`` is ``clocked`` into
    ``seconds_for(variant name)``, ``GraphRuntime.compute_fn`` (what cache steps call) too; the
    runtimes get their own functions back after it."""
    from bd_compile.api import runtimes_of

    saved = [(rt, rt.compiled, rt.compute_fn) for rt in runtimes_of(model)]
    for rt, compiled, _ in saved:
        rt.compiled = {k: clocked(fn, seconds_for(k[0])) for k, fn in compiled.items()}
        rt.compute_fn = rt.compiled[("compute", None)]
    try:
        yield
    finally:
        for rt, compiled, compute_fn in saved:
            rt.compiled, rt.compute_fn = compiled, compute_fn


def median(xs: list[float]) -> float:
    return statistics.median(xs)


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


_LIBC = ctypes.CDLL(None)
_LIBC.mallinfo2.restype = _Mallinfo2


def _heap_bytes() -> int:
    """Bytes malloc has handed out and not taken back (glibc ``mallinfo2``: in-use arena chunks
    plus mmapped chunks); torch's CPU allocator allocates through malloc."""
    info = _LIBC.mallinfo2()
    return int(info.uordblks + info.hblkhd)


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, int]]:
    """Peak memory above the level at entry: exact allocator stats on CUDA; on CPU the bytes
    malloc has handed out, sampled by a thread every ~0.2 ms (the interpreter's switch interval
    is lowered meanwhile), so a very short-lived peak can be missed. Both methods are measured
    the same way in one process."""
    result: dict[str, int] = {}
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        yield result
        torch.cuda.synchronize()
        result["peak"] = torch.cuda.max_memory_allocated() - base
        return
    base = _heap_bytes()
    peak = [base]
    stop = threading.Event()
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _heap_bytes())
            time.sleep(0.0002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(interval)
        result["peak"] = max(peak[0], _heap_bytes()) - base


def region_flop_fraction(
    model: torch.nn.Module, kwargs: dict[str, Any], cached_block_paths: list[str]
) -> float:
    """Fraction of one forward's FLOPs spent in the given blocks (module paths such as
    ``transformer_blocks.3``), counted by ``torch.utils.flop_counter`` on an eager run."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(**kwargs)
    counts = counter.get_flop_counts()
    root = type(model).__name__
    total = sum(counts["Global"].values())
    skipped = sum(sum(counts.get(f"{root}.{p}", {}).values()) for p in cached_block_paths)
    return skipped / total if total else 0.0


def flop_bound_speedup(calls: int, reuse_calls: float, fraction: float) -> float:
    """Speedup if a reuse call cost exactly ``1 - fraction`` of a full call."""
    return calls / (calls - reuse_calls * fraction)


def write_csv(path: Path, rows: Sequence[Any]) -> None:
    """One CSV row per dataclass instance, columns in field order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        w.writeheader()
        w.writerows(asdict(r) for r in rows)


def write_json(results: Path, name: str, tag: str, result: dict[str, Any]) -> Path:
    """``result`` as ``results/<name>[-<tag>].json``; the path of the table that goes next to
    it, ``results/<name>[-<tag>].md`` (a tag may hold dots: no ``with_suffix``)."""
    results.mkdir(parents=True, exist_ok=True)
    base = f"{name}-{tag}" if tag else name
    (results / f"{base}.json").write_text(json.dumps(result, indent=1) + "\n")
    return results / f"{base}.md"


def log(msg: str) -> None:
    """A progress line on stdout, flushed (benchmarks run for minutes)."""
    print(msg, flush=True)
