"""bd_compile: BlockDance feature caching for Diffusion Transformers as a torch.compile backend.

``torch.compile(transformer, backend="blockdance")`` works after ``pip install`` without an
import (entry point ``torch_dynamo_backends``); importing this package registers it too.
"""

from __future__ import annotations

from bd_compile.api import (
    GraphStats,
    Stats,
    explain,
    generation,
    plan,
    reset,
    runtimes_of,
    set_schedule,
    stats,
)
from bd_compile.backend import BlockDanceError, blockdance_backend, build_runtime, compile_graph
from bd_compile.deploy import ExportedModel, export, load
from bd_compile.keys import GenerationStats
from bd_compile.schedule import make_schedule, paper_rule
from bd_compile.settings import Settings, from_options
from passes import default_cache_block


def _register() -> None:
    """Register the backend unless the entry point did or is about to.

    ``lookup_backend`` imports this package while loading the ``torch_dynamo_backends`` entry
    point and registers the loaded function itself; registering here too would raise
    "duplicate name". So register only when no entry point is known for the name.
    """
    from torch._dynamo.backends.registry import _BACKENDS, _COMPILER_FNS, register_backend

    if "blockdance" not in _COMPILER_FNS and _BACKENDS.get("blockdance") is None:
        register_backend(compiler_fn=blockdance_backend, name="blockdance")


_register()

__all__ = [
    "BlockDanceError",
    "ExportedModel",
    "GenerationStats",
    "GraphStats",
    "Settings",
    "Stats",
    "blockdance_backend",
    "build_runtime",
    "compile_graph",
    "default_cache_block",
    "explain",
    "export",
    "from_options",
    "generation",
    "load",
    "make_schedule",
    "paper_rule",
    "plan",
    "reset",
    "runtimes_of",
    "set_schedule",
    "stats",
]
