"""Measure the STSS pattern of any DiT: how much each block's output changes between steps.

BlockDance rests on one observation (the paper's Figs. 2-3): between adjacent denoising steps the
outputs of the shallow and middle blocks barely change once the structure has formed, while the
deep blocks keep changing. ``analyze`` measures that on *your* model and sampler, and
``bd_compile.calibration.calibrate`` turns the measurement into a ``cache_block`` and a window.

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

Note [Streaming statistics]
Memory is bounded by one model call: per block only the previous step's output is kept. Per step
``s >= 1`` and block ``k``, with ``a`` the output at step ``s`` and ``b`` at step ``s - 1``, both
flattened per sample (rows of the model's batch):

- cosine similarity ``<a, b> / (|a| |b|)`` per sample, then the mean over samples;
- relative L2 distance ``|a - b| / |b|`` per sample, then the mean.

Step 0 has no predecessor and is NaN. For one *chosen* block (default: the block at 75% depth,
the backend's default ``cache_block``) a fixed random subset of at most ``max_values`` values
(``max_values // rows`` coordinates per sample, same coordinates every step) is kept per step,
from which the step x step cosine-similarity matrix is built (per sample, then the mean); a
random coordinate subset gives an unbiased estimate of the dot products the full cosine uses.

Note [Classifier-free guidance in the analysis]
``analyze`` calls the model as ``DiTPipeline`` does: with ``guidance_scale > 1`` one call per step
on the doubled batch ``[x; x]`` (``make_inputs`` must return ``[cond; uncond]`` conditioning for
it), and the guided prediction ``uncond + scale * (cond - uncond)`` is stepped. The statistics
cover every row of that call, cond and uncond samples alike, since a batched-CFG cache holds and
replays both halves. Should a model call run several times within one step (e.g. a custom
``model`` wrapper calling the transformer for each branch), each call of the step is compared
with the call at the same position in the previous step, and the step's value is the mean.

Note [x0 SSIM]
The predicted clean sample x0 of each step is the scheduler's ``pred_original_sample`` when its
``step`` returns one (DDIM, DDPM, Euler); otherwise it is computed from the prediction with the
scheduler's ``alphas_cumprod`` (epsilon, v and sample prediction: DPM-Solver) or ``sigmas``
(flow matching: ``x0 = x - sigma * v``). The SSIM of adjacent steps' x0 uses
``bd_compile.metrics.ssim`` with ``data_range`` = max - min over both x0 of the pair (the whole
batch) unless one is given: a range taken from the data makes the value independent of the
latent scale (SSIM(k a, k b, k L) = SSIM(a, b, L)), so the very noisy early x0 predictions,
whose range can be 100x the final image's, are judged on their own scale. x0 of shape
``[B, ..., C, H, W]`` is compared as images ``[N, C, H, W]``; packed token latents (Flux) have no
image layout and get NaN.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from bd_compile.settings import default_cache_block
from passes.tag_blocks import BLOCK_META, tag_blocks

log = logging.getLogger(__name__)

ANALYSIS_FORMAT = "bd_compile.analysis/1"
DEFAULT_MAX_VALUES = 4096
_EPS = 1e-12

MakeInputs = Callable[[torch.Tensor, torch.Tensor], dict[str, Any]]


# --------------------------------------------------------------------------------------------
# Per-sample statistics
# --------------------------------------------------------------------------------------------


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).to(torch.float64)


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each row pair, float64 ``[R]``; rows are the first dimension.

    Zero vectors count as norm ``1e-12`` (so a zero row has similarity 0 to anything).
    """
    if a.shape != b.shape:
        raise ValueError(
            f"expected tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    x, y = _rows(a), _rows(b)
    dot = (x * y).sum(dim=1)
    return dot / (x.norm(dim=1).clamp_min(_EPS) * y.norm(dim=1).clamp_min(_EPS))


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``|a - b| / |b|`` of each row pair, float64 ``[R]`` (``b`` is the reference)."""
    if a.shape != b.shape:
        raise ValueError(
            f"expected tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    x, y = _rows(a), _rows(b)
    return (x - y).norm(dim=1) / y.norm(dim=1).clamp_min(_EPS)


def cosine_matrix(steps: torch.Tensor) -> torch.Tensor:
    """Step x step cosine similarity of ``[S, R, F]`` features: per row (sample), then the mean."""
    if steps.dim() != 3:
        raise ValueError(f"expected features [S, R, F], got shape {tuple(steps.shape)}")
    x = steps.to(torch.float64)
    x = x / x.norm(dim=2, keepdim=True).clamp_min(_EPS)
    return torch.einsum("srf,urf->sur", x, x).mean(dim=2)


# --------------------------------------------------------------------------------------------
# The statistics sink
# --------------------------------------------------------------------------------------------


@dataclass
class _Call:
    rows: int
    values: dict[str, torch.Tensor] = field(default_factory=dict)


class StatsSink:
    """Receives every block's output per model call and keeps the streaming statistics.

    Protocol (driven by ``analyze``): ``begin_step(step)`` once per denoising step,
    ``begin_call(rows)`` before each model call of the step, ``record(block, cls, tensors)``
    from the recording backend for each block of the call, ``end_step()``, and ``finish()``.
    """

    def __init__(
        self, chosen_block: int | None = None, max_values: int = DEFAULT_MAX_VALUES, seed: int = 0
    ) -> None:
        if max_values < 1:
            raise ValueError(f"expected max_values >= 1, got {max_values}")
        self.requested_block = chosen_block
        self.max_values = max_values
        self.seed = seed
        self.names: list[str] = []
        self.classes: dict[str, str] = {}
        self.features: dict[str, int] = {}
        self.cosine: list[dict[str, float]] = []
        self.rel_l2: list[dict[str, float]] = []
        self.chosen: str | None = None
        self._chosen_index: torch.Tensor | None = None
        self.chosen_values: list[torch.Tensor] = []
        self._prev: list[_Call] = []
        self._calls: list[_Call] = []
        self._step = -1
        self._warned: set[str] = set()

    # -- protocol -------------------------------------------------------------------------
    def begin_step(self, step: int) -> None:
        self._step = step
        self._calls = []

    def begin_call(self, rows: int) -> None:
        self._calls.append(_Call(rows))

    def record(self, name: str, cls: str, tensors: Sequence[torch.Tensor]) -> None:
        if not self._calls:
            raise RuntimeError("StatsSink.record called outside a model call (begin_call missing)")
        call = self._calls[-1]
        if name not in self.classes:
            self.names.append(name)
            self.classes[name] = cls
            if self._step > 0:
                self._warn(
                    name, "block %s first seen at step %d; earlier steps are NaN", self._step
                )
        if name in call.values:
            self._warn(name, "block %s recorded twice in one call (graph break inside it?)")
        call.values[name] = self._flatten(name, call.rows, tensors)

    def end_step(self) -> None:
        cos_row: dict[str, float] = {}
        l2_row: dict[str, float] = {}
        for name in self.names:
            pairs = [
                (cur.values[name], prev.values[name])
                for cur, prev in zip(self._calls, self._prev, strict=False)
                if name in cur.values
                and name in prev.values
                and cur.values[name].shape == prev.values[name].shape
            ]
            if pairs:
                cos_row[name] = float(torch.cat([cosine_similarity(a, b) for a, b in pairs]).mean())
                l2_row[name] = float(torch.cat([relative_l2(a, b) for a, b in pairs]).mean())
        self.cosine.append(cos_row)
        self.rel_l2.append(l2_row)
        self._keep_chosen()
        self._prev = self._calls
        self._calls = []

    def finish(self) -> None:
        """Drop the kept outputs (only the statistics remain)."""
        self._prev = []
        self._calls = []

    # -- helpers --------------------------------------------------------------------------
    def _warn(self, key: str, msg: str, *args: object) -> None:
        """Log ``msg % (key, *args)`` once per key."""
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, key, *args)

    def _flatten(self, name: str, rows: int, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        parts = []
        for t in tensors:
            if t.numel() % rows:
                self._warn(
                    name,
                    "block %s: an output of shape %s does not split into %d samples; "
                    "measuring it as one sample",
                    tuple(t.shape),
                    rows,
                )
                rows = 1
        for t in tensors:
            parts.append(t.detach().reshape(rows, -1).float())
        value = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        self.features.setdefault(name, value.shape[1])
        return value

    def _keep_chosen(self) -> None:
        if self.chosen is None and self.names:
            n = len(self.names)
            k = self.requested_block if self.requested_block is not None else default_cache_block(n)
            if not 0 <= k < n:
                raise ValueError(f"expected 0 <= chosen_block < {n} (blocks found), got {k}")
            self.chosen = self.names[k]
        if self.chosen is None:
            return
        values = [c.values[self.chosen] for c in self._calls if self.chosen in c.values]
        if not values:
            self.chosen_values.append(torch.full((1, 1), math.nan))
            return
        v = (
            torch.cat(values, dim=0)
            if all(x.shape[1] == values[0].shape[1] for x in values)
            else values[0]
        )
        if self._chosen_index is None:
            per_row = max(1, min(v.shape[1], self.max_values // v.shape[0]))
            gen = torch.Generator().manual_seed(self.seed)
            perm = torch.randperm(v.shape[1], generator=gen)[:per_row]
            self._chosen_index = perm.sort().values
        self.chosen_values.append(v[:, self._chosen_index.to(v.device)].cpu())


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
# The sampling loop
# --------------------------------------------------------------------------------------------


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample  # type: ignore[no-any-return]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"expected a tensor, a tuple or an output with .sample, got {type(out)}")


def _prediction(out: Any, latents: torch.Tensor) -> torch.Tensor:
    """The model's prediction, learned-sigma half dropped (DiT outputs 2C channels)."""
    pred = _first_tensor(out)
    if (
        pred.dim() == latents.dim()
        and pred.shape[1] == 2 * latents.shape[1]
        and pred.shape[2:] == latents.shape[2:]
    ):
        pred = pred[:, : latents.shape[1]]
    return pred


def _x0(
    scheduler: Any, step_out: Any, pred: torch.Tensor, x: torch.Tensor, t: Any, step: int
) -> torch.Tensor | None:
    """x0 predicted at this step (Note [x0 SSIM])."""
    x0 = getattr(step_out, "pred_original_sample", None)
    if isinstance(x0, torch.Tensor):
        return x0
    cfg = getattr(scheduler, "config", {})
    kind = getattr(cfg, "prediction_type", None) or "epsilon"
    if "FlowMatch" in type(scheduler).__name__ and hasattr(scheduler, "sigmas"):
        sigma = scheduler.sigmas[step].to(x.device, torch.float32)
        return x - sigma * pred
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if alphas is None:
        return None
    a = alphas[int(t)].to(x.device, torch.float32)
    if kind == "epsilon":
        return (x - (1 - a).sqrt() * pred) / a.sqrt()
    if kind == "v_prediction":
        return a.sqrt() * x - (1 - a).sqrt() * pred
    if kind == "sample":
        return pred
    return None


def _as_images(x: torch.Tensor) -> torch.Tensor | None:
    if x.dim() < 4:
        return None
    img = x.reshape(-1, *x.shape[-3:]).float()
    return img if min(img.shape[-2:]) >= 2 else None


def x0_ssim(a: torch.Tensor, b: torch.Tensor, data_range: float | None = None) -> float:
    """Mean SSIM between two x0 predictions (Note [x0 SSIM]); NaN if they are not images."""
    from bd_compile.metrics import ssim

    ia, ib = _as_images(a), _as_images(b)
    if ia is None or ib is None:
        return math.nan
    if data_range is None:
        both = torch.stack([ia, ib])
        data_range = float(both.max() - both.min())
        if data_range <= 0:
            return 1.0 if torch.equal(ia, ib) else 0.0
    window = min(11, 2 * min(ia.shape[-2:]) - 1)
    window -= 1 - window % 2
    return float(ssim(ia, ib, data_range=data_range, window_size=window).mean())


@contextmanager
def _progress(total: int, enabled: bool, desc: str) -> Iterator[Callable[[], None]]:
    if not enabled:
        yield lambda: None
        return
    try:
        from tqdm.auto import tqdm
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


@dataclass(frozen=True)
class StepInfo:
    """What ``denoise`` hands ``after_step``: the step, its timestep and the predicted x0."""

    step: int
    timestep: float
    x0: torch.Tensor | None


@torch.no_grad()
def denoise(
    model: Callable[..., Any],
    scheduler: Any,
    make_inputs: MakeInputs,
    latents: torch.Tensor,
    num_steps: int,
    *,
    guidance_scale: float = 4.0,
    output: Callable[[Any], torch.Tensor] | None = None,
    before_call: Callable[[int, int], None] | None = None,
    after_step: Callable[[StepInfo], None] | None = None,
) -> torch.Tensor:
    """The diffusers sampling loop ``analyze`` uses (Note [Classifier-free guidance in the
    analysis]); returns the final latents. ``before_call(step, rows)`` runs before each model
    call, ``after_step(info)`` after each scheduler step. Arguments as ``analyze``."""
    scheduler.set_timesteps(num_steps)
    x = latents * getattr(scheduler, "init_noise_sigma", 1.0)
    use_cfg = guidance_scale > 1.0
    for i, t in enumerate(scheduler.timesteps):
        x_in = torch.cat([x, x]) if use_cfg else x
        if hasattr(scheduler, "scale_model_input"):
            x_in = scheduler.scale_model_input(x_in, t)
        t_1d = t.reshape(1).expand(x_in.shape[0]).to(x.device)
        if before_call is not None:
            before_call(i, x_in.shape[0])
        out = model(**make_inputs(x_in, t_1d))
        pred = output(out) if output is not None else _prediction(out, x)
        if use_cfg:
            cond, uncond = pred.chunk(2)
            pred = uncond + guidance_scale * (cond - uncond)
        step_out = scheduler.step(pred, t, x, return_dict=True)
        x0 = _x0(scheduler, step_out, pred, x, t, i) if after_step is not None else None
        x = step_out.prev_sample
        if after_step is not None:
            after_step(StepInfo(i, float(t), x0))
    return x


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


# --------------------------------------------------------------------------------------------
# The result
# --------------------------------------------------------------------------------------------


def _span(first: int, last: int) -> str:
    return f"block {first}" if first == last else f"blocks {first}-{last}"


def _nan_list(a: np.ndarray) -> Any:
    """A JSON-safe nested list: NaN/inf -> None."""
    if a.ndim == 0:
        v = float(a)
        return v if math.isfinite(v) else None
    return [_nan_list(x) for x in a]


def _from_nan_list(x: Any) -> np.ndarray:
    def conv(v: Any) -> Any:
        if isinstance(v, list):
            return [conv(u) for u in v]
        return math.nan if v is None else float(v)

    return np.asarray(conv(x), dtype=np.float64)


@dataclass
class Analysis:
    """Per block x step statistics of one sampling run (see ``analyze``).

    Arrays (``L`` blocks, ``S`` steps; column ``s`` compares step ``s`` with step ``s - 1``, so
    column 0 is NaN):

    - ``cosine [L, S]``, ``rel_l2 [L, S]``: adjacent-step statistics per block;
    - ``step_cosine [S, S]``: cosine similarity of the chosen block across all step pairs;
    - ``x0_ssim [S]``: SSIM of the x0 predictions of steps ``s`` and ``s - 1``.
    """

    block_names: list[str]
    block_classes: list[str]
    timesteps: np.ndarray
    cosine: np.ndarray
    rel_l2: np.ndarray
    chosen_block: int
    step_cosine: np.ndarray
    x0_ssim: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_blocks(self) -> int:
        return len(self.block_names)

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def model(self) -> str:
        return str(self.meta.get("model", "unknown"))

    @classmethod
    def from_sink(
        cls,
        sink: StatsSink,
        timesteps: Sequence[float],
        x0_ssim: Sequence[float],
        meta: dict[str, Any],
    ) -> Analysis:
        steps = len(timesteps)
        cos = np.full((len(sink.names), steps), np.nan)
        l2 = np.full_like(cos, np.nan)
        for s in range(steps):
            for k, name in enumerate(sink.names):
                cos[k, s] = sink.cosine[s].get(name, np.nan)
                l2[k, s] = sink.rel_l2[s].get(name, np.nan)
        chosen = sink.names.index(sink.chosen) if sink.chosen is not None else 0
        shapes = {tuple(v.shape) for v in sink.chosen_values}
        if len(shapes) == 1:
            mat = cosine_matrix(torch.stack(sink.chosen_values)).numpy()
        else:
            mat = np.full((steps, steps), np.nan)
        meta = {**meta, "features": {n: sink.features.get(n) for n in sink.names}}
        return cls(
            block_names=list(sink.names),
            block_classes=[sink.classes[n] for n in sink.names],
            timesteps=np.asarray(timesteps, dtype=np.float64),
            cosine=cos,
            rel_l2=l2,
            chosen_block=chosen,
            step_cosine=mat,
            x0_ssim=np.asarray(x0_ssim, dtype=np.float64),
            meta=meta,
        )

    # -- serialisation --------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format": ANALYSIS_FORMAT,
            "meta": self.meta,
            "block_names": self.block_names,
            "block_classes": self.block_classes,
            "timesteps": _nan_list(self.timesteps),
            "chosen_block": self.chosen_block,
            "cosine": _nan_list(self.cosine),
            "rel_l2": _nan_list(self.rel_l2),
            "step_cosine": _nan_list(self.step_cosine),
            "x0_ssim": _nan_list(self.x0_ssim),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Analysis:
        if not isinstance(data, dict) or data.get("format") != ANALYSIS_FORMAT:
            got = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"expected an analysis with format {ANALYSIS_FORMAT!r}, got {got!r}")
        return cls(
            block_names=list(data["block_names"]),
            block_classes=list(data["block_classes"]),
            timesteps=_from_nan_list(data["timesteps"]),
            cosine=_from_nan_list(data["cosine"]).reshape(len(data["block_names"]), -1),
            rel_l2=_from_nan_list(data["rel_l2"]).reshape(len(data["block_names"]), -1),
            chosen_block=int(data["chosen_block"]),
            step_cosine=_from_nan_list(data["step_cosine"]),
            x0_ssim=_from_nan_list(data["x0_ssim"]),
            meta=dict(data.get("meta", {})),
        )

    @classmethod
    def load(cls, path: str | Path) -> Analysis:
        """Read an ``analysis.json`` written by ``save`` (a file or its folder)."""
        p = Path(path)
        if p.is_dir():
            p = p / "analysis.json"
        return cls.from_json(json.loads(p.read_text()))

    # -- the report ---------------------------------------------------------------------------
    def summary(self, calibration: Any | None = None) -> str:
        """One plain-English paragraph: is there an STSS pattern, where, what calibration picks."""
        L, S = self.num_blocks, self.num_steps
        late = int(math.ceil(0.4 * S))
        split = max(1, min(L - 1, round(0.75 * L)))
        cos = self.cosine

        def mean(a: np.ndarray) -> float:
            a = a[np.isfinite(a)]
            return float(a.mean()) if a.size else math.nan

        early_c, late_c = mean(cos[:, 1:late]), mean(cos[:, late:])
        shallow_late, deep_late = mean(cos[:split, late:]), mean(cos[split:, late:])
        shallow_early = mean(cos[:split, 1:late])
        per_block = [mean(cos[k, late:]) for k in range(L)]
        order = sorted(range(L), key=lambda k: -per_block[k] if math.isfinite(per_block[k]) else 0)
        top = ", ".join(f"{k} ({per_block[k]:.4f})" for k in order[:3])
        per_step = [mean(cos[:, s]) for s in range(S)]
        best_steps = sorted(
            (s for s in range(1, S) if math.isfinite(per_step[s])), key=lambda s: -per_step[s]
        )[:3]
        stss = late_c > early_c and shallow_late >= deep_late
        parts = [
            f"{self.model}: {L} blocks, {S} steps ({self.meta.get('scheduler', '?')}, guidance "
            f"{self.meta.get('guidance_scale', '?')}).",
            (
                "There is an STSS pattern: adjacent steps are more similar in the later part of "
                "denoising than early on, and shallow/middle blocks more than deep ones."
                if stss
                else "The STSS pattern is weak or absent here: "
                + (
                    "late steps are not more similar than early ones"
                    if late_c <= early_c
                    else "the deep blocks are as stable as the shallow/middle ones"
                )
                + "."
            ),
            f"Mean adjacent-step cosine similarity is {early_c:.4f} before 40% of the steps and "
            f"{late_c:.4f} after; after 40%, {_span(0, split - 1)} (shallow/middle) average "
            f"{shallow_late:.4f} (vs {shallow_early:.4f} before) and {_span(split, L - 1)} "
            f"(deep) {deep_late:.4f}.",
            f"The most similar blocks after 40% are {top}; the most similar steps "
            f"(mean over blocks) are {', '.join(str(s) for s in best_steps)}.",
        ]
        finite_ssim = self.x0_ssim[np.isfinite(self.x0_ssim)]
        if finite_ssim.size:
            parts.append(
                f"The SSIM of adjacent steps' predicted x0 goes from {finite_ssim[0]:.3f} "
                f"(step 1) to {finite_ssim[-1]:.3f} (last step), first reaching 0.9 at step "
                f"{next((i + 1 for i, v in enumerate(finite_ssim) if v >= 0.9), 'never')}."
            )
        from bd_compile.calibration import DEFAULT_THRESHOLD

        thr = calibration.threshold if calibration is not None else DEFAULT_THRESHOLD

        def share(a: np.ndarray) -> str:
            a = a[np.isfinite(a)]
            return f"{(a >= thr).mean():.0%}" if a.size else "n/a"

        parts.append(
            f"Do the shallow/middle blocks stabilise after ~40% of the steps? "
            f"{share(cos[:split, late:])} of their adjacent-step similarities there are >= "
            f"{thr} (before 40%: {share(cos[:split, 1:late])}; deep blocks after 40%: "
            f"{share(cos[split:, late:])})."
        )
        if calibration is not None:
            c = calibration
            rule = f"cosine >= {c.threshold}"
            if getattr(c, "structure_threshold", None) is not None:
                rule += f" and x0 SSIM >= {c.structure_threshold}"
            if c.window[0] >= c.window[1]:
                parts.append(
                    f"Calibration ({rule}) found no block and no stretch of steps stable enough "
                    "to reuse: it picks an empty window (no reuse steps)."
                )
            else:
                parts.append(
                    f"Calibration ({rule} up to {c.window[1]:.0%} of the steps) picks "
                    f"cache_block = {c.cache_block} ({self.block_names[c.cache_block]}: "
                    f"{_span(0, c.cache_block)} skipped on reuse steps) with window "
                    f"{c.window[0]:.2f}-{c.window[1]:.2f}."
                )
        return " ".join(parts)

    def save(self, out_dir: str | Path, calibration: Any | None = None) -> dict[str, Path]:
        """Write the figures, ``analysis.json`` and ``summary.txt``; return their paths.

        ``calibration`` (a ``Calibration``) is reported in the summary and the JSON; by default
        ``calibrate(self)`` with its default threshold.
        """
        from bd_compile.calibration import calibrate

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        cal = calibration if calibration is not None else calibrate(self)
        paths = _plot(self, out)
        data = self.to_json()
        data["calibration"] = cal.to_json()
        paths["json"] = out / "analysis.json"
        paths["json"].write_text(json.dumps(data, indent=1) + "\n")
        paths["summary"] = out / "summary.txt"
        paths["summary"].write_text(self.summary(cal) + "\n")
        log.info("blockdance analysis written to %s", out)
        return paths


