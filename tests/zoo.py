"""Tiny random-weight Diffusion Transformers and real diffusers sampling loops, for tests.

Every case is small enough that one forward takes a few milliseconds on one CPU thread, yet keeps
the structure that matters to a block cache: the real diffusers block classes, the glue code
between blocks, the conditioning paths, and the timestep dtype each diffusers pipeline passes.
`ZooDiT` is written here on purpose (block list `stages`, forward `(x, t, y)`, returns a bare
tensor) so that nothing can lean on diffusers naming.

Imported by the tests as ``import zoo`` (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

Cond = dict[str, torch.Tensor]
"""Conditioning of one CFG branch: named tensors whose first dimension is the batch."""

CfgMode = Literal["none", "batched", "sequential"]

MAX_BATCH = 4
"""Conditioning is generated once for this many samples; `ZooCase.cond` slices it."""

COND, UNCOND = 0, 1
"""Branch indices used by `ZooCase.cond` and by the reference cache keys."""


# --------------------------------------------------------------------------------------------
# The case record
# --------------------------------------------------------------------------------------------


@dataclass
class ZooCase:
    """One model of the zoo and everything a sampling loop needs to drive it.

    Attributes:
        name: short id, used as the pytest parameter id.
        model: the module, eval mode, float32, random weights (seeded).
        latent_shape: shape of one sample's latent, without the batch dimension.
        make_inputs: ``(latents [b, ...], t [b], cond) -> kwargs`` of one ``model(**kwargs)``
            call; ``t`` is already the model-facing 1-d timestep (see `model_timestep`).
        conditions: ``(cond_rows, uncond_rows)``, each a `Cond` with `MAX_BATCH` rows.
        blocks: returns the transformer block modules in the order forward executes them.
        make_scheduler: returns a fresh diffusers scheduler (schedulers are stateful).
        output: extracts the prediction tensor from the model output (learned sigma dropped).
        model_timestep: maps the scheduler's 0-d ``t`` to the 1-d tensor the pipeline passes.
        timestep_kwarg: name of the forward argument that carries the timestep.
        notes: what is particular about this model (for humans).
    """

    name: str
    model: nn.Module
    latent_shape: tuple[int, ...]
    make_inputs: Callable[[torch.Tensor, torch.Tensor, Cond], dict[str, Any]]
    conditions: tuple[Cond, Cond]
    blocks: Callable[[], list[nn.Module]]
    make_scheduler: Callable[[], Any]
    output: Callable[[Any], torch.Tensor]
    model_timestep: Callable[[torch.Tensor, int], torch.Tensor]
    timestep_kwarg: str = "timestep"
    notes: str = ""

    def cond(self, batch: int, branch: int = COND) -> Cond:
        """The conditioning of `branch` (`COND` or `UNCOND`) for the first `batch` samples."""
        if not 1 <= batch <= MAX_BATCH:
            raise ValueError(f"expected 1 <= batch <= {MAX_BATCH}, got {batch}")
        if branch not in (COND, UNCOND):
            raise ValueError(f"expected branch 0 (cond) or 1 (uncond), got {branch}")
        return {k: v[:batch] for k, v in self.conditions[branch].items()}

    def inputs(self, latents: torch.Tensor, t: torch.Tensor, branch: int = COND) -> dict[str, Any]:
        """Kwargs of one forward call: `t` is the scheduler's timestep (0-d or 1-d)."""
        batch = latents.shape[0]
        return self.make_inputs(latents, self.model_timestep(t, batch), self.cond(batch, branch))

    def example_inputs(self, batch: int = 1, branch: int = COND, seed: int = 0) -> dict[str, Any]:
        """Kwargs of a forward call at a mid-schedule timestep, for single-call tests."""
        sched = self.make_scheduler()
        sched.set_timesteps(10)
        gen = torch.Generator().manual_seed(seed)
        latents = torch.randn((batch, *self.latent_shape), generator=gen)
        return self.inputs(latents, sched.timesteps[4], branch)

    def __repr__(self) -> str:
        return f"ZooCase({self.name!r}, blocks={len(self.blocks())})"


