"""The one sampling loop of the project, its scheduler factory and the reference-model loader.

The demo, the STSS analysis (``bd_compile.analysis``) and the benchmarks (speed, quality,
threshold sweep, the reference model's training and evaluation) all sample through ``denoise``,
so a number measured by one of them is a number about the same loop.

Note [Classifier-free guidance]
``denoise`` calls the model as diffusers' ``DiTPipeline`` does: with ``guidance_scale > 1`` (the
rule of diffusers' pipelines, ``do_classifier_free_guidance``) one call per step on the doubled
batch ``[x; x]`` (``make_inputs`` must condition it as ``[cond; uncond]``), and the guided
prediction ``uncond + scale * (cond - uncond)`` is stepped. With ``guidance_scale <= 1`` only the
conditional branch runs, on ``x`` alone. (``benchmarks.reference.sampling.sample`` used to run
CFG for any scale != 1, i.e. also below 1; every shipped number uses scale 3.0 or 4.5, where the
two rules agree.) The prediction is cast to the latents' dtype before guidance, so float32
latents are stepped in float32 whatever the model computes in.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import torch

# Concrete module paths (not ``from diffusers import ...``): diffusers' lazy top-level module
# resolves to dummy classes under mypy.
from diffusers.models.transformers.dit_transformer_2d import DiTTransformer2DModel
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler

from bd_compile.data import REFERENCE_MODEL

log = logging.getLogger(__name__)

__all__ = [
    "DIT_SCHEDULER_CONFIG",
    "REFERENCE_MODEL",
    "MakeInputs",
    "SamplerName",
    "StepInfo",
    "denoise",
    "load_reference",
    "make_scheduler",
    "predicted_x0",
]

SamplerName = Literal["ddim", "dpm"]
SAMPLERS: tuple[SamplerName, ...] = ("ddim", "dpm")
SCHEDULER_SUBFOLDER = "scheduler"
#: ``(latents_batch, t_1d) -> kwargs`` of one model call (Note [Classifier-free guidance]).
MakeInputs = Callable[[torch.Tensor, torch.Tensor], dict[str, Any]]

# DiT-XL/2's (and PixArt-alpha's) DDPM training schedule: the sampler config used when a model
# folder has no scheduler config next to it.
DIT_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "prediction_type": "epsilon",
    "clip_sample": False,
}


# --------------------------------------------------------------------------------------------
# Schedulers and the reference model
# --------------------------------------------------------------------------------------------


def make_scheduler(
    config: Mapping[str, Any] | None = None, sampler: SamplerName | str = "ddim"
) -> DDIMScheduler | DPMSolverMultistepScheduler:
    """A fresh sampling scheduler of kind ``sampler`` (``"ddim"``: DDIM, ``"dpm"``:
    DPM-Solver++ multistep) from a training scheduler's config (default: 1000 steps, each
    scheduler's own defaults otherwise)."""
    cfg = dict(config) if config is not None else {"num_train_timesteps": 1000}
    if sampler == "ddim":
        return DDIMScheduler.from_config(cfg)  # type: ignore[no-any-return]
    if sampler == "dpm":
        return DPMSolverMultistepScheduler.from_config(cfg)  # type: ignore[no-any-return]
    raise ValueError(f"expected sampler 'ddim' or 'dpm', got {sampler!r}")


def _scheduler_folder(folder: Path) -> Path | None:
    for candidate in (folder / SCHEDULER_SUBFOLDER, folder.parent / SCHEDULER_SUBFOLDER):
        if (candidate / "scheduler_config.json").is_file():
            return candidate
    return None


