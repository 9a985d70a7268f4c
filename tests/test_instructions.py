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
    )


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
