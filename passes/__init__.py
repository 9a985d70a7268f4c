"""FX passes of bd_compile, one per file; ``rewrite`` runs them in the order of ``PIPELINE``.

1. ``find_timestep_input``   which graph input is the timestep (none: fall back before any work)
2. ``tag_blocks``            find the transformer blocks, in execution order
3. ``find_cached_region``    label nodes prefix / region / tail; pick the values to cache
4. ``build_variants``        lower to one straight-line graph per call path (compute, reuse,
                             forecast, Ada's mixed rows; Note [One graph per call]), each with
                             its example inputs and the argument plan the runtime gathers by
5. ``outline_blocks``        (``compile_once``) call each block through a subgraph shared by
                             the blocks of its kind, so inductor compiles each kind once
                             (Note [Compile-once blocks])
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch.fx as fx

from passes.build_variants import (
    ARGS,
    CACHE,
    OLDER,
    OLDEST,
    ROWS,
    WEIGHTS,
    Part,
    Variants,
    build_variants,
)
from passes.find_cached_region import (
    CachedRegion,
    RegionError,
    default_cache_block,
    find_cached_region,
    resolve_cache_block,
)
from passes.find_timestep_input import find_timestep_input, user_input_name
from passes.outline_blocks import outline_blocks
from passes.tag_blocks import Block, find_blocks, tag_blocks

log = logging.getLogger(__name__)

PIPELINE = (find_timestep_input, tag_blocks, find_cached_region, build_variants, outline_blocks)


def outline_variants(variants: Variants) -> Variants:
    """Each variant with its blocks outlined, keeping the inline graph to fall back to. A
    graph the outlining fails on stays inline, with a warning: it never costs the rewrite."""
    parts: dict[str, Part] = {}
    for name in ("compute", "reuse", "forecast", "mixed"):
        part = variants.by_name(name)
        try:
            gm = outline_blocks(part.gm)
        except Exception as e:  # a graph shape the outlining did not foresee
            log.warning(
                "blockdance: could not compile the blocks of the %s graph once (%s: %s); "
                "compiling them inline",
                name,
                type(e).__name__,
                e,
            )
            gm = None
        parts[name] = part if gm is None else dataclasses.replace(part, gm=gm, inline=part.gm)
    return dataclasses.replace(
        variants,
        compute=parts["compute"],
        reuse=parts["reuse"],
        forecast=parts["forecast"],
        mixed=parts["mixed"],
    )


@dataclass(frozen=True)
class Rewritten:
    """What the pipeline made of one Dynamo graph."""

    timestep_index: int | None  #: placeholder index of the timestep; None: follows another graph
    input_names: tuple[str, ...]  #: the forward's argument name of every placeholder
    region: CachedRegion
    variants: Variants


def rewrite(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    *,
    timestep_input: str | None = None,
    require_timestep: bool = True,
    cache_block: int | None = None,
    calibrated_for: int | None = None,
    compile_once: bool = False,
) -> Rewritten:
    """Run ``PIPELINE`` on ``gm``. Raises ``RegionError`` (with a reason in words) when the graph
    can't be rewritten; ``gm`` itself is only annotated (node.meta), never changed. With
    ``compile_once`` each variant's blocks are outlined (Note [Compile-once blocks])."""
    try:
        timestep_index: int | None = find_timestep_input(gm, timestep_input)
    except RegionError:
        if require_timestep:
            raise
        timestep_index = None
    blocks = tag_blocks(gm)
    region = find_cached_region(gm, blocks, cache_block, calibrated_for)
    variants = build_variants(gm, region, example_inputs)
    if compile_once:
        variants = outline_variants(variants)
    names = tuple(user_input_name(n) for n in gm.graph.nodes if n.op == "placeholder")
    return Rewritten(timestep_index, names, region, variants)


__all__ = [
    "ARGS",
    "CACHE",
    "PIPELINE",
    "OLDER",
    "OLDEST",
    "Block",
    "CachedRegion",
    "Part",
    "ROWS",
    "RegionError",
    "Rewritten",
    "Variants",
    "WEIGHTS",
    "build_variants",
    "default_cache_block",
    "find_blocks",
    "find_cached_region",
    "find_timestep_input",
    "outline_blocks",
    "outline_variants",
    "resolve_cache_block",
    "rewrite",
    "tag_blocks",
]
