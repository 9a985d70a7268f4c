"""The ``blockdance`` torch.compile backend: a thin composition.

options -> ``Settings`` -> the model's ``LoopState`` -> ``passes.rewrite`` -> inner compiler per
variant -> ``GraphRuntime``. A graph the passes cannot handle goes to the inner compiler unchanged
with one warning saying why (or raises ``BlockDanceError`` under ``strict``).
"""

from __future__ import annotations

import functools
import logging
import sys
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch._dynamo.eval_frame import OptimizedModule
from torch._dynamo.exc import RestartAnalysis, SkipFrame
from torch._dynamo.utils import counters

from bd_compile import settings as settings_mod
from bd_compile.fallback import explain_fallback
from bd_compile.layout import CachedValue, Layout
from bd_compile.loop import LoopState, state_for
from bd_compile.runtime import CompiledFn, GraphRuntime, TimestepReader, has_symbolic_shapes
from bd_compile.settings import Settings
from bd_compile.warmup import install as install_warmup
from passes import RegionError, Rewritten, find_timestep_input, rewrite

log = logging.getLogger(__name__)

InnerCompiler = Callable[[fx.GraphModule, list[Any]], CompiledFn]


class BlockDanceError(RuntimeError):
    """Raised under ``strict=True`` when a graph cannot be rewritten."""


def resolve_inner(name: str, patches: dict[str, Any] | None = None) -> InnerCompiler:
    """The inner compiler: inductor (imported lazily, as torch's own backend does) with the
    ``inner_options`` config ``patches``, or any registered Dynamo backend."""
    if name == "inductor":
        from torch._inductor.compile_fx import compile_fx  # heavy: only when used

        if patches:
            return functools.partial(compile_fx, config_patches=patches)  # type: ignore[return-value]
        return compile_fx  # type: ignore[return-value]
    from torch._dynamo.backends.registry import lookup_backend

    try:
        return lookup_backend(name)  # type: ignore[return-value]
    except Exception as e:  # torch raises InvalidBackend
        raise ValueError(
            f"blockdance option 'inner': expected a registered backend name, got {name!r}"
        ) from e


def apply_calibration(s: Settings) -> tuple[Settings, int | None]:
    """Settings with a calibration file's ``cache_block`` and ``window``, and the block count the
    calibration was made for (``None`` without a calibration). Explicit ``cache_block`` wins."""
    if s.calibration is None:
        return s, None
    from bd_compile.calibration import load_calibration  # reads JSON; only when asked for

    cal = load_calibration(s.calibration)
    cache_block = s.cache_block if s.cache_block is not None else cal.cache_block
    return s.replace(cache_block=cache_block, window=cal.window, calibration=None), cal.num_blocks


def graph_owner(gm: fx.GraphModule) -> torch.nn.Module | None:
    """What this graph belongs to, if it can be found: the key of the loop state shared by
    every graph Dynamo makes of one compiled model.

    The ``torch.compile`` wrapper (``OptimizedModule``) on the Python stack: one per
    ``torch.compile`` call, so two compiles of one module (other options) never share a state,
    and graph breaks inside a submodule, where Dynamo restarts in the submodule's own frame,
    still find it. Otherwise (a compiled function) the module whose forward is being traced.
    """
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None:
        wrapper = frame.f_locals.get("self")
        if isinstance(wrapper, OptimizedModule):
            return wrapper
        frame = frame.f_back
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
    except Exception:  # not inside Dynamo (the Python API on a captured graph)
        return None
    for n in gm.graph.nodes:
        source = getattr(n.meta.get("grapharg"), "source", None)
        while source is not None and hasattr(source, "base"):
            source = source.base
        name = getattr(source, "local_name", None)
        if name is not None:
            owner = tx.f_locals.get(name)
            if isinstance(owner, torch.nn.Module):
                return owner
    return None


def _layout(rw: Rewritten, gm: fx.GraphModule, s: Settings) -> Layout:
    def value(n: fx.Node, name: str) -> CachedValue:
        v = n.meta["example_value"]
        if isinstance(v, torch.Tensor):
            shape = tuple(int(d) if isinstance(d, int) else str(d) for d in v.shape)
            return CachedValue(name, shape, v.dtype)
        return CachedValue(name, (), None)

    region = rw.region
    return Layout(
        blocks=tuple((b.name, b.cls) for b in region.blocks),
        cache_block=region.cache_block,
        cached=tuple(
            value(n, d) for n, d in zip(region.boundary, region.descriptions, strict=True)
        ),
        timestep_input=None if rw.timestep_index is None else rw.input_names[rw.timestep_index],
        inner=s.inner,
    )