def load_reference(
    path: str | Path = REFERENCE_MODEL,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[DiTTransformer2DModel, DDPMScheduler]:
    """Load a saved class-conditional DiT (eval mode) and its training scheduler, offline.

    ``path`` is a ``save_pretrained`` folder of a ``DiTTransformer2DModel`` (default: the
    shipped reference model). The scheduler comes from ``<path>/scheduler`` or
    ``<path>/../scheduler``, else DiT's DDPM schedule (``DIT_SCHEDULER_CONFIG``).
    """
    folder = Path(path)
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"expected a diffusers model folder with config.json, got {folder}")
    class_name = json.loads(config.read_text()).get("_class_name")
    if class_name != DiTTransformer2DModel.__name__:
        raise ValueError(f"expected a saved DiTTransformer2DModel, got {class_name!r} in {config}")
    # low_cpu_mem_usage=False: diffusers' default (True) asks for accelerate and, without it,
    # warns on every load before falling back to this same path; a DiT this size loads as fast.
    model = DiTTransformer2DModel.from_pretrained(
        folder, local_files_only=True, torch_dtype=dtype, low_cpu_mem_usage=False
    )
    cast(torch.nn.Module, model).to(device=device).eval()
    found = _scheduler_folder(folder)
    if found is None:
        log.info("no scheduler config next to %s: using DiT's DDPM schedule", folder)
        scheduler = DDPMScheduler.from_config(DIT_SCHEDULER_CONFIG)
    else:
        scheduler = DDPMScheduler.from_pretrained(found, local_files_only=True)
    return model, scheduler


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample  # type: ignore[no-any-return]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"expected a tensor, a tuple or an output with .sample, got {type(out)}")


def prediction(out: Any, latents: torch.Tensor) -> torch.Tensor:
    """The model's prediction from its output, learned-sigma half dropped (DiT and PixArt
    output 2C channels for C latent channels)."""
    pred = _first_tensor(out)
    if (
        pred.dim() == latents.dim()
        and pred.shape[1] == 2 * latents.shape[1]
        and pred.shape[2:] == latents.shape[2:]
    ):
        pred = pred[:, : latents.shape[1]]
    return pred


def predicted_x0(
    scheduler: Any, step_out: Any, pred: torch.Tensor, x: torch.Tensor, t: Any, step: int
) -> torch.Tensor | None:
    """The clean sample x0 predicted at this step (see ``bd_compile.analysis``, Note [x0 SSIM]):
    the scheduler's ``pred_original_sample`` if its ``step`` returns one, else computed from the
    prediction; ``None`` if the scheduler gives no way to."""
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
    """Denoise ``latents`` in ``num_steps`` steps of ``scheduler``; return the final latents.

    Args:
        model: called as ``model(**make_inputs(x, t_1d))`` once per step.
        scheduler: a diffusers scheduler; ``set_timesteps(num_steps)`` is called on it.
        make_inputs: ``(latents_batch, t_1d) -> kwargs``; ``t_1d`` is the step's timestep
            expanded to the batch (as ``DiTPipeline`` passes it). With ``guidance_scale > 1``
            the batch is ``[x; x]`` and the kwargs must condition it as ``[cond; uncond]``
            (Note [Classifier-free guidance]).
        latents: the initial noise ``[B, ...]``, scaled by ``init_noise_sigma`` here.
        guidance_scale: CFG scale; ``<= 1`` runs the conditional branch only.
        output: extracts the prediction from the model output (default: the first tensor,
            learned-sigma channels dropped).
        before_call: ``(step, rows)`` before each model call.
        after_step: ``(StepInfo)`` after each scheduler step (x0 is computed only if given).
    """
    scheduler.set_timesteps(num_steps, device=latents.device)
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
        pred = (output(out) if output is not None else prediction(out, x)).to(x.dtype)
        if use_cfg:
            cond, uncond = pred.chunk(2)
            pred = uncond + guidance_scale * (cond - uncond)
        step_out = scheduler.step(pred, t, x, return_dict=True)
        x0 = predicted_x0(scheduler, step_out, pred, x, t, i) if after_step is not None else None
        x = step_out.prev_sample
        if after_step is not None:
            after_step(StepInfo(i, float(t), x0))
    return x
