"""FX passes of bd_compile, one per file; ``rewrite`` runs them in order.

1. ``tag_blocks``            find the transformer blocks, in execution order
2. ``find_cached_region``    label nodes prefix / region / tail; pick the values to cache
3. ``split_cached_region``   lower to three straight-line graphs (Note [Why three graphs])
"""

from collections.abc import Callable

import torch.fx as fx

from passes.find_cached_region import CachedRegion, RegionError, find_cached_region
from passes.split_cached_region import SplitGraphs, split_cached_region
from passes.tag_blocks import Block, find_blocks, tag_blocks


def rewrite(
    gm: fx.GraphModule, choose_cache_block: Callable[[list[Block]], int]
) -> tuple[CachedRegion, SplitGraphs]:
    """The pipeline: tag the blocks, let the caller pick ``cache_block`` from them (it may raise
    ``RegionError``), find the region and split ``gm`` into its three graphs."""
    blocks = tag_blocks(gm)
    region = find_cached_region(gm, blocks, choose_cache_block(blocks))
    return region, split_cached_region(gm, region)


__all__ = [
    "Block",
    "CachedRegion",
    "RegionError",
    "SplitGraphs",
    "find_blocks",
    "find_cached_region",
    "rewrite",
    "split_cached_region",
    "tag_blocks",
]
