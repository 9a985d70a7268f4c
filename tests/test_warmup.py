"""Note [Toolchain warm-up]: which compiles start inductor's C++ toolchain probes early.

The probes themselves are replaced by a recorder (they are inductor's, ~7 s of g++ cold); what
is pinned is when blockdance starts them: at the start of a compile for blockdance with inner
inductor on a CPU model, once per process, never for another backend or device, never raising.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch._dynamo.utils import counters

from bd_compile import blockdance_backend, warmup


class _Probes:
    def __init__(self) -> None:
        self.threads: list[str] = []
        self.done = threading.Event()

    def __call__(self) -> None:
        self.threads.append(threading.current_thread().name)
        self.done.set()


@pytest.fixture
def probes(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Probes]:
    """A recorder in place of the probes, a process that has not probed yet, the hook on."""
    recorder = _Probes()
    monkeypatch.setattr(warmup, "probe_toolchain", recorder)
    monkeypatch.setattr(warmup, "isa_list_known", lambda: False)
    monkeypatch.delenv("TORCH_WARM_POOL", raising=False)
    warmup._started.clear()
    warmup.install(blockdance_backend)  # the autouse torch._dynamo.reset() cleared it
    yield recorder
    warmup._started.clear()


def _compile_and_run(backend: str, options: dict[str, Any] | None = None, device: str = "cpu"):
    model = torch.nn.Linear(4, 4, device=device)
    compiled = torch.compile(model, backend=backend, options=options)
    return compiled(torch.randn(2, 4, device=device))


def _started_probes(probes: _Probes) -> bool:
    return probes.done.wait(timeout=10) and counters["blockdance"]["toolchain_warmups"] == 1


def test_blockdance_compile_probes_on_a_background_thread(probes: _Probes) -> None:
    _compile_and_run("blockdance", {"inner": "inductor"})
    assert _started_probes(probes)
    assert probes.threads == ["blockdance-toolchain-warmup"]


def test_probes_start_once_per_process(probes: _Probes) -> None:
    _compile_and_run("blockdance")
    assert _started_probes(probes)
    torch._dynamo.reset()
    warmup.install(blockdance_backend)
    _compile_and_run("blockdance")
    assert counters["blockdance"]["toolchain_warmups"] == 1
    assert len(probes.threads) == 1


@pytest.mark.parametrize(
    ("backend", "options"),
    [
        ("eager", None),  # not ours
        ("blockdance", {"inner": "aot_eager"}),  # no C++ kernels
        ("blockdance", {"inner_options": {"cpp.simdlen": 0}}),  # changes what the probes answer
    ],
)
def test_other_compiles_do_not_probe(
    probes: _Probes, backend: str, options: dict[str, Any] | None
) -> None:
    _compile_and_run(backend, options)
    assert not probes.done.wait(timeout=0.5)
    assert counters["blockdance"]["toolchain_warmups"] == 0


def test_a_model_off_the_cpu_does_not_probe(probes: _Probes) -> None:
    class Frame:
        def __init__(self, device: str) -> None:
            self.f_locals = {"self": torch.nn.Linear(2, 2, device=device), "x": 1}

    assert warmup._wants_probes({}, Frame("cpu"))
    assert not warmup._wants_probes({}, Frame("meta"))


def test_inductor_switch_turns_it_off(probes: _Probes, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_WARM_POOL", "0")
    _compile_and_run("blockdance")
    assert not probes.done.wait(timeout=0.5)


def test_known_isa_list_is_not_probed_again(
    probes: _Probes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(warmup, "isa_list_known", lambda: True)
    _compile_and_run("blockdance")
    assert not probes.done.wait(timeout=0.5)


def test_a_failing_check_never_breaks_the_compile(
    probes: _Probes, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any) -> None:
        raise RuntimeError("planted")

    monkeypatch.setattr(warmup, "_blockdance_compile", broken)
    out = _compile_and_run("blockdance", {"inner": "aot_eager"})
    assert out.shape == (2, 4)
    assert counters["blockdance"]["toolchain_warmups"] == 0
