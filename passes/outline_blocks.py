"""Compile each kind of block once: outline every block into a subgraph called through
``torch.ops.higher_order.invoke_subgraph``, one shared subgraph per kind.

Note [Compile-once blocks]
A DiT's 28 blocks are the same code with different weights. Inlined, inductor lowers,
schedules and generates code for each of them; diffusers' regional compilation
(``compile_repeated_blocks``) avoids that by compiling one block and calling it per block, but
gives up the one-graph forward blockdance needs. Here each variant graph stays one graph: the
nodes of block ``k`` (``node.meta["blockdance_block"]``) are replaced by one
``invoke_subgraph(bd_block_v2_<kind>, "bd_block_v2_<kind>", *inputs)`` call and ``getitem`` nodes
for the values used after it. Blocks whose subgraphs are identical (same nodes, targets and
constants, and the same shapes, dtypes and strides of their inputs; the weights are inputs)
share one ``fx.GraphModule`` and identifier, which is what ``torch.compiler.nested_compile_region``
produces: AOTAutograd traces it once per identifier and inductor lowers it once per subgraph.
Flux's double-stream and single-stream blocks come out as two kinds.

``invoke_subgraph`` bodies must be functional and their outputs must not alias their inputs or each
other (torch leaves it to whoever forms the call). So a block that writes into one of its inputs
stays inline, and an output that is a view or shares memory with an input or an earlier output
(Flux's single blocks return two slices of one tensor) is returned as a clone (inductor returned
wrong values for a subgraph output that was a slice of an intermediate); the blocks are visited in
order so that the next block's inputs are described by the clones (their strides are part of its
key, and inductor lays out every call's operands with the strides of that call's example
inputs: a key without strides would let blocks share a subgraph compiled for other strides).

A graph with dynamic (symbolic) shapes stays inline: through inductor, outlined Flux blocks
failed a runtime stride assertion there (torch 2.13, CPU), and the reuse graph failed to compile.

Note [Subgraph input asserts]
Inductor's generated code checks the size and stride of every input of a graph
(``assert_size_stride``), and of every subgraph on every call: with 24 weights and activations
per PixArt block, 28 blocks repeat ~670 checks per call that the top-level graph already made
(~0.4 us each on this CPU: +370 us per call of a 28-block model, 8% of a call that is all host
work). They check nothing new: inductor constrains each call's operands to the strides of the
subgraph's example inputs (``InvokeSubgraph.create``), the blocks of one subgraph have the same
example input strides (they are part of the kind's key; a key without them fails at compile
time, inductor's fake-tensor updater: "subgraph args must have consistent values"), and the
weights the subgraph reads are graph inputs, checked once at the top. So
``subgraph_input_asserts_skipped`` leaves them out of the subgraphs of the graphs blockdance
compiles with inductor's Python wrapper; the top-level checks, and everything else in the
subgraphs, stay. Inductor's FX graph cache keys do not see the context, so the subgraphs'
identifier names it (``SUBGRAPH_PREFIX``): entries an earlier bd_compile wrote, with the checks,
are not served (they would be slower, never wrong).

Inductor's C++ wrapper (``cpp_wrapper=True``, and AOTInductor, which always generates one) has
no code for ``invoke_subgraph`` in torch 2.13 (``NotImplementedError``, raised after the whole
graph is lowered): where it is used, the graphs are compiled and exported with their blocks
inline from the start (``cpp_wrapper_calls_subgraphs``), not tried outlined first.

A block also stays inline when it cannot be one call: one of its values is used outside it
before its last node (where the call is placed), e.g. other code interleaved with it. Outlining
only regroups nodes: the graph computes the same values.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import operator
from collections import defaultdict
from collections.abc import Hashable, Iterator
from typing import Any

import torch
import torch.fx as fx
from torch.multiprocessing.reductions import StorageWeakRef

from passes.build_variants import keep_dynamo_metadata
from passes.tag_blocks import BLOCK_META

log = logging.getLogger(__name__)

#: the subgraphs' names and identifiers; "v2": compiled without their input checks (Note
#: [Subgraph input asserts]). The identifier is part of the graph inductor's and AOTAutograd's
#: caches hash, so a new version here keeps them from serving code compiled the old way.
SUBGRAPH_PREFIX = "bd_block_v2_"

#: in-place ops that are not spelled with a trailing underscore
_IN_PLACE = frozenset({"setitem", "iadd", "isub", "imul", "itruediv", "ifloordiv", "ipow"})


def _members(gm: fx.GraphModule) -> dict[int, list[fx.Node]]:
    """The compute nodes of each tagged block, in graph order."""
    members: dict[int, list[fx.Node]] = defaultdict(list)
    for n in gm.graph.nodes:
        k = n.meta.get(BLOCK_META)
        if k is not None and n.op in ("call_function", "call_method"):
            members[k].append(n)
    return members


def _example(n: fx.Node) -> Any:
    return n.meta.get("example_value")


def _storage(value: Any) -> StorageWeakRef | None:
    """The memory a tensor example value lives in (views share it), or None."""
    if isinstance(value, torch.Tensor):
        return StorageWeakRef(value.untyped_storage())
    return None


def _spec(value: Any) -> Hashable:
    """What the subgraph's code depends on in an input's example value."""
    if isinstance(value, torch.Tensor):
        return ("tensor", str(tuple(value.shape)), str(value.stride()), value.dtype, value.device)
    if isinstance(value, torch.SymInt | torch.SymFloat | torch.SymBool):
        return ("sym", type(value).__name__)
    return ("value", repr(value))


def _cloned_example(
    value: torch.Tensor, memory_format: torch.memory_format = torch.preserve_format
) -> torch.Tensor:
    mode = getattr(value, "fake_mode", None)
    with mode if mode is not None else contextlib.nullcontext():
        return value.clone(memory_format=memory_format)


class _Outline:
    """One block as a candidate subgraph: its inputs, outputs and structural key.
    ``examples`` holds the example values of earlier blocks' cloned outputs."""

    def __init__(self, nodes: list[fx.Node], examples: dict[fx.Node, Any]) -> None:
        self.nodes = nodes
        inside = set(nodes)
        self.inputs: list[fx.Node] = []
        for n in nodes:
            for a in n.all_input_nodes:
                if a not in inside and a not in self.inputs:
                    self.inputs.append(a)
        given = [examples.get(a, _example(a)) for a in self.inputs]
        #: the memory the block's inputs live in (before any contiguous copy below)
        self.given = {_storage(v) for v in given} - {None}
        self.input_examples = list(given)
        #: non-contiguous tensors from outside the blocks, passed contiguous (one kind more
        #: saved: PixArt's first block reads the patch embedding's transposed output)
        self.contiguous: set[fx.Node] = set()
        for i, (a, v) in enumerate(zip(self.inputs, self.input_examples, strict=True)):
            if isinstance(v, torch.Tensor) and BLOCK_META not in a.meta and a not in examples:
                if not v.is_contiguous():
                    self.contiguous.add(a)
                    self.input_examples[i] = _cloned_example(v, torch.contiguous_format)
        self.outputs = [n for n in nodes if any(u not in inside for u in n.users)]
        # views, and outputs sharing memory with an input or an earlier output: cloned
        seen = set(self.given)
        self.clones: dict[fx.Node, torch.Tensor] = {}
        for n in self.outputs:
            value = _example(n)
            storage = _storage(value)
            if storage is not None and (storage in seen or value._is_view()):
                self.clones[n] = _cloned_example(value)
            elif storage is not None:
                seen.add(storage)

    def key(self) -> Hashable:
        local: dict[fx.Node, Hashable] = {a: ("in", i) for i, a in enumerate(self.inputs)}
        local.update({n: ("node", i) for i, n in enumerate(self.nodes)})

        def canon(arg: Any) -> Hashable:
            return repr(fx.node.map_arg(arg, local.__getitem__))  # type: ignore[arg-type]

        body = tuple((n.op, repr(n.target), canon(n.args), canon(n.kwargs)) for n in self.nodes)
        specs = tuple(map(_spec, self.input_examples))
        outputs = tuple((local[n], n in self.clones) for n in self.outputs)
        return body, specs, outputs

    def why_inline(self, order: dict[fx.Node, int]) -> str | None:
        """Why the block cannot be one ``invoke_subgraph`` call, or None."""
        inside = set(self.nodes)
        last = order[self.nodes[-1]]
        for n in self.outputs:
            if any(u not in inside and order[u] < last for u in n.users):
                return f"{n.name} is used by other code before the block ends"
        for n in self.nodes:
            name = getattr(n.target, "__name__", str(n.target))
            in_place = name in _IN_PLACE or (name.endswith("_") and not name.startswith("__"))
            written = n.kwargs.get("out", n.args[0] if in_place and n.args else None)
            if isinstance(written, fx.Node) and _storage(_example(written)) in self.given:
                return f"{n.name} writes into an input of the block"
        return None

    def subgraph(self, owner: fx.GraphModule) -> fx.GraphModule:
        """The block as a graph of its inputs returning its outputs (Note [Compile-once
        blocks]: views and aliasing outputs cloned)."""
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for i, (a, value) in enumerate(zip(self.inputs, self.input_examples, strict=True)):
            env[a] = graph.placeholder(f"arg{i}")
            env[a].meta = {**a.meta, "example_value": value}
        for n in self.nodes:
            env[n] = graph.node_copy(n, env.__getitem__)
        results = []
        for n in self.outputs:
            out = env[n]
            if n in self.clones:
                out = graph.call_method("clone", (out,))
                out.meta = {**n.meta, "example_value": self.clones[n]}
            results.append(out)
        graph.output(tuple(results))
        graph.lint()
        return fx.GraphModule(owner, graph, "BlockDance_block")

    def emit(
        self, graph: fx.Graph, name: str, env: dict[fx.Node, fx.Node], made: dict[fx.Node, fx.Node]
    ) -> None:
        """One call of subgraph ``name`` in ``graph``; ``env`` maps the block's outputs to
        the ``getitem`` values of the call; ``made``: the contiguous copies made so far."""
        for a, value in zip(self.inputs, self.input_examples, strict=True):
            if a in self.contiguous and a not in made:
                made[a] = graph.call_method("contiguous", (env[a],))
                made[a].meta = {**a.meta, "example_value": value}
        inputs = (made[a] if a in self.contiguous else env[a] for a in self.inputs)
        attr = graph.get_attr(name)
        args: tuple[fx.node.Argument, ...] = (attr, name, *inputs)
        call = graph.call_function(torch.ops.higher_order.invoke_subgraph, args)
        values = []
        for i, n in enumerate(self.outputs):
            env[n] = item = graph.call_function(operator.getitem, (call, i))
            item.meta = {**n.meta, "example_value": self.clones.get(n, _example(n))}
            values.append(item.meta["example_value"])
        call.meta["example_value"] = tuple(values)