def build_runtime(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    s: Settings,
    inner: InnerCompiler,
    state: LoopState,
    calibrated_for: int | None = None,
    own_cache: bool = False,
) -> GraphRuntime:
    """Run the passes on ``gm`` and compile its ``compute`` variant with ``inner`` (Note [One
    graph per call]); ``own_cache``: the inner compiler uses CUDA graphs (Note [Caches under
    CUDA graphs])."""
    rw = rewrite(
        gm,
        example_inputs,
        timestep_input=s.timestep_input,
        require_timestep=not state.has_timestep_reader(),
        cache_block=s.cache_block,
        calibrated_for=calibrated_for,
        compile_once=s.compile_once,
    )
    ahead: list[str] = []
    if has_symbolic_shapes(gm) or own_cache:  # Note [Variants compile when first needed]
        ahead.append("reuse")
        if s.forecast:
            ahead.append("forecast")
        if s.policy is not None:
            ahead.append("mixed")
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    signature = [
        i
        for i, x in enumerate(example_inputs)
        if not isinstance(x, torch.nn.Parameter) and not placeholders[i].name.startswith("l_self_")
    ]
    params = frozenset(id(x) for x in example_inputs if isinstance(x, torch.nn.Parameter))
    return GraphRuntime(
        rw.variants,
        inner,
        state,
        _layout(rw, gm, s),
        rw.timestep_index,
        signature,
        params,
        own_cache=own_cache,
        ahead=ahead,
    )


def _reason(e: Exception) -> str:
    if isinstance(e, RegionError):
        return str(e)
    return f"unexpected {type(e).__name__} while rewriting: {e or 'no message'}"


def compile_graph(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    s: Settings,
    owner: torch.nn.Module | None = None,
) -> CompiledFn:
    """Rewrite and compile one Dynamo graph; fall back to the inner compiler if it can't."""
    s, calibrated_for = apply_calibration(s)
    patches = settings_mod.inductor_config_patches(s)
    inner = resolve_inner(s.inner, patches)
    params = frozenset(id(x) for x in example_inputs if isinstance(x, torch.nn.Parameter))
    owner = owner if owner is not None else graph_owner(gm)
    state = state_for(owner, s, params)
    try:
        cudagraphs = bool(patches.get("triton.cudagraphs"))
        runtime = build_runtime(gm, example_inputs, s, inner, state, calibrated_for, cudagraphs)
    except (RestartAnalysis, SkipFrame):
        raise  # Dynamo's signals (retrace with floats specialized, ...), not failures
    except Exception as e:
        why = explain_fallback(gm, owner, _reason(e))
        if s.strict:
            raise BlockDanceError(f"blockdance could not rewrite the graph: {why.text}") from e
        counters["blockdance"]["fallbacks"] += 1
        (log.warning if why.first() else log.debug)(
            "blockdance: graph left uncached (%s); compiling it with %r unchanged",
            why.text,
            s.inner,
        )
        fn = inner(gm, list(example_inputs))
        try:  # a graph piece before the blocks may still tell the others where the loop is
            return TimestepReader(fn, state, find_timestep_input(gm, s.timestep_input))
        except RegionError:
            return fn
    counters["blockdance"]["graphs_rewritten"] += 1
    if s.policy is not None or state.ada is not None:
        state.resolve_policy()  # the new graph must fit the policy too (Note [BlockDance-Ada])
    lay = runtime.layout
    log.info(
        "blockdance: %d blocks, caching 0..%d (%s), %d cached value(s); schedule: %s",
        len(lay.blocks),
        lay.cache_block,
        lay.blocks[lay.cache_block][0],
        len(lay.cached),
        state.describe(),
    )
    return runtime


def blockdance_backend(
    gm: fx.GraphModule,
    example_inputs: list[Any],
    options: dict[str, Any] | None = None,
    mode: str | None = None,
    **kwargs: Any,
) -> CompiledFn:
    """``torch.compile(model, backend="blockdance", options={...})``; ``mode=`` is the inner
    inductor's mode (``options={"inner_options": {"mode": ...}}``)."""
    if kwargs:
        raise ValueError(
            f"blockdance: unknown backend argument(s) {sorted(kwargs)}; expected options={{...}}"
        )
    settings = settings_mod.from_options(options)
    if mode not in (None, "default"):
        inner_options = {**dict(settings.inner_options), "mode": mode}
        settings = settings.replace(inner_options=inner_options)
    return compile_graph(gm, example_inputs, settings)


install_warmup(blockdance_backend)  # Note [Toolchain warm-up]