def cat_conds(a: Cond, b: Cond) -> Cond:
    """Concatenate two branches' conditioning along the batch: ``[a; b]``."""
    if a.keys() != b.keys():
        raise ValueError(f"expected the same keys, got {sorted(a)} and {sorted(b)}")
    return {k: torch.cat([a[k], b[k]]) for k in a}


def first_tensor(out: Any) -> torch.Tensor:
    """The prediction of a diffusers output (dataclass with `.sample`, tuple) or a bare tensor."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(f"expected a tensor, a tuple or an output with .sample, got {type(out)}")


def _drop_learned_sigma(channels: int, dim: int) -> Callable[[Any], torch.Tensor]:
    def output(out: Any) -> torch.Tensor:
        pred = first_tensor(out)
        if pred.shape[dim] == 2 * channels:
            pred = pred.narrow(dim, 0, channels)
        return pred

    return output


def _expand(t: torch.Tensor, batch: int) -> torch.Tensor:
    """``t.expand(batch)`` as the diffusers pipelines do (0-d t becomes a stride-0 [batch])."""
    if t.dim() == 0:
        t = t[None]
    return t.expand(batch)


def _flux_timestep(t: torch.Tensor, batch: int) -> torch.Tensor:
    # FluxPipeline: timestep = t.expand(B).to(latents.dtype); transformer(timestep=timestep / 1000)
    return _expand(t, batch).to(torch.float32) / 1000


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=gen)


def _seeded_init(model: nn.Module, seed: int) -> nn.Module:
    """Re-draw every parameter from a seeded generator; float32, eval mode, no grad.

    diffusers zero-initialises nothing in these classes, but we re-draw anyway so that weights do
    not depend on the global RNG state at build time.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + torch.randn(p.shape, generator=gen) * 0.02)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    model.float().eval().requires_grad_(False)
    return model


def _module_list(model: nn.Module, *names: str) -> list[nn.Module]:
    """The modules of the ModuleLists `names` of `model`, concatenated."""
    out: list[nn.Module] = []
    for name in names:
        modules = getattr(model, name)
        if not isinstance(modules, nn.ModuleList):
            raise TypeError(f"expected {name} to be an nn.ModuleList, got {type(modules)}")
        out.extend(modules)
    return out


# --------------------------------------------------------------------------------------------
# Schedulers (fresh instance per loop; configs follow the public checkpoints' scheduler_config)
# --------------------------------------------------------------------------------------------


def ddim_scheduler() -> Any:
    """DDIM with the DDPM linear betas of DiT / PixArt-alpha / Latte (epsilon prediction)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=0.0001,
        beta_end=0.02,
        clip_sample=False,
        set_alpha_to_one=True,
        prediction_type="epsilon",
    )


def flow_scheduler(shift: float) -> Callable[[], Any]:
    """Flow-matching Euler (SD3: shift 3.0; Flux without dynamic shifting: shift 1.0)."""

    def make() -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)

    return make


def cogvideox_scheduler() -> Any:
    """CogVideoX-2b's scheduler: DDIM, v-prediction, zero-terminal-SNR, trailing spacing."""
    from diffusers import CogVideoXDDIMScheduler

    return CogVideoXDDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=True,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
        snr_shift_scale=3.0,
    )


