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

Note [Symbolic scalars]
With dynamic shapes (``dynamic=True``, or Dynamo's automatic dynamic after a second
resolution) the graph computes sizes (``s0 // 2``) and reads float attributes (``eps.item()``)
as SymInt/SymFloat nodes, interleaved with the blocks. A scalar computed from graph inputs only
(``derived_from_inputs``) is never cached: every graph that
needs it recomputes it from its own inputs (``build_variants``), so it always matches the
current call. Other scalars leaving the region (a size of a tensor inside it) are cached as
plain numbers next to the tensors; the runtime's signature check (concrete input shapes per
call) guarantees they are the ones this call would compute.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.fx as fx

from passes.tag_blocks import BLOCK_META, Block

log = logging.getLogger(__name__)

PART_META = "blockdance_part"

# Note [Default cache block]
# The paper skips blocks 0..20 of 28 (75% of depth) on reuse steps. For a model with n blocks
# the default ``cache_block`` is round(0.75 * n) - 1, so 28 -> 20, 12 -> 8, 4 -> 2.
DEFAULT_DEPTH_FRACTION = 0.75


class RegionError(RuntimeError):
    """The graph has blocks, but no region this pass can cache."""


def default_cache_block(num_blocks: int) -> int:
    """Last skipped block for ``num_blocks`` blocks (Note [Default cache block])."""
    return max(0, min(num_blocks - 2, round(DEFAULT_DEPTH_FRACTION * num_blocks) - 1))


def resolve_cache_block(
    num_blocks: int, requested: int | None, calibrated_for: int | None = None
) -> int:
    """The ``cache_block`` to use for a graph of ``num_blocks`` blocks: every check in one place.

    ``requested`` is the user's (or the calibration's) choice, ``None`` for the default;
    ``calibrated_for`` the block count a calibration file was made for. Raises ``RegionError``
    (the graph falls back) when no valid choice exists.
    """
    if calibrated_for is not None and calibrated_for != num_blocks:
        raise RegionError(
            f"the calibration is for a model of {calibrated_for} blocks, this graph has "
            f"{num_blocks}"
        )
    if num_blocks < 2:
        raise RegionError(
            f"expected at least 2 transformer blocks in the graph, found {num_blocks}"
        )
    cache_block = default_cache_block(num_blocks) if requested is None else requested
    if not 0 <= cache_block <= num_blocks - 2:
        raise RegionError(
            f"cache_block must leave at least one block to recompute: expected 0 <= cache_block "
            f"<= {num_blocks - 2} for {num_blocks} blocks, got {cache_block}"
        )
    return cache_block


def is_tensor_node(n: fx.Node) -> bool:
    return isinstance(n.meta.get("example_value"), torch.Tensor)


def derived_from_inputs(n: fx.Node, memo: dict[fx.Node, bool]) -> bool:
    """Whether ``n`` is a non-tensor value computed from graph inputs only (Note [Symbolic
    scalars]): a size of an input, a float attribute's ``item()``, arithmetic on them."""
    if n in memo:
        return memo[n]
    if n.op == "placeholder":
        result = True
    elif n.op in ("output", "get_attr") or is_tensor_node(n):
        result = False
    else:
        result = all(derived_from_inputs(a, memo) for a in n.all_input_nodes)
    memo[n] = result
    return result


@dataclass(frozen=True)
class CachedRegion:
    blocks: tuple[Block, ...]
    cache_block: int
    #: the region's values used after it, in graph order: what a cache step stores
    boundary: tuple[fx.Node, ...]
    #: for each boundary value, where it comes from in words ("transformer_blocks.8 output")
    descriptions: tuple[str, ...]

    @property
    def cached_blocks(self) -> tuple[Block, ...]:
        return self.blocks[: self.cache_block + 1]


def describe(n: fx.Node, blocks: tuple[Block, ...] | list[Block]) -> str:
    """A cached value in the user's terms: the block it comes out of, not an FX node name."""
    seen: set[fx.Node] = set()
    frontier, hops = [n], 0
    while frontier:
        for m in frontier:
            k = m.meta.get(BLOCK_META)
            if k is not None:
                suffix = "" if hops == 0 else f" (after {n.name})"
                kind = "output" if is_tensor_node(n) else "size"
                return f"{blocks[k].name} {kind}{suffix}"
        seen.update(frontier)
        frontier = [a for m in frontier for a in m.all_input_nodes if a not in seen]
        hops += 1
    return n.name


def find_cached_region(
    gm: fx.GraphModule,
    blocks: list[Block],
    cache_block: int | None = None,
    calibrated_for: int | None = None,
) -> CachedRegion:
    """Label every compute node prefix/region/tail and return the values to cache.

    ``cache_block`` and ``calibrated_for`` as in ``resolve_cache_block``.
    """
    cache_block = resolve_cache_block(len(blocks), cache_block, calibrated_for)
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

    memo: dict[fx.Node, bool] = {}
    boundary = tuple(
        n
        for n in nodes
        if n in region
        and any(u not in region for u in n.users)
        and not derived_from_inputs(n, memo)
    )
    if not any(is_tensor_node(n) for n in boundary):
        raise RegionError("the cached blocks' outputs are not used by the rest of the graph")
    for n in boundary:
        value = n.meta.get("example_value")
        if not isinstance(value, (torch.Tensor, torch.SymInt, torch.SymFloat, int, float)):
            raise RegionError(
                f"a value computed inside the cached blocks ({describe(n, blocks)}) is used "
                f"after them but is a {type(value).__name__}, not a tensor or a number; "
                "blockdance cannot cache it"
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
    descriptions = tuple(describe(n, blocks) for n in boundary)
    return CachedRegion(tuple(blocks), cache_block, boundary, descriptions)
