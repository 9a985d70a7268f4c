"""The ``blockdance`` torch.compile backend: parse options, run the passes, compile the parts.

Thin by design: settings -> ``passes.PIPELINE`` -> inner compiler per part -> runtime. A graph
the passes cannot handle goes to the inner compiler unchanged with one warning (or raises
``BlockDanceError`` under ``strict``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch._dynamo.utils import counters

from bd_compile import settings as settings_mod
from bd_compile.runtime import BlockDanceRuntime, CachedValue, CompiledFn, Layout
from bd_compile.settings import Settings, default_cache_block
from passes import Block, RegionError, rewrite

log = logging.getLogger(__name__)

TIMESTEP_NAMES = ("timestep", "timesteps", "t", "time", "sigma", "sigmas")


class BlockDanceError(RuntimeError):
    """Raised under ``strict=True`` when a graph cannot be rewritten."""


def resolve_inner(name: str) -> Callable[[fx.GraphModule, list[Any]], CompiledFn]:
    """The inner compiler: inductor (imported lazily) or any registered Dynamo backend."""
    if name == "inductor":
        from torch._inductor.compile_fx import compile_fx

        return compile_fx  # type: ignore[return-value]
    from torch._dynamo.backends.registry import lookup_backend

    try:
        return lookup_backend(name)  # type: ignore[return-value]
    except Exception as e:  # torch raises InvalidBackend
        raise ValueError(
            f"blockdance option 'inner': expected a registered backend name, got {name!r}"
        ) from e


def _arg_name(placeholder: fx.Node) -> str:
    name = placeholder.name.lower()
    name = re.sub(r"^l_(kwargs_)?", "", name)
    return name.rstrip("_")


def find_timestep_input(gm: fx.GraphModule, requested: str | None) -> int:
    """Index of the placeholder that carries the timestep."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    wanted = (requested.lower(),) if requested else TIMESTEP_NAMES
    for want in wanted:
        for i, n in enumerate(placeholders):
            if _arg_name(n) == want:
                return i
    user = [n.name for n in placeholders if not n.name.lower().startswith("l_self_")]
    raise RegionError(
        f"no timestep input: expected a graph input named one of {list(wanted)}, got inputs "
        f"{user}; pass options={{'timestep_input': <argument name>}}"
    )


def apply_calibration(s: Settings) -> tuple[Settings, int | None]:
    """Settings with a calibration file's ``cache_block`` and ``window``, and the block count the
    calibration was made for (``None`` without a calibration). Explicit ``cache_block`` wins."""
    if s.calibration is None:
        return s, None
    from bd_compile.calibration import load_calibration

    cal = load_calibration(s.calibration)
    cache_block = s.cache_block if s.cache_block is not None else cal.cache_block
    return s.replace(cache_block=cache_block, window=cal.window, calibration=None), cal.num_blocks


def build_runtime(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    s: Settings,
    inner: Callable[[fx.GraphModule, list[Any]], CompiledFn],
    calibrated_blocks: int | None = None,
) -> BlockDanceRuntime:
    """Run the pass pipeline on ``gm`` and compile its three parts with ``inner``."""

    def choose_cache_block(blocks: list[Block]) -> int:
        if calibrated_blocks is not None and calibrated_blocks != len(blocks):
            raise RegionError(
                f"the calibration is for a model of {calibrated_blocks} blocks, this graph has "
                f"{len(blocks)}"
            )
        if len(blocks) < 2:
            raise RegionError(
                f"expected at least 2 transformer blocks in the graph, found {len(blocks)}"
            )
        return s.cache_block if s.cache_block is not None else default_cache_block(len(blocks))

    region, split = rewrite(gm, choose_cache_block)
    blocks, cache_block = region.blocks, region.cache_block
    timestep_index = find_timestep_input(gm, s.timestep_input)

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    prefix_values = {("prefix", i): n for i, n in enumerate(split.prefix_outputs)}
    cache_values = {("cache", i): n for i, n in enumerate(split.boundary)}

    def examples(spec: Sequence[tuple[str, int]]) -> list[Any]:
        out = []
        for src, i in spec:
            if src == "arg":
                out.append(example_inputs[i])
            else:
                node = (prefix_values if src == "prefix" else cache_values)[(src, i)]
                out.append(node.meta["example_value"])
        return out

    prefix_fn = (
        inner(split.prefix, examples(split.prefix_inputs.sources)) if split.prefix_outputs else None
    )
    region_fn = inner(split.region, examples(split.region_inputs.sources))
    tail_fn = inner(split.tail, examples(split.tail_inputs.sources))

    signature = [
        i
        for i, x in enumerate(example_inputs)
        if not isinstance(x, torch.nn.Parameter) and not placeholders[i].name.startswith("l_self_")
    ]
    params = frozenset(id(x) for x in example_inputs if isinstance(x, torch.nn.Parameter))
    layout = Layout(
        blocks=[(b.name, b.cls) for b in blocks],
        cache_block=cache_block,
        cached=[
            CachedValue(n.name, tuple(n.meta["example_value"].shape), n.meta["example_value"].dtype)
            for n in split.boundary
        ],
        timestep_input=placeholders[timestep_index].name,
        inner=s.inner,
    )
    return BlockDanceRuntime(
        split,
        (prefix_fn, region_fn, tail_fn),
        s,
        timestep_index,
        signature,
        params,
        layout,
    )


def compile_graph(gm: fx.GraphModule, example_inputs: Sequence[Any], s: Settings) -> CompiledFn:
    """Rewrite and compile one Dynamo graph; fall back to the inner compiler if it can't."""
    s, calibrated_blocks = apply_calibration(s)
    inner = resolve_inner(s.inner)
    try:
        runtime = build_runtime(gm, example_inputs, s, inner, calibrated_blocks)
    except Exception as e:
        if s.strict:
            raise BlockDanceError(f"blockdance could not rewrite the graph: {e}") from e
        counters["blockdance"]["fallbacks"] += 1
        log.warning(
            "blockdance: graph left uncached (%s); compiling it with %r unchanged", e, s.inner
        )
        return inner(gm, list(example_inputs))
    counters["blockdance"]["graphs_rewritten"] += 1
    log.info(
        "blockdance: %d blocks, caching 0..%d (%s), %d cached value(s); schedule: %s",
        len(runtime.layout.blocks),
        runtime.layout.cache_block,
        runtime.layout.blocks[runtime.layout.cache_block][0],
        len(runtime.layout.cached),
        runtime.schedule.describe(),
    )
    return runtime


def blockdance_backend(
    gm: fx.GraphModule,
    example_inputs: list[Any],
    options: dict[str, Any] | None = None,
    mode: str | None = None,
    **kwargs: Any,
) -> CompiledFn:
    """``torch.compile(model, backend="blockdance", options={...})``."""
    if mode not in (None, "default"):
        raise ValueError(
            f"blockdance: expected mode=None or 'default' (no inner modes), got {mode!r}"
        )
    return compile_graph(gm, example_inputs, settings_mod.from_options(options))
