"""The backend inside a diffusers pipeline (the README's usage: ``pipe.transformer =
torch.compile(pipe.transformer, backend="blockdance")``), not only under this project's own loops:
``DiTPipeline`` with a small random-weight transformer and VAE (no hub, no text encoder), its own
scheduler loop, batched CFG and VAE decode. Golden against the eager transformer under the
independent reference cache (tests/reference.py) driven by the same plan."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import zoo
from bd_testing import AOT, assert_rewritten_and_reused, pattern
from reference import blockdance_reference, paper_plan, progress_plan
from torch._dynamo.utils import counters

import bd_compile

STEPS, WINDOW, INTERVAL, LABELS = 10, (0.2, 0.95), 2, [1, 2]


def _pipeline() -> Any:
    from diffusers import AutoencoderKL, DiTPipeline, DiTTransformer2DModel

    transformer = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=4,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=1000,  # DiTPipeline's null class is 1000
        norm_type="ada_norm_zero",
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        norm_num_groups=4,
        layers_per_block=1,
    )
    for module, seed in ((transformer, 0), (vae, 1)):
        zoo._seeded_init(module, seed)
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=zoo.ddim_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(pipe: Any, seed: int) -> np.ndarray:
    with torch.no_grad():
        out = pipe(
            class_labels=LABELS,
            num_inference_steps=STEPS,
            generator=torch.Generator().manual_seed(seed),
            output_type="np",
        )
    return np.asarray(out.images)


def _reference_images(pipe: Any, plan: list[bool], seed: int) -> np.ndarray:
    """The pipeline with its eager transformer, the reference cache reusing at ``plan``'s steps
    (one transformer call per step: batched CFG)."""
    transformer = pipe.transformer
    blocks = list(transformer.transformer_blocks)
    calls = 0
    with blockdance_reference(blocks, bd_compile.default_cache_block(len(blocks))) as ctrl:

        def before(*_: Any) -> None:
            nonlocal calls
            ctrl.reuse = plan[calls]
            calls += 1

        handle = transformer.register_forward_pre_hook(before)
        try:
            images = _images(pipe, seed)
        finally:
            handle.remove()
    assert calls == STEPS
    return images


@pytest.mark.parametrize(
    ("loop", "inner"),
    [
        ("automatic", "aot_eager"),
        ("counted", "aot_eager"),
        pytest.param("automatic", "inductor", marks=pytest.mark.slow),
    ],
)
def test_dit_pipeline_follows_the_schedule_and_matches_the_reference(loop: str, inner: str) -> None:
    pipe = _pipeline()
    eager = pipe.transformer
    pipe.scheduler.set_timesteps(STEPS)
    timesteps = pipe.scheduler.timesteps.tolist()
    options: dict[str, Any] = {**AOT, "interval": INTERVAL, "window": WINDOW, "inner": inner}
    if loop == "counted":
        options["timesteps"] = timesteps
        plan = paper_plan(STEPS, WINDOW, INTERVAL)
    else:
        plan = progress_plan(timesteps, WINDOW, INTERVAL)
    assert any(plan)
    full = _images(pipe, 0)
    pipe.transformer = torch.compile(eager, backend="blockdance", options=options)
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = [_images(pipe, seed) for seed in (0, 1)]  # two pipeline calls: two generations
    assert counters["blockdance"]["graphs_rewritten"] == 1
    assert_rewritten_and_reused(2 * sum(plan))
    stats = bd_compile.stats(pipe.transformer)
    assert [g.pattern for g in stats.generations] == [pattern(plan)] * 2
    pipe.transformer = eager
    for images, seed in zip(got, (0, 1), strict=True):
        want = _reference_images(pipe, plan, seed)
        np.testing.assert_allclose(
            images, want, rtol=0, atol=1e-5 if inner == "aot_eager" else 1e-4
        )
    assert np.abs(got[0] - full).max() > 1e-4  # reuse changed the images: the test sees it