# --------------------------------------------------------------------------------------------
# ZooDiT: a DiT written here, with adaLN-zero-style modulation and non-diffusers naming
# --------------------------------------------------------------------------------------------


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of a 1-d timestep tensor (any dtype) -> [B, dim] float32."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.to(torch.float32)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ZooDiTStage(nn.Module):
    """One DiT block: adaLN modulation from `c`, self-attention, MLP, gated residuals."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim),
            nn.GELU(approximate="tanh"),
            nn.Linear(mlp_ratio * dim, dim),
        )
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c)[:, None].chunk(6, dim=-1)
        h = _modulate(self.norm1(x), shift1, scale1)
        q, k, v = self.qkv(h).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + gate1 * self.proj(a)
        x = x + gate2 * self.mlp(_modulate(self.norm2(x), shift2, scale2))
        return x


class ZooDiT(nn.Module):
    """Class-conditional DiT: ``forward(x [B,C,H,W], t [B] int64, y [B] int64) -> [B,2C,H,W]``.

    The block list is `stages`; label `num_classes` is the null class for CFG; the output carries
    a learned-sigma half like DiT-XL/2.
    """

    def __init__(
        self,
        in_channels: int = 4,
        size: int = 8,
        patch: int = 2,
        dim: int = 48,
        depth: int = 6,
        heads: int = 3,
        num_classes: int = 10,
        freq_dim: int = 64,
    ) -> None:
        super().__init__()
        self.in_channels, self.patch, self.freq_dim = in_channels, patch, freq_dim
        self.out_channels = 2 * in_channels
        self.x_embed = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)
        grid = size // patch
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, dim))
        self.t_embed = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.y_embed = nn.Embedding(num_classes + 1, dim)
        self.stages = nn.ModuleList([ZooDiTStage(dim, heads) for _ in range(depth)])
        self.final_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.final_linear = nn.Linear(dim, patch * patch * self.out_channels)
        #: set to k to break the graph between stages k and k + 1 (a model Dynamo captures as
        #: two graphs, the blocks split between them)
        self.break_after: int | None = None

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        p = self.patch
        tokens = self.x_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        c = self.t_embed(timestep_embedding(t, self.freq_dim)) + self.y_embed(y)
        stages, k = list(self.stages), len(self.stages)
        if self.break_after is not None:
            k = self.break_after + 1
        for stage in stages[:k]:
            tokens = stage(tokens, c)
        if self.break_after is not None:
            torch._dynamo.graph_break()
        for stage in stages[k:]:
            tokens = stage(tokens, c)
        shift, scale = self.final_modulation(c)[:, None].chunk(2, dim=-1)
        out = self.final_linear(_modulate(self.final_norm(tokens), shift, scale))
        out = out.view(b, h // p, w // p, p, p, self.out_channels)
        return torch.einsum("nhwpqc->nchpwq", out).reshape(b, self.out_channels, h, w)


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------


def _text_conditions(
    gen: torch.Generator, seq: int, dim: int, extra: dict[str, int] | None = None
) -> tuple[Cond, Cond]:
    """Random 'prompt' embeddings; uncond is another random draw ("negative prompt")."""
    out: list[Cond] = []
    for _ in (COND, UNCOND):
        c = {"encoder_hidden_states": _randn(gen, MAX_BATCH, seq, dim)}
        for k, d in (extra or {}).items():
            c[k] = _randn(gen, MAX_BATCH, d)
        out.append(c)
    return out[0], out[1]


def make_zoo_dit(seed: int = 0) -> ZooCase:
    num_classes, channels, size = 10, 4, 8
    model = _seeded_init(ZooDiT(in_channels=channels, size=size, num_classes=num_classes), seed)
    gen = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(0, num_classes, (MAX_BATCH,), generator=gen)
    null = torch.full((MAX_BATCH,), num_classes, dtype=torch.int64)

    def make_inputs(latents: torch.Tensor, t: torch.Tensor, cond: Cond) -> dict[str, Any]:
        return {"x": latents, "t": t, "y": cond["y"]}

    return ZooCase(
        name="zoo_dit",
        model=model,
        latent_shape=(channels, size, size),
        make_inputs=make_inputs,
        conditions=({"y": labels}, {"y": null}),
        blocks=lambda: _module_list(model, "stages"),
        make_scheduler=ddim_scheduler,
        output=_drop_learned_sigma(channels, dim=1),
        model_timestep=_expand,
        timestep_kwarg="t",
        notes="written in zoo.py; blocks are model.stages; forward(x, t, y) returns a tensor",
    )


def make_dit(seed: int = 0) -> ZooCase:
    from diffusers import DiTTransformer2DModel

    num_classes, channels, size = 10, 4, 8
    model: nn.Module = DiTTransformer2DModel(  # type: ignore[assignment]
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=channels,
        out_channels=2 * channels,
        num_layers=6,
        sample_size=size,
        patch_size=2,
        num_embeds_ada_norm=num_classes,
        norm_type="ada_norm_zero",
    )
    _seeded_init(model, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(0, num_classes, (MAX_BATCH,), generator=gen)
    # DiTPipeline's null class is num_classes (LabelEmbedding keeps one extra row for it).
    null = torch.full((MAX_BATCH,), num_classes, dtype=torch.int64)

    def make_inputs(latents: torch.Tensor, t: torch.Tensor, cond: Cond) -> dict[str, Any]:
        return {"hidden_states": latents, "timestep": t, "class_labels": cond["class_labels"]}

    return ZooCase(
        name="dit",
        model=model,
        latent_shape=(channels, size, size),
        make_inputs=make_inputs,
        conditions=({"class_labels": labels}, {"class_labels": null}),
        blocks=lambda: _module_list(model, "transformer_blocks"),
        make_scheduler=ddim_scheduler,
        output=_drop_learned_sigma(channels, dim=1),
        model_timestep=_expand,
        notes=(
            "each block embeds (timestep, class) itself; after the stack, forward calls "
            "transformer_blocks[0].norm1.emb again for the final modulation"
        ),
    )


def make_pixart(seed: int = 0) -> ZooCase:
    from diffusers import PixArtTransformer2DModel

    channels, size, seq, caption = 4, 8, 8, 24
    model: nn.Module = PixArtTransformer2DModel(  # type: ignore[assignment]
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=channels,
        out_channels=2 * channels,
        num_layers=6,
        cross_attention_dim=32,
        sample_size=size,
        patch_size=2,
        caption_channels=caption,
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        use_additional_conditions=False,
    )
    _seeded_init(model, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    cond, uncond = _text_conditions(gen, seq, caption)
    # T5 attention masks: the prompt keeps 6 of 8 tokens, the empty negative prompt keeps 1.
    keep = torch.arange(seq)
    cond["encoder_attention_mask"] = (keep < 6).float().expand(MAX_BATCH, seq).clone()
    uncond["encoder_attention_mask"] = (keep < 1).float().expand(MAX_BATCH, seq).clone()

    def make_inputs(latents: torch.Tensor, t: torch.Tensor, cond: Cond) -> dict[str, Any]:
        return {
            "hidden_states": latents,
            "encoder_hidden_states": cond["encoder_hidden_states"],
            "encoder_attention_mask": cond["encoder_attention_mask"],
            "timestep": t,
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        }

    return ZooCase(
        name="pixart",
        model=model,
        latent_shape=(channels, size, size),
        make_inputs=make_inputs,
        conditions=(cond, uncond),
        blocks=lambda: _module_list(model, "transformer_blocks"),
        make_scheduler=ddim_scheduler,
        output=_drop_learned_sigma(channels, dim=1),
        model_timestep=_expand,
        notes="adaln_single outside the blocks; 2-d encoder_attention_mask turned into a bias",
    )


def make_sd3(seed: int = 0) -> ZooCase:
    from diffusers import SD3Transformer2DModel

    channels, size, seq, joint, pooled = 4, 8, 8, 24, 16
    model: nn.Module = SD3Transformer2DModel(  # type: ignore[assignment]
        sample_size=size,
        patch_size=2,
        in_channels=channels,
        num_layers=6,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=joint,
        caption_projection_dim=32,
        pooled_projection_dim=pooled,
        out_channels=channels,
        pos_embed_max_size=16,
    )
    _seeded_init(model, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    cond, uncond = _text_conditions(gen, seq, joint, {"pooled_projections": pooled})

    def make_inputs(latents: torch.Tensor, t: torch.Tensor, cond: Cond) -> dict[str, Any]:
        return {
            "hidden_states": latents,
            "encoder_hidden_states": cond["encoder_hidden_states"],
            "pooled_projections": cond["pooled_projections"],
            "timestep": t,
        }

    return ZooCase(
        name="sd3",
        model=model,
        latent_shape=(channels, size, size),
        make_inputs=make_inputs,
        conditions=(cond, uncond),
        blocks=lambda: _module_list(model, "transformer_blocks"),
        make_scheduler=flow_scheduler(3.0),
        output=first_tensor,
        model_timestep=_expand,
        notes=(
            "blocks return (encoder_hidden_states, hidden_states); the last block is "
            "context_pre_only and returns (None, hidden_states)"
        ),
    )


def _flux_image_ids(h: int, w: int) -> torch.Tensor:
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def make_flux(seed: int = 0) -> ZooCase:
    from diffusers import FluxTransformer2DModel

    # Packed latents as FluxPipeline keeps them: 4 latent channels x 2x2 patches = 16 features,
    # on a 4x4 grid of packed tokens.
    grid, features, seq, joint, pooled = 4, 16, 8, 24, 16
    model: nn.Module = FluxTransformer2DModel(  # type: ignore[assignment]
        patch_size=1,
        in_channels=features,
        num_layers=2,
        num_single_layers=4,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=joint,
        pooled_projection_dim=pooled,
        guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),
    )
    _seeded_init(model, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    cond, uncond = _text_conditions(gen, seq, joint, {"pooled_projections": pooled})
    txt_ids = torch.zeros(seq, 3)

    def make_inputs(latents: torch.Tensor, t: torch.Tensor, cond: Cond) -> dict[str, Any]:
        side = math.isqrt(latents.shape[1])  # square grids: a resolution change is a new side
        return {
            "hidden_states": latents,
            "encoder_hidden_states": cond["encoder_hidden_states"],
            "pooled_projections": cond["pooled_projections"],
            "timestep": t,
            "img_ids": _flux_image_ids(side, side),
            "txt_ids": txt_ids,
        }

    return ZooCase(
        name="flux",
        model=model,
        latent_shape=(grid * grid, features),
        make_inputs=make_inputs,
        conditions=(cond, uncond),
        blocks=lambda: _module_list(model, "transformer_blocks", "single_transformer_blocks"),
        make_scheduler=flow_scheduler(1.0),
        output=first_tensor,
        model_timestep=_flux_timestep,
        notes=(
            "timestep is t/1000 float32; blocks return (encoder_hidden_states, hidden_states); "
            "single blocks return slices (views) of one tensor; RoPE (cos, sin) enter every block"
        ),
    )


def make_latte(seed: int = 0) -> ZooCase:
    from diffusers import LatteTransformer3DModel

    channels, frames, size, seq, caption = 4, 4, 8, 8, 24
    model: nn.Module = LatteTransformer3DModel(  # type: ignore[assignment]
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=channels,
        out_channels=2 * channels,
        num_layers=3,
        cross_attention_dim=32,
        attention_bias=True,
        sample_size=size,
        patch_size=2,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        caption_channels=caption,
        video_length=frames,
    )
    _seeded_init(model, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    cond, uncond = _text_conditions(gen, seq, caption)

    def make_inputs(latents: torch.Tensor, t: torch.Tensor, cond: Cond) -> dict[str, Any]:
        return {
            "hidden_states": latents,
            "encoder_hidden_states": cond["encoder_hidden_states"],
            "timestep": t,
        }

    def blocks() -> list[nn.Module]:
        spatial = _module_list(model, "transformer_blocks")
        temporal = _module_list(model, "temporal_transformer_blocks")
        return [b for pair in zip(spatial, temporal, strict=True) for b in pair]

    return ZooCase(
        name="latte",
        model=model,
        latent_shape=(channels, frames, size, size),
        make_inputs=make_inputs,
        conditions=(cond, uncond),
        blocks=blocks,
        make_scheduler=ddim_scheduler,
        output=_drop_learned_sigma(channels, dim=1),
        model_timestep=_expand,
        notes=(
            "blocks interleave spatial transformer_blocks[k] and temporal_transformer_blocks[k]; "
            "reshape/permute glue between them; temp_pos_embed added before the first temporal "
            "block"
        ),
    )


def make_cogvideox(seed: int = 0) -> ZooCase:
    from diffusers import CogVideoXTransformer3DModel

    # 3 latent frames = (9 - 1) / 4 + 1 so that the stored sinusoidal position table is used.
    channels, frames, size, seq, text = 4, 3, 8, 8, 24
    model: nn.Module = CogVideoXTransformer3DModel(  # type: ignore[assignment]
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=channels,
        out_channels=channels,
        time_embed_dim=32,
        text_embed_dim=text,
        num_layers=6,
        sample_width=size,
        sample_height=size,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=seq,
    )
    _seeded_init(model, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    cond, uncond = _text_conditions(gen, seq, text)

    def make_inputs(latents: torch.Tensor, t: torch.Tensor, cond: Cond) -> dict[str, Any]:
        return {
            "hidden_states": latents,
            "encoder_hidden_states": cond["encoder_hidden_states"],
            "timestep": t,
        }

    return ZooCase(
        name="cogvideox",
        model=model,
        latent_shape=(frames, channels, size, size),
        make_inputs=make_inputs,
        conditions=(cond, uncond),
        blocks=lambda: _module_list(model, "transformer_blocks"),
        make_scheduler=cogvideox_scheduler,
        output=lambda out: first_tensor(out).float(),
        model_timestep=_expand,
        notes=(
            "latents are [B, F, C, H, W]; v-prediction; blocks return "
            "(hidden_states, encoder_hidden_states) (the reverse of SD3/Flux)"
        ),
    )


def _lumina_timestep(t: torch.Tensor, batch: int) -> torch.Tensor:
    # Lumina2Pipeline: current_timestep = 1 - t / num_train_timesteps, rising from 0 to 1
    return 1 - _expand(t, batch).to(torch.float32) / 1000


def make_lumina2(seed: int = 0) -> ZooCase:
    """Rising timesteps (``1 - sigma``) and a graph break: its RoPE embedder calls
    ``attention_mask.sum(dim=1).tolist()`` after the timestep embedding, so Dynamo hands the
    backend a first graph with the timestep and no blocks, then the blocks without the timestep.
    """
    from diffusers import Lumina2Transformer2DModel

    channels, size, seq, cap = 4, 8, 6, 16
    model: nn.Module = Lumina2Transformer2DModel(  # type: ignore[assignment]
        sample_size=size,
        patch_size=2,
        in_channels=channels,
        hidden_size=32,
        num_layers=4,
        num_refiner_layers=1,
        num_attention_heads=2,
        num_kv_heads=1,
        multiple_of=16,
        axes_dim_rope=(8, 4, 4),
        axes_lens=(32, 32, 32),
        cap_feat_dim=cap,
    )
    _seeded_init(model, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    cond, uncond = _text_conditions(gen, seq, cap)
    mask = torch.ones(MAX_BATCH, seq, dtype=torch.bool)

    def make_inputs(latents: torch.Tensor, t: torch.Tensor, cond: Cond) -> dict[str, Any]:
        return {
            "hidden_states": latents,
            "timestep": t,
            "encoder_hidden_states": cond["encoder_hidden_states"],
            "encoder_attention_mask": mask[: latents.shape[0]],
            "return_dict": False,
        }

    return ZooCase(
        name="lumina2",
        model=model,
        latent_shape=(channels, size, size),
        make_inputs=make_inputs,
        conditions=(cond, uncond),
        blocks=lambda: _module_list(model, "layers"),  # the refiners hold 1 block each
        make_scheduler=flow_scheduler(1.0),
        output=first_tensor,
        model_timestep=_lumina_timestep,
        notes="rising timesteps; a graph break (.tolist()) between the time embedding and blocks",
    )


def make_qwenimage(seed: int = 0) -> ZooCase:
    from diffusers import QwenImageTransformer2DModel

    # Packed latents as QwenImagePipeline keeps them (16 features per 2x2 patch of 4 channels) on
    # a 4x4 grid; ``img_shapes`` (frames, rows, cols) per sample is a Python list, so under
    # ``dynamic=True`` the RoPE table's length is a product of symbols (``vid_freqs``).
    grid, features, seq, joint = 4, 16, 8, 24
    model: nn.Module = QwenImageTransformer2DModel(  # type: ignore[assignment]
        patch_size=1,
        in_channels=features,
        out_channels=features,
        num_layers=4,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=joint,
        axes_dims_rope=(4, 6, 6),
    )
    _seeded_init(model, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    cond, uncond = _text_conditions(gen, seq, joint)

    def make_inputs(latents: torch.Tensor, t: torch.Tensor, cond: Cond) -> dict[str, Any]:
        b = latents.shape[0]
        side = math.isqrt(latents.shape[1])
        return {
            "hidden_states": latents,
            "encoder_hidden_states": cond["encoder_hidden_states"],
            "encoder_hidden_states_mask": None,
            "timestep": t,
            "img_shapes": [(1, side, side)] * b,
            "return_dict": False,
        }

    return ZooCase(
        name="qwenimage",
        model=model,
        latent_shape=(grid * grid, features),
        make_inputs=make_inputs,
        conditions=(cond, uncond),
        blocks=lambda: _module_list(model, "transformer_blocks"),
        make_scheduler=flow_scheduler(1.0),
        output=first_tensor,
        model_timestep=_flux_timestep,
        notes="timestep is t/1000; img_shapes is a list of ints (symbolic under dynamic=True)",
    )


BUILDERS: dict[str, Callable[[int], ZooCase]] = {
    "zoo_dit": make_zoo_dit,
    "dit": make_dit,
    "pixart": make_pixart,
    "sd3": make_sd3,
    "flux": make_flux,
    "latte": make_latte,
    "cogvideox": make_cogvideox,
}
NAMES: tuple[str, ...] = tuple(BUILDERS)
#: Cases outside ``NAMES`` (not in every parametrized test): each tests one loop-state rule.
EXTRA_BUILDERS: dict[str, Callable[[int], ZooCase]] = {
    "lumina2": make_lumina2,
    "qwenimage": make_qwenimage,
}

_CACHE: dict[tuple[str, int], ZooCase] = {}


def build(name: str, seed: int = 0) -> ZooCase:
    """A fresh case (new model instance)."""
    builders = {**BUILDERS, **EXTRA_BUILDERS}
    if name not in builders:
        raise KeyError(f"expected one of {sorted(builders)}, got {name!r}")
    return builders[name](seed)


def get(name: str, seed: int = 0) -> ZooCase:
    """A case shared within the process (tests must not modify its model)."""
    key = (name, seed)
    if key not in _CACHE:
        _CACHE[key] = build(name, seed)
    return _CACHE[key]


# --------------------------------------------------------------------------------------------
# The sampling loop
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CallInfo:
    """What `run_loop` is about to do, handed to `before_call`.

    `branch` is `COND`/`UNCOND` for sequential CFG, `COND` for cfg="none", and None for a
    batched [cond; uncond] call.
    """

    step: int
    timestep: torch.Tensor
    branch: int | None


@dataclass
class LoopResult:
    latents: torch.Tensor
    timesteps: list[float] = field(default_factory=list)
    """The scheduler's timesteps, one per step, as Python numbers."""
    model_timesteps: list[torch.Tensor] = field(default_factory=list)
    """The 1-d timestep tensor passed to the model on each call."""
    calls: int = 0


