"""Lower the labelled graph into the straight-line graphs a call runs: one graph per call.

Note [One graph per call]
Every call runs exactly one compiled graph, chosen by the runtime:

    cache step:   out, cached = compute(x)                    the whole forward, also returning
                                                              the cached values
    reuse step:   out = reuse(x, cached)                      prefix + tail, the cached values
                                                              as inputs
    forecast:     out = forecast(x, oldest, older, last, w)   reuse with the extrapolation
                                                              sum_i w_i * h_i inside
    Ada, mixed:   out, cached = mixed(x, rows, old)           compute that takes the old cache
                                                              for the rows that reuse

So inductor fuses across what would be part boundaries, a CUDA graph replays one graph per call,
and the cache crosses only as an input. The cached values are the region's outputs used after it
(``CachedRegion.boundary``); in ``reuse`` they are ``bd_cache_*`` placeholders.

Why not ``torch.cond`` on the reuse predicate in one graph: graphs with ``cond`` bypass
inductor's FX graph cache, so every process would pay a full cold compile. Each variant here is a
plain graph that hits the cache.

Each variant's inputs are described by its ``Part.plan``: ``(pool, index)`` pairs over the pools
the runtime passes (the call's arguments, the cached values, ...), gathered per call.
"""

from __future__ import annotations

import contextlib
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

from passes.find_cached_region import (
    PART_META,
    CachedRegion,
    RegionError,
    derived_from_inputs,
    is_tensor_node,
)

#: The pools a variant's inputs are gathered from, per call (``Part.plan``): the call's
#: arguments; the cached values of the last cache step (the old cache, for ``mixed``); for
#: ``forecast`` those of the two cache steps before it and one weights tensor per cached value;
#: for ``mixed`` the bool row mask (``ROWS``, index 0).
ARGS, CACHE, OLDER, OLDEST, WEIGHTS, ROWS = range(6)


@dataclass(frozen=True)
class Part:
    """One variant graph, ready for the inner compiler and the runtime.

    ``plan[j] = (pool, index)``: input ``j`` is ``pools[pool][index]``. ``example_inputs`` are
    what the inner compiler is given at compile time: the call's example tensors for arguments,
    fake values for the rest.
    """

    gm: fx.GraphModule
    plan: tuple[tuple[int, int], ...]
    example_inputs: tuple[Any, ...]
    #: where ``gm`` has outlined blocks (Note [Compile-once blocks]): the same graph inline,
    #: compiled instead if ``gm`` fails to compile
    inline: fx.GraphModule | None = field(default=None, compare=False, repr=False)
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
class Variants:
    """The graphs of Note [One graph per call] for one Dynamo graph."""

    compute: Part  #: takes the call's arguments as they are (``plan`` is the identity)
    reuse: Part
    forecast: Part
    mixed: Part
    #: how many of ``compute``'s (and ``mixed``'s) outputs are the forward's; the cached values
    #: follow them
    num_outputs: int
    #: whether the forward returned one value rather than a tuple
    single_output: bool

    def by_name(self, name: str) -> Part:
        part: Part = getattr(self, name)
        return part


def _outputs(gm: fx.GraphModule) -> tuple[list[Any], bool]:
    """The original graph's output values, and whether it returned a single value."""
    out = gm.graph.output_node().args[0]
    if isinstance(out, (tuple, list)):
        return list(out), False
    return [out], True


