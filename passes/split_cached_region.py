"""Lower the labelled graph into three straight-line graphs: prefix, region and tail.

Note [Why three graphs and no torch.cond]
A ``torch.cond`` on the reuse predicate would keep one graph, but graphs with ``cond`` bypass
inductor's FX graph cache, so every process would pay a full cold compile. Three straight-line
graphs each hit the cache, together hold exactly the nodes of the original graph (compile time
about that of plain inductor), and the runtime picks per call:

    cache step:  p = prefix(x);  b = region(x, p);  out = tail(x, p, b);  cache <- b
    reuse step:  p = prefix(x);                     out = tail(x, p, cache)

The cache write is the region graph's outputs, the cache read the tail graph's ``bd_cache_*``
inputs. Each graph's inputs are described by its ``Part.plan``, which the runtime gathers by.
"""

from __future__ import annotations

import copy
import itertools
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import _get_placeholder_expr, free_symbols

from passes.find_cached_region import PART_META, CachedRegion, RegionError, derived_from_inputs

#: The pools a split graph's inputs are gathered from, per call (``Part.plan``).
ARGS, PREFIX, CACHE = 0, 1, 2


@dataclass(frozen=True)
class Part:
    """One split graph, ready for the inner compiler and the runtime.

    ``plan[j] = (pool, index)``: input ``j`` is ``pools[pool][index]`` where the pools are the
    call's arguments (``ARGS``), the prefix graph's outputs (``PREFIX``) and the cached values
    (``CACHE``). ``example_inputs`` are what the inner compiler is given: the call's example
    tensors for arguments, fake values for the rest.
    """

    gm: fx.GraphModule
    plan: tuple[tuple[int, int], ...]
    example_inputs: tuple[Any, ...]
    #: per pool-size tuple: an ``itemgetter`` over the pools laid end to end
    _getters: dict[tuple[int, ...], Callable[[Sequence[Any]], tuple[Any, ...]]] = field(
        default_factory=dict, compare=False, repr=False
    )

    def gather(self, *pools: Sequence[Any]) -> tuple[Any, ...]:
        """The graph's inputs from the call's pools. Runs every call with hundreds of inputs
        (the parameters), so one C-level ``itemgetter`` does it (2.5x faster than a Python loop
        over 900 inputs)."""
        sizes = tuple(map(len, pools))
        getter = self._getters.get(sizes)
        if getter is None:
            starts = (0, *itertools.accumulate(sizes[:-1]))
            getter = self._getters[sizes] = _getter([starts[p] + i for p, i in self.plan])
        joined = tuple(pools[0])
        for pool in pools[1:]:
            joined += tuple(pool)  # tuples are what the runtime passes: no copies but this one
        return getter(joined)


def _getter(indices: list[int]) -> Callable[[Sequence[Any]], tuple[Any, ...]]:
    """``seq -> tuple(seq[i] for i in indices)`` (``itemgetter`` returns a bare item for one
    index and cannot take none)."""
    if not indices:
        return lambda seq: ()
    if len(indices) == 1:
        j = indices[0]
        return lambda seq: (seq[j],)
    return operator.itemgetter(*indices)


@dataclass(frozen=True)
class SplitGraphs:
    prefix: Part | None  #: ``None`` when nothing runs before the region
    region: Part
    tail: Part


def _build(
    gm: fx.GraphModule,
    part: str,
    locate: dict[fx.Node, tuple[int, int]],
    outputs: list[fx.Node] | None,
    example_inputs: Sequence[Any],
    memo: dict[fx.Node, bool],
) -> Part:
    """Copy the nodes of ``part`` into a new graph; inputs from ``locate``; outputs as given
    (``None``: the original graph's output node). Scalars derived from inputs are recomputed
    here instead of being passed in (Note [Symbolic scalars])."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    plan: list[tuple[int, int]] = []
    examples: list[Any] = []
    out_node = next(iter(reversed(gm.graph.nodes)))
    body = [n for n in gm.graph.nodes if n.meta.get(PART_META) == part]
    inside = set(body)
    needed: set[fx.Node] = set(outputs or ())
    stack = [
        a for n in body + ([] if outputs is not None else [out_node]) for a in n.all_input_nodes
    ]
    recomputed: set[fx.Node] = set()
    while stack:  # close over the input-derived scalars this part recomputes
        n = stack.pop()
        if n in inside or n in needed or n in recomputed:
            continue
        if n.op != "placeholder" and derived_from_inputs(n, memo):
            recomputed.add(n)
            stack.extend(n.all_input_nodes)
        else:
            needed.add(n)
    needed |= _symbol_sources(gm, needed - inside)  # Note [Compound sizes]
    for n in gm.graph.nodes:  # inputs in original graph order: deterministic graphs, warm caches
        if n in needed and n not in inside:
            pool, index = locate[n]
            p = graph.placeholder(f"bd_cache_{index}" if pool == CACHE else n.name)
            p.meta = copy.copy(n.meta)
            env[n] = p
            plan.append((pool, index))
            examples.append(example_inputs[index] if pool == ARGS else n.meta["example_value"])
    for n in gm.graph.nodes:
        if n in recomputed or n in inside:
            env[n] = graph.node_copy(n, lambda a: env[a])
    if outputs is None:
        graph.node_copy(out_node, lambda a: env[a])
    else:
        graph.output(tuple(env[n] for n in outputs))
    graph.eliminate_dead_code()
    graph.lint()
    return Part(fx.GraphModule(gm, graph, f"BlockDance_{part}"), tuple(plan), tuple(examples))


def _free_symbols(value: Any) -> set[sympy.Symbol]:
    """The symbols in a tensor's sizes and strides, or in a symbolic scalar."""
    if isinstance(value, torch.Tensor):
        return set().union(*(free_symbols(x) for x in (*value.shape, *value.stride())))
    return set(free_symbols(value)) if isinstance(value, torch.SymInt | torch.SymFloat) else set()


