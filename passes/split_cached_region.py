"""Lower the labelled graph into three straight-line graphs: prefix, region and tail.

Note [Why three graphs and no torch.cond]
A ``torch.cond`` on the reuse predicate would keep one graph, but graphs with ``cond`` bypass
inductor's FX graph cache, so every process would pay a full cold compile. Three straight-line
graphs each hit the cache, together hold exactly the nodes of the original graph (compile time
about that of plain inductor), and the runtime picks per call:

    cache step:  p = prefix(x);  b = region(x, p);  out = tail(x, p, b);  cache <- b
    reuse step:  p = prefix(x);                     out = tail(x, p, cache)

The cache write is the region graph's outputs, the cache read the tail graph's ``bd_cache_*``
inputs. Each graph's inputs are described by an ``InputSpec`` the runtime gathers from.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch.fx as fx

from passes.find_cached_region import PART_META, CachedRegion

Source = Literal["arg", "prefix", "cache"]


@dataclass(frozen=True)
class InputSpec:
    """Where each input of a split graph comes from: (source, index) pairs."""

    sources: tuple[tuple[Source, int], ...]


@dataclass(frozen=True)
class SplitGraphs:
    prefix: fx.GraphModule
    region: fx.GraphModule
    tail: fx.GraphModule
    prefix_inputs: InputSpec
    region_inputs: InputSpec
    tail_inputs: InputSpec
    prefix_outputs: tuple[fx.Node, ...]  # nodes of the original graph
    boundary: tuple[fx.Node, ...]


def _build(
    gm: fx.GraphModule,
    part: str,
    locate: dict[fx.Node, tuple[Source, int]],
    outputs: list[fx.Node] | None,
) -> tuple[fx.GraphModule, InputSpec]:
    """Copy the nodes of ``part`` into a new graph; inputs from ``locate``; outputs as given
    (``None``: the original graph's output node)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    sources: list[tuple[Source, int]] = []
    body = [n for n in gm.graph.nodes if n.meta.get(PART_META) == part]
    needed = {
        a
        for n in body + ([] if outputs is not None else [next(iter(reversed(gm.graph.nodes)))])
        for a in n.all_input_nodes
    } | set(outputs or ())
    for n in gm.graph.nodes:  # inputs in original graph order: deterministic graphs, warm caches
        if n in needed and n.meta.get(PART_META) != part:
            src = locate[n]
            name = f"bd_cache_{src[1]}" if src[0] == "cache" else n.name
            p = graph.placeholder(name)
            p.meta = copy.copy(n.meta)
            env[n] = p
            sources.append(src)
    for n in body:
        env[n] = graph.node_copy(n, lambda a: env[a])
    if outputs is None:
        out = next(iter(reversed(gm.graph.nodes)))
        graph.node_copy(out, lambda a: env[a])
    else:
        graph.output(tuple(env[n] for n in outputs))
    graph.eliminate_dead_code()
    graph.lint()
    return fx.GraphModule(gm, graph, f"BlockDance_{part}"), InputSpec(tuple(sources))


def split_cached_region(gm: fx.GraphModule, region: CachedRegion) -> SplitGraphs:
    """Split a graph labelled by ``find_cached_region`` into prefix, region and tail graphs."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    locate: dict[fx.Node, tuple[Source, int]] = {n: ("arg", i) for i, n in enumerate(placeholders)}
    part = {n: n.meta.get(PART_META) for n in gm.graph.nodes}
    prefix_outputs = [
        n
        for n in gm.graph.nodes
        if part[n] == "prefix" and any(part[u] != "prefix" for u in n.users)
    ]
    locate.update({n: ("prefix", i) for i, n in enumerate(prefix_outputs)})
    locate.update({n: ("cache", i) for i, n in enumerate(region.boundary)})
    prefix, prefix_in = _build(gm, "prefix", locate, prefix_outputs)
    region_gm, region_in = _build(gm, "region", locate, list(region.boundary))
    tail, tail_in = _build(gm, "tail", locate, None)
    return SplitGraphs(
        prefix,
        region_gm,
        tail,
        prefix_in,
        region_in,
        tail_in,
        tuple(prefix_outputs),
        region.boundary,
    )