def _set_timesteps(scheduler: Any, steps: int, timesteps: Sequence[float] | None) -> None:
    if timesteps is None:
        scheduler.set_timesteps(steps)
        return
    if "timesteps" not in inspect.signature(scheduler.set_timesteps).parameters:
        raise ValueError(
            f"expected a scheduler whose set_timesteps accepts timesteps=, "
            f"got {type(scheduler).__name__}"
        )
    scheduler.set_timesteps(timesteps=list(timesteps))


def run_loop(
    case: ZooCase,
    model_callable: Callable[..., Any],
    steps: int,
    *,
    cfg: CfgMode,
    guidance_scale: float = 4.0,
    seed: int = 0,
    batch: int = 1,
    timesteps: Sequence[float] | None = None,
    before_call: Callable[[CallInfo], None] | None = None,
    grad: bool = False,
    after_call: Callable[[], None] | None = None,
) -> LoopResult:
    """Denoise fixed-seed noise with a real diffusers scheduler and `model_callable`.

    cfg="none": one call per step on the cond branch. cfg="batched": one call per step on batch
    2B ordered [cond; uncond]. cfg="sequential": two calls per step, cond then uncond, batch B
    each. Guidance: ``uncond + scale * (cond - uncond)``. `timesteps` overrides the schedule
    (only for schedulers whose ``set_timesteps`` takes ``timesteps=``, i.e. flow matching).
    """
    if cfg not in ("none", "batched", "sequential"):
        raise ValueError(f"expected cfg in ('none', 'batched', 'sequential'), got {cfg!r}")
    # grad=True: as a user's loop without torch.no_grad(): the latents come to require grad.
    model = cast(nn.Module, case.model)
    model.requires_grad_(grad)
    try:
        with torch.enable_grad() if grad else torch.no_grad():
            return _loop(
                case, model_callable, steps, cfg, guidance_scale, seed, batch, timesteps,
                before_call, after_call,
            )  # fmt: skip
    finally:
        model.requires_grad_(False)


