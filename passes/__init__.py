"""FX passes of bd_compile, one per file, run in the order of ``PIPELINE``.

1. ``tag_blocks``            find the transformer blocks, in execution order
2. ``find_cached_region``    label nodes prefix / region / tail; pick the values to cache
3. ``split_cached_region``   lower to three straight-line graphs (Note [Why three graphs])
"""

from passes.find_cached_region import CachedRegion, RegionError, find_cached_region
from passes.split_cached_region import SplitGraphs, split_cached_region
from passes.tag_blocks import Block, find_blocks, tag_blocks

PIPELINE = ("tag_blocks", "find_cached_region", "split_cached_region")

__all__ = [
    "PIPELINE",
    "Block",
    "CachedRegion",
    "RegionError",
    "SplitGraphs",
    "find_blocks",
    "find_cached_region",
    "split_cached_region",
    "tag_blocks",
]
