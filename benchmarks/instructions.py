"""Instructions per call under callgrind: blockdance's compute and reuse calls against plain
inductor, counted instead of timed.

    python -m benchmarks.instructions     # CPU: ~3 min plain warm-up, ~9 min under valgrind

``benchmarks.overhead`` times calls on a shared machine: after 30 generations its medians are
known to +-35-45 us (95% interval), the size of issue 18's 30 us target. This counts what the
host executes instead, which does not depend on the machine's load: the same 28-block
PixArt-shaped model, calls and methods as ``benchmarks.overhead`` run in a child process under
``valgrind --tool=callgrind --instr-atstart=no``; after the warm-up generations a five-line C
shim over ``valgrind/callgrind.h`` (loaded by ctypes) switches the instrumentation on, zeroes
the counters before each model call and dumps them after it, so each dump is exactly one call
(Dynamo's guards, the runtime, the wrappers, the generated code, ATen and the kernels' own
instructions). Calls ``0..--calls-1`` of a generation are counted, ``--rounds`` times, for each
method. Reported per method and kind of call: the median instructions per call (the spread over
calls is about a percent at most), minus inductor's median, and two counts that say where a
difference comes from: CPU storage allocations (``c10::alloc_cpu``) and calls of inductor's
generated C++ kernels (``kernel_py``); and a second table, every function's own instructions
(self cost) summed by the library its code is in (``LIBRARIES``: malloc/free, CPython, torch's
Python bindings, ATen/c10, inductor's kernels, MKL, ...), minus inductor's: which code runs the
difference.

Instructions are not microseconds: Python, allocation and a GEMM run at very different
instructions per cycle. Read this for what a change adds or removes, ``benchmarks.overhead`` for
what a call costs.

valgrind 3.19 cannot run AVX-512 code, so the child runs ATen's AVX2 kernels
(``ATEN_CPU_CAPABILITY=avx2``) and inductor compiles through a ``CXX`` wrapper that replaces
``-march=native`` with ``-march=x86-64-v3``, in an inductor cache of its own
(``.inductor-cache-callgrind``; the main cache holds AVX-512 code). A plain run of the child
fills that cache first (inductor compiles outside valgrind), then the counted run finds
everything cached. Needs ``valgrind``, its ``callgrind.h`` header and ``gcc``.

Writes benchmarks/results/instructions[-<tag>].md and .json.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import log, machine, write_json
from benchmarks.overhead import (
    Calls,
    add_model_args,
    build_model,
    compiled_methods,
    kinds_of,
    model_line,
)

RESULTS = Path(__file__).parent / "results"
CACHE = Path(__file__).resolve().parent.parent / ".inductor-cache-callgrind"

SHIM = """#include <valgrind/callgrind.h>
void bd_start(void) { CALLGRIND_START_INSTRUMENTATION; }
void bd_stop(void) { CALLGRIND_STOP_INSTRUMENTATION; }
void bd_zero(void) { CALLGRIND_ZERO_STATS; }
void bd_dump(const char *label) { CALLGRIND_DUMP_STATS_AT(label); }
"""

#: what each count in a dump is made of: (name, substring of the called function's name)
COUNTED_CALLS = (("allocations", "c10::alloc_cpu("), ("kernels", "kernel_py("))

#: Where a dump's instructions are spent, by the code that executes them (self cost, callees
#: not included): (library, substrings of the function's "object file|source file|name"),
#: first match wins; the rest is "other".
LIBRARIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("malloc, free", ("/malloc/",)),  # glibc's allocator, by its source files
    ("MKL (GEMM)", ("|mkl_",)),  # linked into libtorch_cpu
    ("inductor's kernels", ("inductor-cache", "torchinductor")),
    ("CPython", ("libpython", "/bin/python")),
    ("torch's Python bindings", ("libtorch_python",)),
    ("ATen, c10", ("libtorch_cpu", "libc10")),
    ("libc, libstdc++, loader", ("libc.so", "libstdc++", "ld-linux", "libm.so", "libgcc")),
)
OTHER = "other"
NAMES = (*(lib for lib, _ in LIBRARIES), OTHER)


@dataclass(frozen=True)
class Dump:
    """One counted model call."""

    method: str
    kind: str
    round: int
    call: int
    instructions: int
    allocations: int
    kernels: int
    #: self instructions per ``LIBRARIES`` entry (and ``OTHER``); they sum to ``instructions``
    libraries: dict[str, int] = field(default_factory=dict)


def library(where: str) -> str:
    """The ``LIBRARIES`` entry of a function given as ``object file|source file|name``."""
    return next((lib for lib, keys in LIBRARIES if any(k in where for k in keys)), OTHER)


def parse_dump(text: str) -> Dump:
    """A callgrind dump of one call: its label (``method|kind|round|call``, given to
    ``CALLGRIND_DUMP_STATS_AT``; ``~`` stands for a space in the method), total instructions,
    the calls into ``COUNTED_CALLS`` and the self instructions per ``LIBRARIES`` entry.

    Callgrind names an object file (``ob=``), source file (``fl=``) or function (``fn=``) once,
    ``fn=(id) name``, and then by ``fn=(id)`` alone; the callee's lines (``cob=``, ``cfi=``,
    ``cfn=``) share those names. A ``calls=<count> ...`` line after a ``cfn=`` line counts that
    callee's calls from the function being described, and the cost line after it is the call's
    inclusive cost (not the function's own). Cost lines are positions (``+3``, ``-1``, ``*``,
    ``12``: as many as the ``positions:`` header names) then the events, ``Ir`` first."""
    label = re.search(r"^desc: Trigger: Client Request: (\S+)$", text, re.M)
    total = re.search(r"^(?:summary|totals): (\d+)", text, re.M)
    if label is None or total is None:
        raise ValueError("not a callgrind dump made by CALLGRIND_DUMP_STATS_AT (no label or total)")
    positions = re.search(r"^positions: (.*)$", text, re.M)
    ir = len(positions.group(1).split()) if positions else 1  # the Ir column of a cost line
    method, kind, rnd, call = label.group(1).split("|")
    names: dict[tuple[str, str], str] = {}  # (ob | fl | fn, id) -> name
    where = {"ob": "", "fl": "", "fn": ""}  # the function being described
    counts = dict.fromkeys((name for name, _ in COUNTED_CALLS), 0)
    libraries: dict[str, int] = defaultdict(int)
    lib = OTHER
    callee: str | None = None
    inclusive = False  # the next cost line is a call's inclusive cost
    for line in text.splitlines():
        if line and (line[0].isdigit() or line[0] in "+-*"):
            if inclusive:
                inclusive = False
            else:
                fields = line.split()
                libraries[lib] += int(fields[ir]) if len(fields) > ir else 0
            continue
        m = re.match(r"(c?)(ob|fl|fi|fe|fn)=\((\d+)\)(?: (.*))?$", line)
        if m:
            of_callee, spec, key = bool(m.group(1)), m.group(2), m.group(3)
            space = "fl" if spec in ("fi", "fe") else spec  # one name space for files
            if m.group(4):
                names[space, key] = m.group(4)
            if spec == "fn":
                callee = names.get((space, key), "") if of_callee else None
            if not of_callee and spec in where:  # a new function (its object, its file)
                where[spec] = names.get((space, key), "")
                lib = library("|".join(where.values()))
        elif line.startswith("calls="):
            inclusive = True
            if callee is not None:
                n = int(line.split()[0].removeprefix("calls="))
                for name, pattern in COUNTED_CALLS:
                    if pattern in callee:
                        counts[name] += n
                callee = None
    return Dump(
        method.replace("~", " "),
        kind,
        int(rnd),
        int(call),
        int(total.group(1)),
        **counts,
        libraries=dict(libraries),
    )


def summarize(dumps: Iterable[Dump]) -> list[dict[str, Any]]:
    """Per method and kind of call: medians, the spread, and the difference to inductor's."""
    by: dict[tuple[str, str], list[Dump]] = defaultdict(list)
    for d in dumps:
        by[d.method, d.kind].append(d)
    base = by.get(("inductor", "call"))
    if not base:
        raise ValueError("no inductor calls among the dumps: nothing to compare with")
    base_instr = statistics.median(d.instructions for d in base)
    base_libs = library_medians(base)
    rows = []
    for (method, kind), ds in sorted(by.items(), key=lambda kv: (kv[0][0] != "inductor", kv[0])):
        instr = [d.instructions for d in ds]
        med = statistics.median(instr)
        libs = library_medians(ds)
        rows.append(
            {
                "method": method,
                "kind": kind,
                "calls": len(ds),
                "instructions": med,
                "spread": (max(instr) - min(instr)) / med,
                "minus_inductor": med - base_instr,
                "allocations": statistics.median(d.allocations for d in ds),
                "kernels": statistics.median(d.kernels for d in ds),
                "libraries": libs,
                "libraries_minus_inductor": {
                    k: libs.get(k, 0) - base_libs.get(k, 0)
                    for k in NAMES
                    if k in libs or k in base_libs
                },
            }
        )
    return rows


