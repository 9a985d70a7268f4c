"""Start inductor's one-time C++ toolchain probes while Dynamo traces.

Note [Toolchain warm-up]
~~~~~~~~~~~~~~~~~~~~~~~~
The first time a process generates a CPU kernel, inductor probes which vector ISAs the compiler
and the CPU support (``torch._inductor.cpu_vec_isa.valid_vec_isa_list``): it builds and loads one
test library per ISA, ~7 s of g++ on the 2-core machine with an empty inductor cache
(``benchmarks/cold_compile.py``), in the main thread, after Dynamo's trace, AOT tracing and our
passes, while the second core idles. A whole-model trace takes several seconds (blockdance traces
every block; regional compilation traces one), so this module runs the probes on a background
thread from the moment Dynamo starts compiling a frame for the blockdance backend. The ISA list
is ``functools.cache``d and each probe holds a file lock on its output, so when inductor asks for
it, the answer is there or the build it waits for is already running (none is built twice).

When: only for a compile whose backend is blockdance with ``inner="inductor"`` and no ``cpp.*``
inductor options (those change what the probes answer), of a model or function whose first
tensor is on the CPU, once per process, never when the list is already known, and not when
inductor's own early-warming switch is off (``TORCH_WARM_POOL=0``). The hook is a Dynamo
compile-start callback installed when ``bd_compile`` is imported (``torch._dynamo.reset()``
clears such callbacks; :func:`install` puts it back). It never raises into Dynamo.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import types
from collections.abc import Callable
from typing import Any

import torch
from torch._dynamo.callback import CallbackArgs, callback_handler
from torch._dynamo.utils import counters

from bd_compile.settings import Settings

log = logging.getLogger(__name__)

_started = threading.Event()
_backends: list[Callable[..., Any]] = []  # the backend functions whose compiles warm up


def probe_toolchain() -> None:
    """What the background thread runs: the probes inductor would run at its first CPU kernel."""
    from torch._inductor.cpu_vec_isa import valid_vec_isa_list

    valid_vec_isa_list()


def _run() -> None:
    try:
        probe_toolchain()
        log.debug("blockdance: C++ toolchain probes done")
    except Exception:  # inductor runs them again itself and reports what failed
        log.debug("blockdance: C++ toolchain probes failed", exc_info=True)


def _first_tensor(values: Any) -> torch.Tensor | None:
    for v in values:
        if isinstance(v, torch.Tensor):
            return v
        if isinstance(v, torch.nn.Module):
            t: torch.Tensor | None = next(iter(v.parameters()), None)
            if t is None:
                t = next(iter(v.buffers()), None)
            if t is not None:
                return t
    return None


def _blockdance_compile(frame: types.FrameType | None) -> tuple[dict[str, Any], Any] | None:
    """The blockdance options and the frame being compiled, if Dynamo's ``ConvertFrameAssert``
    on the stack compiles for blockdance; else ``None``."""
    while frame is not None:
        converter = frame.f_locals.get("self")
        backend = getattr(converter, "_torchdynamo_orig_backend", None)
        if backend is not None and "frame" in frame.f_locals:
            if getattr(backend, "compiler_fn", backend) not in _backends:
                return None
            kwargs = getattr(backend, "kwargs", None) or {}
            return dict(kwargs.get("options") or {}), frame.f_locals["frame"]
        frame = frame.f_back
    return None


def isa_list_known() -> bool:
    """Whether this process has probed already (or the user's config answers the question)."""
    from torch._inductor import config
    from torch._inductor.cpu_vec_isa import valid_vec_isa_list

    return config.cpp.vec_isa_ok is not None or valid_vec_isa_list.cache_info().currsize > 0


def _wants_probes(options: dict[str, Any], compiled: Any) -> bool:
    if options.get("inner", Settings.inner) != "inductor":
        return False
    inner_options = options.get("inner_options") or {}
    if not isinstance(inner_options, dict) or any(str(k).startswith("cpp.") for k in inner_options):
        return False
    if isa_list_known():
        return False
    first = _first_tensor(getattr(compiled, "f_locals", {}).values())
    return first is not None and first.device.type == "cpu"


def _on_compile_start(args: CallbackArgs) -> None:
    if _started.is_set() or os.environ.get("TORCH_WARM_POOL", "1") != "1":
        return
    try:
        found = _blockdance_compile(sys._getframe(1))
        if found is None or not _wants_probes(*found):
            return
        # What the probes import, imported here: two threads importing the same modules can
        # meet in Python's import locks (inductor imports them for its first kernel anyway).
        import torch._inductor.codecache
        import torch._inductor.cpp_builder
        import torch.utils._filelock  # noqa: F401
    except Exception:  # a hook must not break a compile
        log.debug("blockdance: toolchain warm-up check failed", exc_info=True)
        return
    _started.set()
    counters["blockdance"]["toolchain_warmups"] += 1
    log.debug("blockdance: probing the C++ toolchain while Dynamo traces (compile %s)", args)
    threading.Thread(target=_run, name="blockdance-toolchain-warmup", daemon=True).start()


def install(backend: Callable[..., Any]) -> None:
    """Warm up for compiles whose backend is ``backend`` (idempotent)."""
    if backend not in _backends:
        _backends.append(backend)
    if _on_compile_start not in callback_handler.start_callbacks:
        callback_handler.register_start_callback(_on_compile_start)
