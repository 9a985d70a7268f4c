"""Tiny random-weight DiTs for the analysis tests (they used to be built into the CLI).

Each returns a ``Subject`` of ``python -m bd_compile.analysis``: the model, its
``make_inputs(x, t_1d)`` (``[cond; uncond]`` on a doubled batch) and its latent shape.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel

from bd_compile.analysis.__main__ import Subject, class_conditional
from bd_compile.sampling import DIT_SCHEDULER_CONFIG


def tiny_dit(batch: int, seed: int = 0) -> Subject:
    """A 6-block class-conditional DiT on 4x8x8 latents (learned sigma: 8 output channels)."""
    torch.manual_seed(seed)
    model: Any = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=6,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
    )
    return class_conditional(model.eval(), batch)


def tiny_pixart(batch: int, seed: int = 0) -> Subject:
    """A 6-block PixArt with random stand-ins for the prompt embeddings."""
    torch.manual_seed(seed)
    seq, caption = 8, 24
    model: Any = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=6,
        cross_attention_dim=32,
        sample_size=8,
        patch_size=2,
        caption_channels=caption,
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        use_additional_conditions=False,
    )
    model.eval()
    gen = torch.Generator().manual_seed(seed + 1)
    cond = torch.randn(batch, seq, caption, generator=gen)
    uncond = torch.randn(batch, seq, caption, generator=gen)

    def make_inputs(x: torch.Tensor, t: torch.Tensor) -> dict[str, Any]:
        text = torch.cat([cond, uncond]) if x.shape[0] == 2 * batch else cond
        return {
            "hidden_states": x,
            "encoder_hidden_states": text,
            "timestep": t,
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        }

    return Subject(model, make_inputs, (4, 8, 8), DIT_SCHEDULER_CONFIG, "tiny-pixart")