def library_medians(dumps: list[Dump]) -> dict[str, float]:
    """The median self instructions per library over ``dumps``, in ``LIBRARIES`` order."""
    found = {k for d in dumps for k in d.libraries}
    return {k: statistics.median(d.libraries.get(k, 0) for d in dumps) for k in NAMES if k in found}


def compiler_wrapper(directory: Path) -> Path:
    """A ``g++`` that builds for AVX2 where inductor asks for ``-march=native``."""
    path = directory / "g++-avx2"
    path.write_text(
        "#!/bin/bash\n"
        "args=()\n"
        'for a in "$@"; do case "$a" in -march=native) args+=(-march=x86-64-v3);; '
        '*) args+=("$a");; esac; done\n'
        'exec g++ "${args[@]}"\n'
    )
    path.chmod(0o755)
    return path


def missing_tools() -> list[str]:
    missing = [t for t in ("valgrind", "gcc", "g++") if shutil.which(t) is None]
    if not Path("/usr/include/valgrind/callgrind.h").exists():
        missing.append("valgrind/callgrind.h (the valgrind development header)")
    return missing


def child(args: argparse.Namespace) -> None:
    """The measured process: warm-up generations, then (under valgrind) one dump per call."""
    torch.set_num_threads(1)
    a = argparse.Namespace(**vars(args), device="cpu")
    model = build_model(a)
    calls = Calls(a)
    methods = compiled_methods(model, calls, args.interval)
    kinds: dict[str, tuple[str, ...]] = {}
    for name, m in methods.items():
        log(f"warm-up {name}")
        calls.run(m)
        calls.run(m)
        kinds[name] = kinds_of(m) if name != "inductor" else ("call",) * args.steps
    if args.child == "plain":
        return
    shim = ctypes.CDLL(args.shim)
    shim.bd_start()
    # Each round is a new generation: call 0's timestep is above the last call's.
    with torch.no_grad():
        for rnd in range(args.rounds):
            for i in range(args.calls):
                for name, m in methods.items():
                    shim.bd_zero()
                    m(timestep=calls.t[i], **calls.kwargs)
                    label = f"{name.replace(' ', '~')}|{kinds[name][i]}|{rnd}|{i}"
                    shim.bd_dump(label.encode())
            log(f"round {rnd + 1}/{args.rounds} counted")
    shim.bd_stop()