@contextlib.contextmanager
def subgraph_input_asserts_skipped() -> Iterator[None]:
    """Inductor compiles inside this block without the size/stride checks of subgraph inputs
    (Note [Subgraph input asserts]); ``nan_asserts`` (a debug option) still applies."""
    from torch._inductor import config
    from torch._inductor.codegen.wrapper import SubgraphPythonWrapperCodegen as Codegen

    def nan_asserts_only(self: Codegen) -> None:
        if config.nan_asserts:
            self.codegen_input_nan_asserts()

    name = "codegen_input_size_and_nan_asserts"
    own = vars(Codegen).get(name)  # None: inherited from PythonWrapperCodegen
    setattr(Codegen, name, nan_asserts_only)
    try:
        yield
    finally:
        if own is None:
            delattr(Codegen, name)
        else:
            setattr(Codegen, name, own)


@functools.cache
def cpp_wrapper_calls_subgraphs() -> bool:
    """Whether inductor's C++ wrapper generates code for ``invoke_subgraph`` calls (Note
    [Compile-once blocks]). Asked of the method itself with stand-in arguments: torch 2.13's
    raises ``NotImplementedError`` before reading them; one that reads them is implemented."""
    from torch._inductor.codegen.cpp_wrapper_cpu import CppWrapperCpu

    try:
        CppWrapperCpu.codegen_invoke_subgraph(None, None)  # type: ignore[arg-type]
    except NotImplementedError:
        return False
    except Exception:  # it read the stand-ins: there is an implementation
        pass
    return True


