"""benchmarks.instructions: reading callgrind dumps, the table's arithmetic, the AVX2 compiler
wrapper (no valgrind run: that takes minutes; `python -m benchmarks.instructions` is the check)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from benchmarks import instructions


def dump(
    label: str, total: int, allocs: tuple[int, ...] = (), kernels: tuple[int, ...] = ()
) -> str:
    """A callgrind dump as valgrind writes it: names given once (``cfn=(id) name``), then by id."""
    lines = [
        "# callgrind format",
        "version: 1",
        f"desc: Trigger: Client Request: {label}",
        "events: Ir",
        f"summary: {total}",
        "",
        "fn=(1) caller_one",
        "0 10",
    ]
    for i, n in enumerate(allocs):
        lines += ["cfn=(2) c10::alloc_cpu(unsigned long)" if i == 0 else "cfn=(2)"]
        lines += [f"calls={n} 0", "0 500"]
    # a call of another function between: its calls= line must not count as an allocation
    lines += ["cfn=(3) c10::c10_compute_alignment(unsigned long)", "calls=7 0", "0 28"]
    lines += ["fn=(4) caller_two"]
    for i, n in enumerate(kernels):
        lines += ["cfn=(5) kernel_py(_object*, _object*)" if i == 0 else "cfn=(5)"]
        lines += [f"calls={n} 0", "0 900"]
    lines += ["cfn=(2)", "calls=1 0", "0 60", "fn=(2)", "0 11882", "", f"totals: {total + 42}"]
    return "\n".join(lines) + "\n"


def test_parse_dump_reads_label_total_and_counted_calls() -> None:
    d = instructions.parse_dump(
        dump("blockdance~compile_once=False|reuse|1|3", 8_600_000, (4, 5), (2, 3))
    )
    assert d == instructions.Dump(
        method="blockdance compile_once=False",
        kind="reuse",
        round=1,
        call=3,
        instructions=8_600_000,
        allocations=4 + 5 + 1,  # both callers' calls, through a name given by id only
        kernels=5,
        libraries={"other": 10 + 11882},  # self costs: not the calls' inclusive 500, 28, 900, 60
    )


def test_parse_dump_charges_self_costs_to_libraries() -> None:
    """Self costs by the described function's object, file and name: names given once, then by
    id; a callee's ``cob=``/``cfi=``/``cfn=`` lines do not change the function described, nor
    does an inlined file (``fi=``); a call's inclusive cost (after ``calls=``) is not counted;
    two position columns (``positions: instr line``) and relative positions are read."""
    text = "\n".join(
        [
            "version: 1",
            "desc: Trigger: Client Request: blockdance|compute|0|2",
            "positions: instr line",
            "events: Ir",
            "summary: 1111",
            "ob=(1) /usr/bin/python3.11",
            "fl=(1) ./Python/ceval.c",
            "fn=(1) _PyEval_EvalFrameDefault",
            "0x10 5 100",
            "cob=(2) /usr/lib/x86_64-linux-gnu/libc.so.6",
            "cfi=(2) ./malloc/./malloc/malloc.c",
            "cfn=(2) malloc",
            "calls=3 0x20 7",
            "+2 * 5000",  # malloc's inclusive cost: counted where malloc is described
            "+4 -1 10",  # still the interpreter's own
            "fi=(3) ./Include/object.h",
            "* +3 1",  # inlined code: the interpreter's
            "ob=(2)",
            "fl=(2)",
            "fn=(2)",
            "0x20 7 1000",
            "ob=(3) /venv/torch/lib/libtorch_cpu.so",
            "fl=(4) ???",
            "fn=(3) mkl_blas_avx2_sgemm",
            "0x30 0",  # no Ir field: nothing
            "fn=(4) at::empty",
            "0x40 0 0",
            "+1 0",
            "totals: 1111",
        ]
    )
    d = instructions.parse_dump(text + "\n")
    assert d.libraries == {"CPython": 111, "malloc, free": 1000, "MKL (GEMM)": 0, "ATen, c10": 0}
    assert sum(d.libraries.values()) == d.instructions
    assert instructions.library("/x/.inductor-cache/ab/cab.so|???|kernel") == "inductor's kernels"
    assert instructions.library("/opt/numpy.so|???|f") == instructions.OTHER


def test_parse_dump_rejects_a_dump_without_label() -> None:
    text = dump("inductor|call|0|0", 1).replace("desc: Trigger: Client Request: ", "desc: ")
    with pytest.raises(ValueError, match="no label or total"):
        instructions.parse_dump(text)


def test_summarize_medians_spread_and_difference() -> None:
    dumps = [
        instructions.Dump("inductor", "call", 0, i, n, 10, 5) for i, n in enumerate((100, 102, 101))
    ] + [
        instructions.Dump("blockdance", "compute", 0, 0, 110, 14, 6),
        instructions.Dump("blockdance", "compute", 1, 0, 112, 14, 6),
    ]
    rows = {(r["method"], r["kind"]): r for r in instructions.summarize(dumps)}
    assert rows["inductor", "call"]["instructions"] == 101
    assert rows["inductor", "call"]["spread"] == pytest.approx(2 / 101)
    assert rows["inductor", "call"]["minus_inductor"] == 0
    bd = rows["blockdance", "compute"]
    assert (bd["calls"], bd["instructions"], bd["minus_inductor"]) == (2, 111, 10)
    assert (bd["allocations"], bd["kernels"]) == (14, 6)
    with pytest.raises(ValueError, match="no inductor calls"):
        instructions.summarize(dumps[3:])


def test_summarize_and_tabulate_libraries() -> None:
    """Library medians per row, minus inductor's over the union of both rows' libraries (one
    that only inductor ran is a negative difference, not left out), and the table's cells in
    thousands: inductor's as counted, the others' signed."""

    def made(method: str, kind: str, call: int, libraries: dict[str, int]) -> instructions.Dump:
        return instructions.Dump(method, kind, 0, call, 10, 1, 1, libraries)

    dumps = [
        made("inductor", "call", i, {"CPython": 1_000_000 + 1000 * i, "MKL (GEMM)": 500_000})
        for i in range(3)
    ] + [
        made("blockdance", "reuse", i, {"CPython": n}) for i, n in enumerate((1_300_000, 1_500_000))
    ]
    rows = instructions.summarize(dumps)
    assert [(r["method"], r["libraries"]) for r in rows] == [
        ("inductor", {"MKL (GEMM)": 500_000, "CPython": 1_001_000}),
        ("blockdance", {"CPython": 1_400_000}),
    ]
    assert rows[1]["libraries_minus_inductor"] == {"MKL (GEMM)": -500_000, "CPython": 399_000}
    assert instructions.library_table(rows)[-4:] == [
        "| method | call | MKL (GEMM) | CPython |",
        "|---|---|---|---|",
        "| inductor | call | 500 | 1,001 |",
        "| blockdance | reuse | -500 | +399 |",
    ]
    assert instructions.library_table([{**r, "libraries": {}} for r in rows]) == []


def test_compiler_wrapper_builds_for_avx2(tmp_path: Path) -> None:
    """The wrapper hands g++ every argument, -march=native replaced (valgrind 3.19 has no
    AVX-512); observed through a fake g++ first on PATH."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "g++").write_text('#!/bin/bash\nprintf "%s\\n" "$@"\n')
    (fake / "g++").chmod(0o755)
    wrapper = instructions.compiler_wrapper(tmp_path)
    out = subprocess.run(
        [str(wrapper), "-O3", "-march=native", "a b.cpp"],
        env={"PATH": f"{fake}:/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.splitlines() == ["-O3", "-march=x86-64-v3", "a b.cpp"]


def test_parse_args_checks_calls() -> None:
    args = instructions.parse_args([])
    assert (args.blocks, args.width, args.latent, args.calls, args.rounds) == (28, 64, 4, 6, 2)
    assert instructions.child_argv(args)[0] == "--blocks=28"
    with pytest.raises(SystemExit):
        instructions.parse_args(["--calls", "60"])