def run(args: argparse.Namespace) -> dict[str, Any]:
    missing = missing_tools()
    if missing:
        raise SystemExit(f"benchmarks.instructions needs {', '.join(missing)}; not found")
    with tempfile.TemporaryDirectory(prefix="bd-callgrind-") as tmp:
        work = Path(tmp)
        (work / "shim.c").write_text(SHIM)
        shim = work / "libshim.so"
        subprocess.run(
            ["gcc", "-O2", "-shared", "-fPIC", "-o", str(shim), str(work / "shim.c")], check=True
        )
        CACHE.mkdir(exist_ok=True)
        env = {
            **os.environ,
            "ATEN_CPU_CAPABILITY": "avx2",
            "CXX": str(compiler_wrapper(work)),
            "TORCHINDUCTOR_CACHE_DIR": str(CACHE),
            "OMP_NUM_THREADS": "1",
        }
        me = [sys.executable, "-m", "benchmarks.instructions", *child_argv(args)]
        log("plain run: compiling into the AVX2 inductor cache")
        subprocess.run([*me, "--child", "plain"], env=env, check=True)
        log("counted run under valgrind")
        out = work / "callgrind.out"
        subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                "--instr-atstart=no",
                f"--callgrind-out-file={out}",
                *me,
                "--child",
                "valgrind",
                "--shim",
                str(shim),
            ],
            env=env,
            check=True,
        )
        # callgrind.out.<n>: the n-th labelled dump (the unlabelled callgrind.out is the exit's)
        files = sorted(work.glob("callgrind.out.*"), key=lambda p: int(p.suffix[1:]))
        dumps = [parse_dump(p.read_text()) for p in files]
    unsummed = [
        d for d in dumps if abs(sum(d.libraries.values()) - d.instructions) > 1e-3 * d.instructions
    ]
    if unsummed:  # the parser missed cost lines (a callgrind format it does not read)
        d = unsummed[0]
        raise RuntimeError(
            f"{len(unsummed)} dumps' self costs do not sum to their totals: "
            f"{sum(d.libraries.values())} of {d.instructions} in {d.method} {d.kind} call {d.call}"
        )
    per_method = Counter(d.method for d in dumps)
    if not dumps or set(per_method.values()) != {args.rounds * args.calls}:
        raise RuntimeError(f"expected {args.rounds * args.calls} dumps per method: {per_method}")
    return {
        "machine": machine_line(),
        "args": {k: v for k, v in vars(args).items() if k not in ("child", "shim")},
        "rows": summarize(dumps),
        "dumps": [asdict(d) for d in dumps],
    }


