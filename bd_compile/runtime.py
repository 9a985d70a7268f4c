"""The object Dynamo calls for one rewritten graph: one compiled graph per call, chosen from
the variants of Note [One graph per call] (``passes/build_variants.py``). Where the call sits in
the sampling loop, and the caches, belong to the model's ``LoopState`` (Note [Generations, steps
and branches] in ``loop.py``); which variant runs is the one answer of ``calls.answer``.

Note [Forecast reuse]
With ``forecast = k`` (1 or 2) a branch keeps the cached values of its last ``k + 1`` cache
steps with their progress ``x_i`` along the trajectory. A reuse step at progress ``x`` feeds the
blocks after the region the polynomial through those points evaluated at ``x`` (TaylorSeer-style
finite differences, written as Lagrange weights ``w_i = prod_{j != i} (x - x_j) / (x_i - x_j)``:
order 1 is linear from the last two cache steps, order 2 quadratic from three). The weights are
computed on the host from scalars (``calls.answer``) and passed as a tensor input of the
``forecast`` variant, which sums ``oldest * w0 + older * w1 + last * w2`` inside (order 1:
``w0 = 0``, ``oldest`` is ``older``), so changing ``forecast`` or the step never recompiles.
Until ``k + 1`` cache steps exist, a reuse step copies. Numbers cached next to the tensors
(sizes) are taken from the last cache step.

Note [Variants compile when first needed]
``compute`` compiles with the graph. The others compile at the first call that needs them
(``reuse`` at the first reuse step: a model that never reuses pays no compile for it), from that
call's tensors (as static-shape fake tensors, so inductor's FX graph cache serves them), with
the same inner compiler. Two cases compile them with the graph instead, from the trace's fake
inputs: symbolic shapes (a variant compiled later from real tensors would
be specialised to their shapes; one still compiled later, a forecast asked for by
``set_schedule`` after compiling, is compiled per concrete signature), and CUDA graphs
(a conservative choice, not measured on a GPU here: every CUDA-graph compile stays inside the
compile Dynamo drives, with its tracing context).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch._dynamo.utils import counters
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from bd_compile.calls import FORECAST, MIXED, REUSE, answer, decide_after
from bd_compile.keys import Signature, Slot
from bd_compile.layout import Layout
from bd_compile.loop import LoopState
from bd_compile.settings import uses_cpp_wrapper
from passes import Variants
from passes.outline_blocks import cpp_wrapper_calls_subgraphs, subgraph_input_asserts_skipped

log = logging.getLogger(__name__)

CompiledFn = Callable[..., Any]


def _cloned(values: tuple[Any, ...]) -> tuple[Any, ...]:
    """Tensors copied (a CUDA-graph replay overwrites its outputs), other values as they are."""
    return tuple(v.clone() if isinstance(v, torch.Tensor) else v for v in values)


def _fake_inputs(inputs: Sequence[Any]) -> list[Any]:
    """A call's tensors as static-shape fake tensors of a fresh mode with a shape env: what the
    inner compiler needs to look up and fill inductor's FX graph cache after Dynamo's trace is
    over (real tensors compile too, but bypass the cache: "No shape env")."""
    mode = FakeTensorMode(shape_env=ShapeEnv())
    return [
        mode.from_tensor(x, static_shapes=True) if isinstance(x, torch.Tensor) else x
        for x in inputs
    ]


def has_symbolic_shapes(gm: fx.GraphModule, example_inputs: Sequence[Any] = ()) -> bool:
    """Whether the graph's inputs have symbolic sizes. Dynamo hands real tensors as example
    inputs, the sizes' symbols as inputs of their own (``SymInt``) and as the placeholders'
    fake example values: any of them says so."""
    values = [n.meta.get("example_value") for n in gm.graph.find_nodes(op="placeholder")]
    return any(
        isinstance(v, torch.SymInt)
        or (isinstance(v, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in v.shape))
        for v in (*values, *example_inputs)
    )


def read_timestep(arg: Any) -> float:
    """The first element of the timestep argument, on the host (``tolist`` makes no tensor: it
    costs a tenth of ``float(arg.reshape(-1)[0])`` on the CPU)."""
    value = arg.tolist() if isinstance(arg, torch.Tensor) else arg
    while isinstance(value, list):
        value = value[0]
    return float(value)


class GraphRuntime:
    """Runs one rewritten graph; the cache/compute decision comes from the model's loop state."""

    def __init__(
        self,
        variants: Variants,
        inner: Callable[[Any, list[Any]], CompiledFn],
        state: LoopState,
        layout: Layout,
        timestep_index: int | None,
        signature_indices: Sequence[int],
        param_ids: frozenset[int],
        own_cache: bool = False,
        ahead: Sequence[str] = (),
    ) -> None:
        """``ahead``: the variants to compile now besides ``compute`` (Note [Variants compile
        when first needed]); the rest compile at their first call."""
        self.variants = variants
        self.inner = inner
        self.state = state
        self.layout = layout
        self.layout_key = layout.key
        self.timestep_index = timestep_index
        self.signature_indices = tuple(signature_indices)
        self.param_ids = param_ids
        #: Note [Caches under CUDA graphs]: a CUDA-graph replay overwrites the outputs of the
        #: previous replay, so with cudagraphs the cache lives in buffers this runtime owns,
        #: copied into in place on every cache step (one extra cache of memory per branch).
        self.own_cache = own_cache
        self.symbolic = has_symbolic_shapes(variants.compute.gm, variants.compute.example_inputs)
        #: compiled variants by (name, None), or (name, signature) for a symbolic graph's
        #: variant compiled after the trace (Note [Variants compile when first needed])
        self.compiled: dict[tuple[str, Signature | None], CompiledFn] = {}
        self.static_signature: Signature | None = None
        for name in ("compute", *ahead):
            part = variants.by_name(name)
            self.compiled[(name, None)] = self._compile(name, list(part.example_inputs))
        self.compute_fn = self.compiled[("compute", None)]
        self.n = variants.num_outputs
        state.add(self)

    def _run(self, name: str, signature: Signature, *pools: Sequence[Any]) -> Any:
        """Run variant ``name`` on the inputs gathered from ``pools``, compiling it first if
        this is its first call (per concrete signature where the graph is symbolic)."""
        part = self.variants.by_name(name)
        inputs = part.gather(*pools)
        fn = self.compiled.get((name, None))
        if fn is None:
            key = (name, signature if self.symbolic else None)
            fn = self.compiled.get(key)
            if fn is None:
                log.info("blockdance: compiling the %s graph (first call that needs it)", name)
                fn = self.compiled[key] = self._compile(name, _fake_inputs(inputs))
        return fn(*inputs)

    def _compile(self, name: str, example_inputs: list[Any]) -> CompiledFn:
        """Variant ``name`` compiled by the inner compiler; one whose outlined blocks (Note
        [Compile-once blocks]) fail to compile is compiled inline instead, with a warning
        (raises under ``strict``)."""
        part = self.variants.by_name(name)
        if part.inline is None:
            return self.inner(part.gm, example_inputs)
        if uses_cpp_wrapper(self.state.settings) and not cpp_wrapper_calls_subgraphs():
            log.info(
                "blockdance: compiling the %s graph with its blocks inline: inductor's C++ "
                "wrapper (cpp_wrapper) cannot call blocks compiled once in this torch",
                name,
            )
            counters["blockdance"]["compile_once_skipped"] += 1
            return self.inner(part.inline, example_inputs)
        inductor = self.state.settings.inner == "inductor"  # Note [Subgraph input asserts]
        try:
            with subgraph_input_asserts_skipped() if inductor else contextlib.nullcontext():
                return self.inner(part.gm, example_inputs)
        except Exception as e:
            if self.state.settings.strict:
                raise
            log.warning(
                "blockdance: the %s graph did not compile with each block compiled once "
                "(%s: %s); compiling its blocks inline. compile_once=False skips the attempt",
                name,
                type(e).__name__,
                str(e).splitlines()[0] if str(e) else "",
            )
            counters["blockdance"]["compile_once_failures"] += 1
            return self.inner(part.inline, example_inputs)

    def _finish(self, outputs: Sequence[Any]) -> Any:
        """What the forward returns, from a variant's first ``n`` outputs."""
        return outputs[0] if self.variants.single_output else tuple(outputs)

    def _own(
        self, values: tuple[Any, ...], old: Slot | None, signature: Signature
    ) -> tuple[Any, ...]:
        if old is not None and old.signature == signature:
            for buf, v in zip(old.values, values, strict=True):
                if isinstance(buf, torch.Tensor):
                    buf.copy_(v)
            return old.values
        return _cloned(values)

    def _signature(self, args: Sequence[Any]) -> Signature:
        """The call's input signature. Dynamo's guards hold a static-shape graph's shapes,
        dtypes and devices fixed, so there it is read once, at the first call."""
        if self.static_signature is not None:
            return self.static_signature
        signature = tuple(
            (a.shape, a.dtype, a.device) if isinstance(a, torch.Tensor) else a
            for a in (args[i] for i in self.signature_indices)
        )
        if not self.symbolic:
            self.static_signature = signature
        return signature

    def __call__(self, *args: Any) -> Any:
        state = self.state
        ks = state.current()
        t = None
        if self.timestep_index is not None and ks.reads_timestep:  # Note [Counted steps]
            t = read_timestep(args[self.timestep_index])
        gen, branch = state.advance(ks, self.layout_key, t)
        signature = self._signature(args)
        call = answer(state, gen, branch, self.layout_key, signature)
        slot = call.slot
        if call.reuses:
            assert slot is not None
            state.record(gen, True)
            if call.run == FORECAST:  # Note [Forecast reuse]
                older, oldest = call.history[-1], call.history[0]
                w = [
                    torch.tensor(call.weights, dtype=v.dtype).to(v.device, non_blocking=True)
                    if isinstance(v, torch.Tensor)
                    else None
                    for v in slot.values
                ]
                return self._run(FORECAST, signature, args, slot.values, older, oldest, w)
            return self._run(REUSE, signature, args, slot.values)
        order = state.settings.forecast if state.ada is None else 0
        out = None
        if call.run == MIXED:  # reads the old cache, so it runs before that is freed
            assert slot is not None and call.rows is not None
            mask = call.rows.to(slot.values[0].device, non_blocking=True)
            out = self._run(MIXED, signature, args, slot.values, (), (), (), (mask,))
        if out is None and self.own_cache and not order and state.ada is None:
            out = self.compute_fn(*args)
            cache = self._own(tuple(out[self.n :]), slot, signature)
            state.store(gen, call.slot_key, Slot(cache, signature))
        else:
            # Free what the new cache replaces (our references too) before it is made: at the
            # peak a branch holds forecast + 1 caches, not forecast + 2.
            kept = slot.history[len(slot.history) - order :] if order and slot else ()
            if slot is not None and slot.signature != signature:
                kept = ()
            slot_key = call.slot_key
            del slot, call
            state.store(gen, slot_key, None)
            if out is None:
                out = self.compute_fn(*args)
            cache = tuple(out[self.n :])
            if self.own_cache:  # Note [Caches under CUDA graphs]: the next replay overwrites it
                cache = _cloned(cache)
            history = (*kept, (gen.progress, cache)) if order else ()
            state.store(gen, slot_key, Slot(cache, signature, history))
        if state.ada is not None:
            decide_after(state, gen, branch, cache[0])
        state.record(gen, False)
        return self._finish(out[: self.n])


class TimestepReader:
    """A graph without blocks that has the timestep (the first piece of a forward with a graph
    break): runs uncached, and tells the loop state where the loop is, for the graphs after it."""

    def __init__(self, fn: CompiledFn, state: LoopState, timestep_index: int) -> None:
        self.fn, self.state, self.timestep_index = fn, state, timestep_index
        self.layout: Layout | None = None
        self.layout_key = ("timestep reader",)
        self.param_ids: frozenset[int] = frozenset()
        state.add(self)

    def __call__(self, *args: Any) -> Any:
        ks = self.state.current()
        t = read_timestep(args[self.timestep_index]) if ks.reads_timestep else None
        self.state.advance(ks, self.layout_key, t)
        return self.fn(*args)