def _whole(
    gm: fx.GraphModule,
    region: CachedRegion,
    example_inputs: Sequence[Any],
    name: str,
    mix_rows: bool = False,
) -> Part:
    """The whole forward returning ``(*outputs, *cached)``; with ``mix_rows`` (``mixed``) it
    also takes the row mask and the old cache, and each cached tensor with the batch dim is
    ``where(rows, old, fresh)`` for everything after the region (Note [BlockDance-Ada])."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    outs, _ = _outputs(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    plan = [(ARGS, i) for i in range(len(placeholders))]
    examples = list(example_inputs)
    boundary = list(region.boundary)
    old: dict[fx.Node, fx.Node] = {}
    for n in placeholders:
        env[n] = graph.node_copy(n)
    if mix_rows:
        first = next(b for b in boundary if is_tensor_node(b)).meta["example_value"]
        rows = graph.placeholder("bd_rows")
        rows.meta["example_value"] = _fake(first, (first.shape[0],), torch.bool)
        plan.append((ROWS, 0))
        examples.append(rows.meta["example_value"])
        for i, b in enumerate(boundary):
            value = b.meta["example_value"]
            if _has_rows(value, first):
                p = old[b] = graph.placeholder(f"bd_cache_{i}")
                p.meta = copy.copy(b.meta)
                p.meta["example_value"] = _fake(value, value.shape, value.dtype, value.stride())
                plan.append((CACHE, i))
                examples.append(p.meta["example_value"])
    mixed: dict[fx.Node, fx.Node] = {}  # a cached tensor -> its row-mixed value

    def after_region(a: fx.Node) -> fx.Node:
        return mixed.get(a, env[a])

    for n in gm.graph.nodes:
        if n.op in ("placeholder", "output"):
            continue
        inside = n.meta.get(PART_META) == "region"
        env[n] = graph.node_copy(n, env.__getitem__ if inside else after_region)
        if n in old:
            dims = [-1] + [1] * (n.meta["example_value"].dim() - 1)
            mask = graph.call_method("view", (rows, dims))
            mixed[n] = graph.call_function(torch.where, (mask, old[n], env[n]))
    final = [mixed.get(v, env[v]) if isinstance(v, fx.Node) else v for v in outs]
    graph.output((*final, *(mixed.get(b, env[b]) for b in boundary)))
    graph.lint()
    return Part(_module(gm, graph, name), tuple(plan), tuple(examples))


def _module(gm: fx.GraphModule, graph: fx.Graph, name: str) -> fx.GraphModule:
    return keep_dynamo_metadata(gm, fx.GraphModule(gm, graph, f"BlockDance_{name}"))


def keep_dynamo_metadata(src: fx.GraphModule, dst: fx.GraphModule) -> fx.GraphModule:
    """``dst``, a graph made from Dynamo's graph ``src``, marked as Dynamo's as ``src`` is.

    Note [Static inputs]
    Dynamo marks the model's parameters and buffers as static inputs (their placeholders'
    ``tensor_dict["_dynamo_static_input_type"]``, which the variants' placeholders copy). AOT
    autograd honours the marks only in a graph module it recognises as Dynamo's (Note
    [Assumption on Dynamo Metadata] in ``torch/_functorch/_aot_autograd/frontend_utils.py``:
    ``meta["dynamo_compile_id"]``, ``_param_name_to_source``, and a ``_dynamo_source`` on every
    placeholder); in any other graph inductor's ``static_input_idxs`` is empty, and every weight
    is an ordinary input: on a GPU each one's alignment is checked on every call, and under CUDA
    graphs every weight is copied into the graph's own input buffers on every replay. So each
    variant carries ``src``'s metadata, as DDPOptimizer's split graphs do; the inputs a variant
    adds (cached values, forecast weights, row mask) have no source and are not static (a cache
    is new memory in each generation).
    """
    dst.meta.update(src.meta)
    if hasattr(src, "_param_name_to_source"):
        dst._param_name_to_source = src._param_name_to_source
    sources = {
        n.name: getattr(n, "_dynamo_source", None) for n in src.graph.find_nodes(op="placeholder")
    }
    for n in dst.graph.find_nodes(op="placeholder"):
        n._dynamo_source = sources.get(n.name)  # type: ignore[attr-defined]
    return dst


def _fake(
    like: torch.Tensor,
    shape: Sequence[Any],
    dtype: torch.dtype,
    stride: Sequence[Any] | None = None,
) -> torch.Tensor:
    """A new example tensor on ``like``'s device, in ``like``'s fake mode when it has one: an
    added input's example must be a distinct fake tensor of the trace's mode (FIELD-NOTES)."""
    mode = getattr(like, "fake_mode", None)
    with mode if mode is not None else contextlib.nullcontext():
        if stride is None:
            return torch.empty(tuple(shape), dtype=dtype, device=like.device)
        return torch.empty_strided(tuple(shape), tuple(stride), dtype=dtype, device=like.device)


def _has_rows(value: Any, first: torch.Tensor) -> bool:
    """Whether ``value`` is a tensor whose leading dim is the batch of ``first`` (what the
    row mask selects in)."""
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return False
    a, b = value.shape[0], first.shape[0]
    if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt):
        return str(a) == str(b)  # the same expression; no guard on a finished trace
    return bool(a == b)


def _reuse(
    gm: fx.GraphModule,
    region: CachedRegion,
    example_inputs: Sequence[Any],
    memo: dict[fx.Node, bool],
    forecast: bool = False,
) -> Part:
    """Prefix + tail with the cached values as inputs. Scalars derived from inputs are
    recomputed here instead of being cached (Note [Symbolic scalars]); with ``forecast`` each
    cached tensor is ``oldest * w[0] + older * w[1] + last * w[2]`` (Note [Forecast reuse] in
    ``bd_compile/runtime.py``)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    plan: list[tuple[int, int]] = []
    examples: list[Any] = []
    placeholders = {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
    cached = {n: i for i, n in enumerate(region.boundary)}
    body = [n for n in gm.graph.nodes if n.meta.get(PART_META) in ("prefix", "tail")]
    inside = set(body)
    needed: set[fx.Node] = set()
    stack = [a for n in body for a in n.all_input_nodes]
    stack += gm.graph.output_node().all_input_nodes
    recomputed: set[fx.Node] = set()
    while stack:  # close over the input-derived scalars this graph recomputes
        n = stack.pop()
        if n in inside or n in needed or n in recomputed:
            continue
        if n.op != "placeholder" and derived_from_inputs(n, memo):
            recomputed.add(n)
            stack.extend(n.all_input_nodes)
        else:
            needed.add(n)
    needed |= _symbol_sources(gm, needed)  # Note [Compound sizes]

    def take(n: fx.Node, pool: int, index: int, name: str, example: Any = None) -> fx.Node:
        p = graph.placeholder(name)
        p.meta = copy.copy(n.meta)
        if example is not None:
            p.meta["example_value"] = example
        plan.append((pool, index))
        examples.append(example_inputs[index] if pool == ARGS else p.meta["example_value"])
        return p

    combine: list[tuple[fx.Node, list[fx.Node]]] = []
    for n in gm.graph.nodes:  # inputs in original graph order: deterministic graphs, warm caches
        if n not in needed:
            continue
        if n in placeholders:
            env[n] = take(n, ARGS, placeholders[n], n.name)
            continue
        i = cached[n]
        last = take(n, CACHE, i, f"bd_cache_{i}")
        env[n] = last
        if forecast and is_tensor_node(n):
            v = n.meta["example_value"]
            history = [
                take(n, pool, i, f"bd_{name}_{i}", _fake(v, v.shape, v.dtype, v.stride()))
                for pool, name in ((OLDEST, "oldest"), (OLDER, "older"))
            ]
            w = take(n, WEIGHTS, i, f"bd_weights_{i}", _fake(v, (3,), v.dtype))
            combine.append((n, [*history, last, w]))
    for n, (oldest, older, last, w) in combine:
        terms = [
            graph.call_function(operator.mul, (h, graph.call_function(operator.getitem, (w, j))))
            for j, h in enumerate((oldest, older, last))
        ]
        total = graph.call_function(operator.add, (terms[0], terms[1]))
        env[n] = graph.call_function(operator.add, (total, terms[2]))
    for n in gm.graph.nodes:
        if n in recomputed or n in inside:
            env[n] = graph.node_copy(n, lambda a: env[a])
    graph.node_copy(gm.graph.output_node(), lambda a: env[a])
    graph.eliminate_dead_code()
    graph.lint()
    name = "forecast" if forecast else "reuse"
    return Part(_module(gm, graph, name), tuple(plan), tuple(examples))


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
    A cached value whose size is a product of symbols (QwenImage's RoPE table, ``(s10*s37, 8)``,
    made from the ``img_shapes`` ints) may be an input of a reuse graph that sees neither
    factor; inductor binds symbols only from bare-symbol sizes and scalar inputs, and fails to
    codegen the product. As ``torch.fx.passes.split_module`` does, the graph then also takes the
    original graph's input that defines each missing symbol (a symbolic scalar placeholder, or a
    tensor placeholder one of whose sizes is the bare symbol).
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
    if missing:  # no input defines it alone: the inner compiler could not compile the graph
        names = ", ".join(sorted(map(str, missing)))
        raise RegionError(
            f"a cached value has a dynamic size in {names}, which no input of the model "
            "defines on its own"
        )
    return found


def build_variants(
    gm: fx.GraphModule, region: CachedRegion, example_inputs: Sequence[Any]
) -> Variants:
    """The graphs of Note [One graph per call] for a graph labelled by ``find_cached_region``."""
    memo: dict[fx.Node, bool] = {}
    outs, single = _outputs(gm)
    return Variants(
        compute=_whole(gm, region, example_inputs, "compute"),
        reuse=_reuse(gm, region, example_inputs, memo),
        forecast=_reuse(gm, region, example_inputs, memo, forecast=True),
        mixed=_whole(gm, region, example_inputs, "mixed", mix_rows=True),
        num_outputs=len(outs),
        single_output=single,
    )
