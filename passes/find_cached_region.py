"""Decide which nodes a reuse step skips, and which values it must read from the cache.

Given the tagged blocks and ``cache_block = i``, every compute node gets
``node.meta["blockdance_part"]``:

- ``region``: the nodes of blocks ``0..i``; the glue between them that depends on them (Latte's
  reshapes between spatial and temporal blocks, Flux's concat between its two lists); and the
  producers whose every user is in the region (the patch embedding feeding only block 0), since
  a reuse step would compute them for nothing.
- ``prefix``: the rest before block ``i`` ends (timestep, caption and RoPE embeddings): it runs
  every step, so the blocks after the region see the *current* conditioning.
- ``tail``: everything after block ``i``.

The cached values are the region's nodes that are used outside it: one tensor for PixArt/DiT,
two for SD3/Flux/CogVideoX, plus any long skip connection out of the region.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.fx as fx

from passes.tag_blocks import Block

log = logging.getLogger(__name__)

PART_META = "blockdance_part"


class RegionError(RuntimeError):
    """The graph has blocks, but no region this pass can cache."""


@dataclass(frozen=True)
class CachedRegion:
    blocks: tuple[Block, ...]
    cache_block: int
    boundary: tuple[fx.Node, ...]

    @property
    def cached_blocks(self) -> tuple[Block, ...]:
        return self.blocks[: self.cache_block + 1]


def find_cached_region(gm: fx.GraphModule, blocks: list[Block], cache_block: int) -> CachedRegion:
    """Label every compute node prefix/region/tail and return the values to cache."""
    if not blocks:
        raise RegionError("no transformer blocks found in the graph")
    if not 0 <= cache_block < len(blocks) - 1:
        raise RegionError(
            f"cache_block must leave at least one block to recompute: expected 0 <= cache_block "
            f"<= {len(blocks) - 2} for {len(blocks)} blocks, got {cache_block}"
        )
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    members = {n for b in blocks[: cache_block + 1] for n in b.nodes}
    first, last = min(order[n] for n in members), max(order[n] for n in members)

    region: set[fx.Node] = set()
    for n in nodes[first : last + 1]:
        if n.op in ("placeholder", "output"):
            continue
        if n in members or any(a in region for a in n.all_input_nodes):
            region.add(n)
    # Producers used only by the region (patch embedding) are skipped with it.
    for n in reversed(nodes[:first]):
        if n.op != "placeholder" and n.users and all(u in region for u in n.users):
            region.add(n)

    boundary = tuple(n for n in nodes if n in region and any(u not in region for u in n.users))
    if not boundary:
        raise RegionError("the cached blocks' outputs are not used by the rest of the graph")
    for n in boundary:
        if not isinstance(n.meta.get("example_value"), torch.Tensor):
            raise RegionError(
                f"value {n.name} leaves the cached blocks but is not a tensor "
                f"({type(n.meta.get('example_value')).__name__}); cannot cache it"
            )
    for n in nodes:
        if n.op in ("placeholder", "output"):
            continue
        n.meta[PART_META] = "region" if n in region else "prefix" if order[n] < last else "tail"
    log.debug(
        "blockdance: caching blocks 0..%d (%s), boundary %s",
        cache_block,
        blocks[cache_block].name,
        [n.name for n in boundary],
    )
    return CachedRegion(tuple(blocks), cache_block, boundary)