def machine_line() -> str:
    torch.set_num_threads(1)  # as in the counted process
    version = subprocess.check_output(["valgrind", "--version"], text=True).strip()
    return f"{machine()}; counted under {version}"


def child_argv(args: argparse.Namespace) -> list[str]:
    return [
        f"--{k}={getattr(args, k)}"
        for k in ("blocks", "width", "latent", "steps", "interval", "calls", "rounds")
    ]


def write(result: dict[str, Any], tag: str) -> Path:
    path = write_json(RESULTS, "instructions", tag, result)
    a = result["args"]
    lines = [
        "# Instructions per call: blockdance vs plain inductor (callgrind)",
        "",
        f"Machine: {result['machine']}.",
        f"Model: {model_line(a)} (as `benchmarks.overhead`); "
        f"blockdance interval={a['interval']} over the whole trajectory. Calls 0..{a['calls'] - 1} "
        f"of a {a['steps']}-call generation, {a['rounds']} generations, each call counted on its "
        "own after two warm-up generations. Instructions: median per call; spread: (max - min) "
        "/ median over those calls. Allocations: CPU storage allocations per call "
        "(`c10::alloc_cpu`); kernels: calls of inductor's generated C++ kernels (`kernel_py`).",
        "Reproduce: `python -m benchmarks.instructions" + (f" --tag {tag}" if tag else "") + "`.",
        "",
        "| method | call | calls | instructions | spread | minus inductor's | allocations | "
        "kernels |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['method']} | {r['kind']} | {r['calls']} | {r['instructions'] / 1e6:.2f} M | "
            f"{100 * r['spread']:.2f}% | {r['minus_inductor'] / 1e6:+.2f} M "
            f"({100 * r['minus_inductor'] / (r['instructions'] - r['minus_inductor']):+.1f}%) | "
            f"{r['allocations']:.0f} | {r['kernels']:.0f} |"
        )
    lines += library_table(result["rows"])
    path.write_text("\n".join(lines) + "\n")
    return path


def library_table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown lines: the self instructions per call by library, inductor's in thousands and
    every other row's minus inductor's (no lines for results without libraries)."""
    libs = list(dict.fromkeys(k for r in rows for k in r.get("libraries", {})))
    if not libs:
        return []
    lines = [
        "",
        "Where the instructions run: self instructions per call (a function's own, callees not "
        "included) by the code that executes them, median per library, in thousands; "
        "inductor's row as counted, every other row minus inductor's. Libraries by object file, "
        "source file and function name: `LIBRARIES` in `benchmarks/instructions.py`.",
        "",
        "| method | call | " + " | ".join(libs) + " |",
        "|---|---|" + "---|" * len(libs),
    ]
    for r in rows:
        base = r["method"] == "inductor"
        values = r["libraries"] if base else r["libraries_minus_inductor"]
        cells = [f"{values.get(k, 0) / 1e3:{'' if base else '+'},.0f}" for k in libs]
        lines.append(f"| {r['method']} | {r['kind']} | " + " | ".join(cells) + " |")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_args(p)
    p.add_argument("--calls", type=int, default=6, help="calls counted per generation")
    p.add_argument("--rounds", type=int, default=2, help="generations counted")
    p.add_argument("--tag", default="", help="results/instructions-<tag>.md")
    p.add_argument("--child", choices=("plain", "valgrind"), help=argparse.SUPPRESS)
    p.add_argument("--shim", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not 1 <= args.calls <= args.steps:
        p.error(f"--calls must be between 1 and --steps ({args.steps}); got {args.calls}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child(args)
        return
    path = write(run(args), args.tag)
    log(f"wrote {path}")
    print(path.read_text())


if __name__ == "__main__":
    main()