def outline_blocks(gm: fx.GraphModule) -> fx.GraphModule | None:
    """``gm`` with its tagged blocks outlined (Note [Compile-once blocks]), as a new graph
    module (``gm`` is left as it is); None when no block can be outlined. Blocks are visited in
    order: each one's inputs are described by the values the blocks before it return."""
    if any(
        isinstance(d, torch.SymInt)
        for n in gm.graph.find_nodes(op="placeholder")
        if isinstance(v := _example(n), torch.Tensor)
        for d in (*v.shape, *v.stride())
    ):
        log.info("blockdance: dynamic shapes: blocks compiled inline (Note [Compile-once blocks])")
        return None
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    examples: dict[fx.Node, Any] = {}
    names: dict[Hashable, str] = {}
    subgraphs: dict[str, fx.GraphModule] = {}
    at_end: dict[fx.Node, tuple[_Outline, str]] = {}  # a block's last node -> its call
    outlined: set[fx.Node] = set()
    for _, nodes in sorted(_members(gm).items()):
        o = _Outline(nodes, examples)
        why = o.why_inline(order)
        if why is not None:
            log.debug("blockdance: a block stays inline in the compiled graph: %s", why)
            continue
        key = o.key()
        name = names.get(key)
        if name is None:
            name = names[key] = f"{SUBGRAPH_PREFIX}{len(names)}"
            subgraphs[name] = o.subgraph(gm)
        examples.update(o.clones)
        at_end[nodes[-1]] = (o, name)
        outlined.update(nodes)
    if not at_end:
        return None
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    made: dict[fx.Node, fx.Node] = {}
    for n in gm.graph.nodes:
        if n in at_end:
            o, name = at_end[n]
            o.emit(graph, name, env, made)
        elif n not in outlined:
            env[n] = graph.node_copy(n, env.__getitem__)
    graph.lint()
    root: dict[str, Any] = {
        str(n.target): getattr(gm, str(n.target)) for n in gm.graph.find_nodes(op="get_attr")
    }
    out = keep_dynamo_metadata(gm, fx.GraphModule({**root, **subgraphs}, graph, type(gm).__name__))
    log.debug(
        "blockdance: %s: %d blocks call %d compiled-once subgraphs",
        type(gm).__name__,
        len(at_end),
        len(subgraphs),
    )
    return out