def stepwise(
    case: ZooCase,
    model_callable: Callable[..., Any],
    steps: int,
    *,
    cfg: CfgMode,
    guidance_scale: float = 4.0,
    seed: int = 0,
    batch: int = 1,
) -> Iterator[LoopResult | None]:
    """`run_loop`'s loop one step per ``next()`` (a step-level scheduler's view: the caller
    decides what runs between steps); yields ``None`` after each step, then the result. The
    caller sets grad mode around each ``next()`` (a generator cannot keep it)."""
    result: LoopResult | None = None

    def done(r: LoopResult) -> None:
        nonlocal result
        result = r

    yield from _steps(
        case, model_callable, steps, cfg, guidance_scale, seed, batch, None, None, None, done
    )
    yield result


def _loop(
    case: ZooCase,
    model_callable: Callable[..., Any],
    steps: int,
    cfg: CfgMode,
    guidance_scale: float,
    seed: int,
    batch: int,
    timesteps: Sequence[float] | None,
    before_call: Callable[[CallInfo], None] | None,
    after_call: Callable[[], None] | None,
) -> LoopResult:
    result: list[LoopResult] = []
    for _ in _steps(
        case, model_callable, steps, cfg, guidance_scale, seed, batch, timesteps,
        before_call, after_call, result.append,
    ):  # fmt: skip
        pass
    return result[0]