# --------------------------------------------------------------------------------------------
# Figures (matplotlib's object API: no pyplot state, no GUI backend)
# --------------------------------------------------------------------------------------------


def _plot(a: Analysis, out: Path) -> dict[str, Path]:
    try:
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("Analysis.save needs matplotlib: pip install matplotlib") from e

    paths: dict[str, Path] = {}
    L, S = a.num_blocks, a.num_steps
    labels = [f"{k} {n}" if L <= 40 else str(k) for k, n in enumerate(a.block_names)]

    def heatmap(data: np.ndarray, title: str, bar: str, name: str, cmap: str) -> None:
        fig = Figure(figsize=(max(6.0, 0.18 * S + 3), max(3.5, 0.25 * L + 1.5)), dpi=110)
        ax = fig.subplots()
        finite = data[:, 1:][np.isfinite(data[:, 1:])]
        vmin = float(finite.min()) if finite.size else 0.0
        vmax = float(finite.max()) if finite.size else 1.0
        im = ax.imshow(
            np.ma.masked_invalid(data),
            aspect="auto",
            origin="lower",
            cmap=cmap,
            vmin=vmin,
            vmax=vmax,
            interpolation="nearest",
        )
        ax.set_xlabel("denoising step s (compared with step s-1)")
        ax.set_ylabel("block (execution order)")
        ax.set_yticks(range(L), labels, fontsize=6 if L > 16 else 8)
        ax.set_title(title)
        fig.colorbar(im, ax=ax, label=bar)
        fig.tight_layout()
        paths[name] = out / f"{name}.png"
        fig.savefig(paths[name])

    heatmap(
        a.cosine,
        f"{a.model}: cosine similarity to the previous step",
        "cosine similarity",
        "block_step_cosine",
        "viridis",
    )
    heatmap(
        a.rel_l2,
        f"{a.model}: relative L2 distance to the previous step",
        "|a - b| / |b|",
        "block_step_rel_l2",
        "magma_r",
    )

    fig = Figure(figsize=(5.5, 4.5), dpi=110)
    ax = fig.subplots()
    im = ax.imshow(
        np.ma.masked_invalid(a.step_cosine), origin="upper", cmap="viridis", interpolation="nearest"
    )
    ax.set_xlabel("step")
    ax.set_ylabel("step")
    ax.set_title(
        f"block {a.chosen_block} ({a.block_names[a.chosen_block]}): step x step cosine", fontsize=9
    )
    fig.colorbar(im, ax=ax, label="cosine similarity")
    fig.tight_layout()
    paths["step_cosine"] = out / f"step_cosine_block{a.chosen_block}.png"
    fig.savefig(paths["step_cosine"])

    fig = Figure(figsize=(6, 3.5), dpi=110)
    ax = fig.subplots()
    ax.plot(range(S), a.x0_ssim, marker="o", markersize=3)
    ax.set_xlabel("denoising step s")
    ax.set_ylabel("SSIM(x0[s], x0[s-1])")
    ax.set_title(f"{a.model}: SSIM of adjacent steps' predicted x0")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths["x0_ssim"] = out / "x0_ssim.png"
    fig.savefig(paths["x0_ssim"])
    return paths
