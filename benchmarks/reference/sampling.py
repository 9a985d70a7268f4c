"""Build, load and sample the reference DiT the way the paper samples DiT-XL/2.

The loop is ``bd_compile.sampling.denoise`` (the one the library and every benchmark use);
``load_reference`` is ``bd_compile.sampling.load_reference``, re-exported here.
Sampling is classifier-free guidance with one batched forward per step: the model runs on
``[x; x]`` with class labels ``[y; NULL_CLASS]`` and the two halves are mixed as
``eps = uncond + scale * (cond - uncond)`` (diffusers' DiTPipeline does the same). Any diffusers
scheduler that accepts ``DDPMScheduler``'s config works: DDIM (the paper's DiT-XL/2 setting) and
DPM-Solver++ (the paper's PixArt-alpha setting) are the two named here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal

import torch

# Concrete module paths (not ``from diffusers import ...``): diffusers' lazy top-level module
# resolves to dummy classes under mypy.
from diffusers.models.transformers.dit_transformer_2d import DiTTransformer2DModel
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler
from torch import nn

from bd_compile.sampling import denoise, make_scheduler
from bd_compile.sampling import load_reference as load_reference  # re-exported: one loader
from benchmarks.reference.data import IMAGE_SIZE, NULL_CLASS, NUM_CLASSES

logger = logging.getLogger(__name__)

SCHEDULER_SUBFOLDER = "scheduler"
SamplerName = Literal["ddim", "dpm"]
SamplingScheduler = DDIMScheduler | DPMSolverMultistepScheduler
#: A denoiser ``(x_t, timesteps, class_labels) -> eps``, e.g. a compiled model's forward.
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def build_dit(
    num_layers: int = 12,
    num_attention_heads: int = 4,
    attention_head_dim: int = 32,
    patch_size: int = 4,
    *,
    in_channels: int = 1,
    sample_size: int = IMAGE_SIZE,
    num_classes: int = NUM_CLASSES,
) -> DiTTransformer2DModel:
    """The reference architecture: a class-conditional adaLN-Zero DiT on 1x28x28 pixels.

    Defaults give 49 tokens of width 128 through 12 blocks (about 4.2M parameters). The keyword
    arguments describe other data (the colour model: 3 channels, 32x32, 9 classes); the label
    tables get ``num_classes + 1`` rows, the last one the null class for CFG.
    """
    return DiTTransformer2DModel(
        num_attention_heads=num_attention_heads,
        attention_head_dim=attention_head_dim,
        in_channels=in_channels,
        out_channels=in_channels,
        num_layers=num_layers,
        sample_size=sample_size,
        patch_size=patch_size,
        num_embeds_ada_norm=num_classes,
    )


def init_dit_weights(model: DiTTransformer2DModel) -> None:
    """Initialise ``model`` in place as the DiT paper does (diffusers keeps PyTorch's defaults).

    Linear layers and the patch projection get Xavier-uniform weights and zero biases, the label
    and timestep embeddings N(0, 0.02), and every adaLN modulation plus the output projection
    are zeroed ("adaLN-Zero"): each block starts as the identity and the model predicts 0.
    """
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    proj = model.pos_embed.proj
    nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
    if proj.bias is not None:
        nn.init.zeros_(proj.bias)
    blocks: list[Any] = list(model.transformer_blocks)  # diffusers' attributes are untyped
    for block in blocks:
        emb = block.norm1.emb
        nn.init.normal_(emb.class_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(emb.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(emb.timestep_embedder.linear_2.weight, std=0.02)
        nn.init.zeros_(block.norm1.linear.weight)
        nn.init.zeros_(block.norm1.linear.bias)
    for layer in (model.proj_out_1, model.proj_out_2):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


def make_train_scheduler(
    beta_schedule: str = "squaredcos_cap_v2", num_train_timesteps: int = 1000
) -> DDPMScheduler:
    """The forward process used in training (``add_noise``); samplers are built from its config."""
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        prediction_type="epsilon",
        # No x0 clipping when sampling: with the cosine schedule the first DDIM steps predict x0
        # from alpha_bar ~ 1e-4, and clipping those guided predictions to [-1, 1] wrecked the
        # samples (class accuracy 11% at guidance 3 vs 100% unclipped, DDIM 50, 100 samples).
        clip_sample=False,
    )


def make_sampler(train_config: Any, sampler: SamplerName = "ddim") -> SamplingScheduler:
    """A fresh sampling scheduler of kind ``sampler`` built from the training scheduler's config
    (``bd_compile.sampling.make_scheduler``)."""
    return make_scheduler(train_config, sampler)


def model_denoiser(model: DiTTransformer2DModel) -> Denoiser:
    """Wrap ``model`` as a :data:`Denoiser` returning a plain tensor."""

    def denoise(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return model(x, timestep=t, class_labels=y, return_dict=False)[0]

    return denoise


@torch.no_grad()
def sample(
    denoiser: Denoiser | DiTTransformer2DModel,
    scheduler: SamplingScheduler,
    class_labels: torch.Tensor,
    num_inference_steps: int = 50,
    guidance_scale: float = 3.0,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    *,
    null_class: int | None = None,
    image_shape: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """Draw one image per label with batched classifier-free guidance.

    The loop is ``bd_compile.sampling.denoise`` (its Note [Classifier-free guidance]: CFG runs
    for ``guidance_scale > 1``).

    Args:
        denoiser: the model (or any :data:`Denoiser`, e.g. a compiled one).
        scheduler: a sampling scheduler (see :func:`make_sampler`); its timesteps are reset here.
        class_labels: int64 [N] in 0..9, on the device to sample on.
        guidance_scale: CFG scale; <= 1 runs the conditional branch only (no doubled batch).
        generator: seeds the initial noise when ``noise`` is not given.
        noise: the initial x_T, [N, 1, 28, 28]; overrides ``generator``.
        null_class: the CFG "no class" label; None = the model's ``num_embeds_ada_norm`` when
            ``denoiser`` is a DiT model, else MNIST's NULL_CLASS.
        image_shape: ``(C, H, W)`` of the noise drawn when ``noise`` is not given; None = from
            the model's config when ``denoiser`` is a DiT model, else MNIST's (1, 28, 28).

    Returns:
        float32 images [N, 1, 28, 28] (or ``[N, *image_shape]``) clamped to [-1, 1].
    """
    if isinstance(denoiser, DiTTransformer2DModel):
        fn = model_denoiser(denoiser)
        config = denoiser.config
        null_class = int(config["num_embeds_ada_norm"]) if null_class is None else null_class
        if image_shape is None:
            size = int(config["sample_size"])
            image_shape = (int(config["in_channels"]), size, size)
    else:
        fn = denoiser
    null_class = NULL_CLASS if null_class is None else null_class
    image_shape = (1, IMAGE_SIZE, IMAGE_SIZE) if image_shape is None else image_shape
    device = class_labels.device
    n = class_labels.shape[0]
    if noise is None:
        noise_device = generator.device if generator is not None else device
        noise = torch.randn((n, *image_shape), generator=generator, device=noise_device)
    both = torch.cat([class_labels, torch.full_like(class_labels, null_class)])

    def make_inputs(x: torch.Tensor, t: torch.Tensor) -> dict[str, Any]:
        return {"x": x, "t": t, "y": both if x.shape[0] == 2 * n else class_labels}

    def call(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return fn(x, t, y)

    x = denoise(
        call,
        scheduler,
        make_inputs,
        noise.to(device=device, dtype=torch.float32),
        num_inference_steps,
        guidance_scale=guidance_scale,
    )
    return x.clamp(-1.0, 1.0)