def _steps(
    case: ZooCase,
    model_callable: Callable[..., Any],
    steps: int,
    cfg: CfgMode,
    guidance_scale: float,
    seed: int,
    batch: int,
    timesteps: Sequence[float] | None,
    before_call: Callable[[CallInfo], None] | None,
    after_call: Callable[[], None] | None,
    done: Callable[[LoopResult], None],
) -> Iterator[None]:
    scheduler = case.make_scheduler()
    _set_timesteps(scheduler, steps, timesteps)
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn((batch, *case.latent_shape), generator=gen)
    latents = latents * getattr(scheduler, "init_noise_sigma", 1.0)
    cond, uncond = case.cond(batch, COND), case.cond(batch, UNCOND)
    result = LoopResult(latents=latents)

    def call(x: torch.Tensor, t: torch.Tensor, c: Cond, info: CallInfo) -> torch.Tensor:
        model_t = case.model_timestep(t, x.shape[0])
        result.model_timesteps.append(model_t)
        if before_call is not None:
            before_call(info)
        result.calls += 1
        out = case.output(model_callable(**case.make_inputs(x, model_t, c)))
        if after_call is not None:
            after_call()
        return out

    for i, t in enumerate(scheduler.timesteps):
        result.timesteps.append(t.item())
        x = latents
        if hasattr(scheduler, "scale_model_input"):
            x = scheduler.scale_model_input(x, t)
        if cfg == "none":
            pred = call(x, t, cond, CallInfo(i, t, COND))
        elif cfg == "batched":
            both = call(torch.cat([x, x]), t, cat_conds(cond, uncond), CallInfo(i, t, None))
            pred_c, pred_u = both.chunk(2)
            pred = pred_u + guidance_scale * (pred_c - pred_u)
        else:
            pred_c = call(x, t, cond, CallInfo(i, t, COND))
            pred_u = call(x, t, uncond, CallInfo(i, t, UNCOND))
            pred = pred_u + guidance_scale * (pred_c - pred_u)
        latents = scheduler.step(pred, t, latents, return_dict=False)[0]
        yield
    result.latents = latents.detach()
    done(result)