def _bound_symbols(value: Any) -> set[sympy.Expr]:
    """The symbols a compiled graph binds from this input by itself: a tensor size (or stride)
    that is one bare symbol, or a symbolic scalar's own symbol. A scalar binds the symbol it was
    created as, before Dynamo's replacements (``s67`` even where ``s67 == s37`` was learned):
    what inductor's wrapper binds (``_get_placeholder_expr``)."""
    if isinstance(value, torch.Tensor):
        sizes = (*value.shape, *value.stride())
        exprs = [e.node.expr for e in sizes if isinstance(e, torch.SymInt)]
    elif isinstance(value, torch.SymInt | torch.SymFloat):
        exprs = [_get_placeholder_expr(value.node)]
    else:
        exprs = []
    return {e for e in exprs if isinstance(e, sympy.Symbol)}


def _symbol_sources(gm: fx.GraphModule, inputs: set[fx.Node]) -> set[fx.Node]:
    """Graph inputs to add so that every symbol in ``inputs``' sizes can be bound.

    Note [Compound sizes]
    A value whose size is a product of symbols (QwenImage's RoPE table, ``(s10*s37, 8)``, made
    from the ``img_shapes`` ints) may cross into a part that sees neither factor; inductor binds
    symbols only from bare-symbol sizes and scalar inputs, and fails to codegen the product. As
    ``torch.fx.passes.split_module`` does, the part then also takes the original graph's input
    that defines each missing symbol (a symbolic scalar placeholder, or a tensor placeholder one
    of whose sizes is the bare symbol).
    """
    needed = set().union(*(_free_symbols(n.meta.get("example_value")) for n in inputs))
    missing = needed - set().union(*(_bound_symbols(n.meta.get("example_value")) for n in inputs))
    found: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if not missing:
            break
        if n.op == "placeholder":
            hit = _bound_symbols(n.meta.get("example_value")) & missing
            if hit:
                found.add(n)
                missing -= hit
    if missing:  # no input defines it alone: the inner compiler could not compile the part
        names = ", ".join(sorted(map(str, missing)))
        raise RegionError(
            f"a value passed between the split graphs has a dynamic size in {names}, which no "
            "input of the model defines on its own"
        )
    return found


def split_cached_region(
    gm: fx.GraphModule, region: CachedRegion, example_inputs: Sequence[Any]
) -> SplitGraphs:
    """Split a graph labelled by ``find_cached_region`` into prefix, region and tail graphs."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    locate: dict[fx.Node, tuple[int, int]] = {n: (ARGS, i) for i, n in enumerate(placeholders)}
    part = {n: n.meta.get(PART_META) for n in gm.graph.nodes}
    memo: dict[fx.Node, bool] = {}
    prefix_outputs = [
        n
        for n in gm.graph.nodes
        if part[n] == "prefix"
        and not derived_from_inputs(n, memo)
        and any(part[u] != "prefix" for u in n.users)
    ]
    locate.update({n: (PREFIX, i) for i, n in enumerate(prefix_outputs)})
    locate.update({n: (CACHE, i) for i, n in enumerate(region.boundary)})
    prefix = (
        _build(gm, "prefix", locate, prefix_outputs, example_inputs, memo)
        if prefix_outputs
        else None
    )
    return SplitGraphs(
        prefix,
        _build(gm, "region", locate, list(region.boundary), example_inputs, memo),
        _build(gm, "tail", locate, None, example_inputs, memo),
    )
