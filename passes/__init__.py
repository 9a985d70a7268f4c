"""FX passes of bd_compile, one per file; ``rewrite`` runs them in the order of ``PIPELINE``.

1. ``find_timestep_input``   which graph input is the timestep (none: fall back before any work)
2. ``tag_blocks``            find the transformer blocks, in execution order
3. ``find_cached_region``    label nodes prefix / region / tail; pick the values to cache
4. ``build_variants``        lower to one straight-line graph per call path (compute, reuse,
                             forecast, Ada's mixed rows; Note [One graph per call]), each with
                             its example inputs and the argument plan the runtime gathers by
"""

from __future__ import annotations

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
from passes.tag_blocks import Block, find_blocks, tag_blocks

PIPELINE = (find_timestep_input, tag_blocks, find_cached_region, build_variants)


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
) -> Rewritten:
    """Run ``PIPELINE`` on ``gm``. Raises ``RegionError`` (with a reason in words) when the graph
    can't be rewritten; ``gm`` itself is only annotated (node.meta), never changed."""
    try:
        timestep_index: int | None = find_timestep_input(gm, timestep_input)
    except RegionError:
        if require_timestep:
            raise
        timestep_index = None
    blocks = tag_blocks(gm)
    region = find_cached_region(gm, blocks, cache_block, calibrated_for)
    variants = build_variants(gm, region, example_inputs)
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
    "resolve_cache_block",
    "rewrite",
    "tag_blocks",
]
