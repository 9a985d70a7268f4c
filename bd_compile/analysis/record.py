"""Record every block's output while sampling: the recording backend and ``analyze``.

Note [Recording with the pass's own block tagging]
The blocks are found exactly as the ``blockdance`` backend finds them: the model is compiled with
a *recording backend* that runs ``passes.tag_blocks`` on the FX graph Dynamo captured, so the
blocks measured are the blocks the backend would skip (names and execution order included), and
no per-model hook or attribute name is involved. The recording backend copies the graph, adds
every block's output values (the nodes of block ``k`` used by any node outside block ``k``) as
extra graph outputs, runs the copy eagerly (``GraphModule.forward``) and hands the extras to a
``StatsSink``; the model's caller sees only the original outputs. A block that returns two
tensors (SD3/Flux/CogVideoX: hidden and encoder hidden states) is measured on the concatenation
of both, each flattened per sample, which is exactly what a reuse step would replay. Graph
breaks are tolerated: each graph is tagged on its own and blocks are identified by module path.

Note [Classifier-free guidance in the analysis]
``analyze`` calls the model as ``DiTPipeline`` does: with ``guidance_scale > 1`` one call per step
on the doubled batch ``[x; x]`` (``make_inputs`` must return ``[cond; uncond]`` conditioning for
it), and the guided prediction ``uncond + scale * (cond - uncond)`` is stepped. The statistics
cover every row of that call, cond and uncond samples alike, since a batched-CFG cache holds and
replays both halves. Should a model call run several times within one step (e.g. a custom
``model`` wrapper calling the transformer for each branch), each call of the step is compared
with the call at the same position in the previous step, and the step's value is the mean.
The loop is ``bd_compile.sampling.denoise`` (Note [Classifier-free guidance] there).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.fx as fx

from bd_compile.analysis.result import Analysis
from bd_compile.analysis.stats import DEFAULT_MAX_VALUES, StatsSink, x0_ssim
from bd_compile.sampling import MakeInputs, StepInfo, denoise
from passes.tag_blocks import BLOCK_META, tag_blocks

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# The recording backend
# --------------------------------------------------------------------------------------------


def _float_tensor(node: fx.Node) -> bool:
    v = node.meta.get("example_value")
    return isinstance(v, torch.Tensor) and v.is_floating_point()


def block_outputs(gm: fx.GraphModule) -> list[tuple[str, str, list[fx.Node]]]:
    """Tag ``gm``'s blocks (``passes.tag_blocks``) and return each block's output nodes.

    A block's outputs are its floating-point nodes used by any node outside the block, in graph
    order. Tags ``gm`` in place; pass a copy if the graph is needed untagged.
    """
    found = []
    for block in tag_blocks(gm):
        outs = [
            n
            for n in block.nodes
            if _float_tensor(n) and any(u.meta.get(BLOCK_META) != block.index for u in n.users)
        ]
        if outs:
            found.append((block.name, block.cls, outs))
        else:
            log.warning("blockdance analysis: block %s has no tensor output; skipped", block.name)
    return found


def recording_backend(sink: StatsSink) -> Callable[..., Callable[..., Any]]:
    """A Dynamo backend ``(gm, example_inputs, **kw)`` that runs ``gm`` eagerly and records.

    See Note [Recording with the pass's own block tagging].
    """

    def backend(gm: fx.GraphModule, example_inputs: list[Any], **kwargs: Any) -> Callable[..., Any]:
        graph = fx.Graph()
        out_value = graph.graph_copy(gm.graph, {})  # every node but the output (meta copied)
        rec = fx.GraphModule(gm, graph)
        found = block_outputs(rec)
        if not found:
            log.info("blockdance analysis: a graph without blocks (%d nodes)", len(graph.nodes))
            return gm.forward
        extras: list[fx.Node] = []
        spec: list[tuple[str, str, int]] = []
        for name, cls, outs in found:
            for n in outs:
                # A clone taken right after the value is made, so that no later in-place op
                # (or a view of a buffer reused later) changes what is recorded.
                with graph.inserting_after(n):
                    extras.append(graph.call_function(torch.clone, (n,)))
            spec.append((name, cls, len(outs)))
        graph.output((out_value, tuple(extras)))
        rec.recompile()
        log.debug("blockdance analysis: recording %s", [s[0] for s in spec])

        def run(*args: Any) -> Any:
            original, values = rec(*args)
            i = 0
            for name, cls, count in spec:
                sink.record(name, cls, values[i : i + count])
                i += count
            return original

        return run

    return backend


# --------------------------------------------------------------------------------------------
# The analysis run
# --------------------------------------------------------------------------------------------


@contextmanager
def _progress(total: int, enabled: bool, desc: str) -> Iterator[Callable[[], None]]:
    if not enabled:
        yield lambda: None
        return
    try:
        from tqdm.auto import tqdm  # optional: a progress bar where tqdm is installed
    except ImportError:  # pragma: no cover - tqdm ships with huggingface_hub
        done = [0]

        def tick() -> None:
            done[0] += 1
            log.info("%s: step %d/%d", desc, done[0], total)

        yield tick
        return
    bar = tqdm(total=total, desc=desc, unit="step")
    try:
        yield lambda: bar.update(1)
    finally:
        bar.close()


@torch.no_grad()
def analyze(
    model: torch.nn.Module,
    scheduler: Any,
    make_inputs: MakeInputs,
    latents: torch.Tensor,
    num_steps: int,
    *,
    guidance_scale: float = 4.0,
    chosen_block: int | None = None,
    progress: bool = True,
    max_values: int = DEFAULT_MAX_VALUES,
    x0_data_range: float | None = None,
    output: Callable[[Any], torch.Tensor] | None = None,
    seed: int = 0,
) -> Analysis:
    """Denoise ``latents`` with ``scheduler`` and measure every block on every step.

    Args:
        model: the transformer (called as ``model(**make_inputs(x, t))``); not modified.
        scheduler: a diffusers scheduler; ``set_timesteps(num_steps)`` is called on it.
        make_inputs: ``(latents_batch, t_1d) -> kwargs``. ``t_1d`` is the scheduler's timestep
            expanded to the batch (as ``DiTPipeline`` passes it). With ``guidance_scale > 1``
            the batch is ``[x; x]`` and the kwargs must condition it as ``[cond; uncond]``.
        latents: the initial noise ``[B, ...]`` (scaled by ``init_noise_sigma`` here).
        guidance_scale: CFG scale; ``<= 1`` runs the conditional branch only.
        chosen_block: block (execution order) whose step x step matrix is kept; default the
            block at 75% depth (the backend's default ``cache_block``).
        max_values: values kept per step for the chosen block (Note [Streaming statistics]).
        x0_data_range: SSIM data range for x0; default from the data (Note [x0 SSIM]).
        output: extracts the prediction from the model output (default: the first tensor,
            learned-sigma channels dropped).
        seed: seeds the chosen block's coordinate subset.
    """
    if num_steps < 2:
        raise ValueError(
            f"expected num_steps >= 2 (statistics compare adjacent steps), got {num_steps}"
        )
    sink = StatsSink(chosen_block, max_values=max_values, seed=seed)
    compiled = torch.compile(model, backend=recording_backend(sink), dynamic=False)
    timesteps: list[float] = []
    ssim_values: list[float] = []
    prev_x0: list[torch.Tensor | None] = [None]
    started = time.perf_counter()
    name = type(model).__name__

    def before_call(step: int, rows: int) -> None:
        if step == len(timesteps):  # first call of a new step
            sink.begin_step(step)
            timesteps.append(math.nan)
        sink.begin_call(rows)

    with _progress(num_steps, progress, f"analyzing {name}") as tick:

        def after_step(info: StepInfo) -> None:
            timesteps[info.step] = info.timestep
            a, b = info.x0, prev_x0[0]
            if a is not None and b is not None:
                ssim_values.append(x0_ssim(a, b, x0_data_range))
            else:
                ssim_values.append(math.nan)
            prev_x0[0] = a
            sink.end_step()
            tick()

        denoise(
            compiled,
            scheduler,
            make_inputs,
            latents,
            num_steps,
            guidance_scale=guidance_scale,
            output=output,
            before_call=before_call,
            after_step=after_step,
        )
    sink.finish()
    if not sink.names:
        raise ValueError(
            f"expected transformer blocks in the graph Dynamo captured from {name}, found none "
            "(or the recording backend was never called: Dynamo cache limit?)"
        )
    return Analysis.from_sink(
        sink,
        timesteps=timesteps,
        x0_ssim=ssim_values,
        meta={
            "model": name,
            "scheduler": type(scheduler).__name__,
            "num_steps": len(timesteps),
            "guidance_scale": guidance_scale,
            "batch": int(latents.shape[0]),
            "latent_shape": list(latents.shape[1:]),
            "cfg": "batched" if guidance_scale > 1.0 else "none",
            "x0_data_range": "per pair (max - min)" if x0_data_range is None else x0_data_range,
            "seconds": round(time.perf_counter() - started, 3),
        },
    )
