"""Pins the STSS analysis, the calibration rule, its file format, the CLI and the backend hook.

The statistics are checked against hand-computed values; the recording backend against the
blocks ``passes.tag_blocks`` finds (on the zoo's models); the calibration on a synthetic DiT
whose first ``K`` blocks are constant across steps and whose deeper blocks change completely
from step to step, so the right ``cache_block`` is known: ``K - 1``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch._dynamo
import zoo
from torch import nn

import bd_compile
from bd_compile.analysis import (
    Analysis,
    StatsSink,
    analyze,
    cosine_matrix,
    cosine_similarity,
    relative_l2,
)
from bd_compile.analysis.__main__ import main
from bd_compile.analysis.calibration import (
    Calibration,
    calibrate,
    load_calibration,
    save_calibration,
    window_start,
)

STEPS = 10
K = 3  # the synthetic model's constant blocks
DEPTH = 6


# --------------------------------------------------------------------------------------------
# A synthetic DiT with a known STSS pattern
# --------------------------------------------------------------------------------------------


class SyntheticBlock(nn.Module):
    """``constant`` blocks return a learned constant (+1e-6 of their input: almost no change
    across steps); the others add a large random-Fourier embedding of the timestep, which is
    nearly orthogonal between steps 100 timesteps apart."""

    def __init__(self, tokens: int, dim: int, constant: bool) -> None:
        super().__init__()
        self.constant = constant
        self.value = nn.Parameter(torch.randn(tokens, dim))
        self.freqs = nn.Parameter(torch.rand(dim) * 2 + 0.5, requires_grad=False)
        self.phase = nn.Parameter(torch.rand(dim) * 6.28, requires_grad=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.constant:
            return self.value + 1e-6 * h
        emb = torch.sin(t.float()[:, None] * self.freqs + self.phase)
        return h + 10.0 * self.proj(emb)[:, None, :]


class SyntheticDiT(nn.Module):
    """``forward(x [B, 4, 8, 8], timestep [B]) -> [B, 4, 8, 8]`` over 16 patch tokens."""

    def __init__(self, depth: int = DEPTH, constant: int = K, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Linear(16, dim)
        self.blocks = nn.ModuleList(SyntheticBlock(16, dim, k < constant) for k in range(depth))
        self.out = nn.Linear(dim, 16)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        patches = x.reshape(b, 4, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, 16, 16)
        h = self.embed(patches)
        for block in self.blocks:
            h = block(h, timestep)
        y = self.out(h).reshape(b, 4, 4, 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return 0.01 * y.reshape(b, 4, 8, 8)


def _synthetic_inputs(x: torch.Tensor, t: torch.Tensor) -> dict[str, Any]:
    return {"x": x, "timestep": t}


@pytest.fixture(scope="module")
def synthetic() -> tuple[SyntheticDiT, Analysis]:
    torch.manual_seed(0)
    model = SyntheticDiT().eval().requires_grad_(False)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    result = analyze(
        model,
        zoo.ddim_scheduler(),
        _synthetic_inputs,
        latents,
        STEPS,
        guidance_scale=1.0,
        progress=False,
    )
    return model, result


# --------------------------------------------------------------------------------------------
# Statistics against hand-computed values
# --------------------------------------------------------------------------------------------


def test_cosine_and_relative_l2_of_known_vectors() -> None:
    a = torch.tensor([[1.0, 0.0], [3.0, 4.0], [1.0, 1.0]])
    b = torch.tensor([[0.0, 1.0], [3.0, 4.0], [-2.0, -2.0]])
    torch.testing.assert_close(cosine_similarity(a, b), torch.tensor([0.0, 1.0, -1.0]).double())
    # |a-b| / |b|: sqrt(2)/1, 0/5, |(3,3)|/|(-2,-2)| = 3/2
    torch.testing.assert_close(relative_l2(a, b), torch.tensor([math.sqrt(2), 0.0, 1.5]).double())
    # Rows are the first dimension; the rest is flattened.
    x = torch.tensor([[[1.0, 2.0], [2.0, 1.0]]])  # one sample of 4 values
    y = torch.tensor([[[2.0, 1.0], [1.0, 2.0]]])
    assert cosine_similarity(x, y).item() == pytest.approx(8 / 10)
    assert relative_l2(x, y).item() == pytest.approx(2 / math.sqrt(10))


def test_cosine_matrix_is_per_sample_then_mean() -> None:
    # 3 steps x 2 samples x 2 features.
    steps = torch.tensor(
        [
            [[1.0, 0.0], [1.0, 0.0]],
            [[0.0, 1.0], [1.0, 0.0]],
            [[1.0, 1.0], [-1.0, 0.0]],
        ]
    )
    m = cosine_matrix(steps)
    h = 1 / math.sqrt(2)
    expected = torch.tensor(
        [
            [1.0, (0 + 1) / 2, (h - 1) / 2],
            [(0 + 1) / 2, 1.0, (h - 1) / 2],
            [(h - 1) / 2, (h - 1) / 2, 1.0],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(m, expected)


def test_sink_streams_adjacent_statistics_per_block() -> None:
    """Two blocks, three steps, one call per step; block 'b' returns two tensors."""
    sink = StatsSink(chosen_block=0)
    a_steps = [torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0, 2.0]])]
    b_steps = [
        (torch.tensor([[1.0]]), torch.tensor([[0.0]])),
        (torch.tensor([[1.0]]), torch.tensor([[0.0]])),
        (torch.tensor([[0.0]]), torch.tensor([[3.0]])),
    ]
    for s in range(3):
        sink.begin_step(s)
        sink.begin_call(1)
        sink.record("a", "A", [a_steps[s]])
        sink.record("b", "B", list(b_steps[s]))
        sink.end_step()
    sink.finish()
    result = Analysis.from_sink(sink, [900.0, 500.0, 100.0], [math.nan] * 3, {})
    h = 1 / math.sqrt(2)
    np.testing.assert_allclose(result.cosine[0], [np.nan, h, h])
    np.testing.assert_allclose(result.cosine[1], [np.nan, 1.0, 0.0])  # concatenated (1,0)->(0,3)
    np.testing.assert_allclose(result.rel_l2[0], [np.nan, 1.0, math.sqrt(1 + 1) / math.sqrt(2)])
    np.testing.assert_allclose(result.rel_l2[1], [np.nan, 0.0, math.sqrt(10)])
    assert result.block_names == ["a", "b"]
    assert result.step_cosine.shape == (3, 3)
    np.testing.assert_allclose(result.step_cosine[0], [1.0, h, 0.0])


# --------------------------------------------------------------------------------------------
# The recording backend on real diffusers models
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dit", "sd3", "pixart"])
def test_analysis_records_the_blocks_the_backend_tags(name: str) -> None:
    case = zoo.get(name)
    both = zoo.cat_conds(case.cond(1, zoo.COND), case.cond(1, zoo.UNCOND))

    def make_inputs(x: torch.Tensor, t: torch.Tensor) -> dict[str, Any]:
        return case.make_inputs(x, case.model_timestep(t[0], x.shape[0]), both)

    latents = torch.randn(1, *case.latent_shape, generator=torch.Generator().manual_seed(0))
    result = analyze(
        case.model,
        case.make_scheduler(),
        make_inputs,
        latents,
        6,
        guidance_scale=4.0,
        progress=False,
        output=case.output,
    )
    assert result.block_names == [f"transformer_blocks.{k}" for k in range(6)]
    assert result.cosine.shape == result.rel_l2.shape == (6, 6)
    assert np.isnan(result.cosine[:, 0]).all()
    assert np.isfinite(result.cosine[:, 1:]).all() and (result.cosine[:, 1:] <= 1 + 1e-9).all()
    assert (result.rel_l2[:, 1:] >= 0).all()
    assert result.chosen_block == bd_compile.default_cache_block(6)
    np.testing.assert_allclose(np.diag(result.step_cosine), 1.0, atol=1e-9)
    assert np.isfinite(result.x0_ssim[1:]).all()
    if name == "sd3":  # hidden + encoder hidden states are both measured
        assert result.meta["features"]["transformer_blocks.0"] == (16 + 8) * 32


# --------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------


def test_synthetic_model_shows_its_built_in_pattern(synthetic: tuple[nn.Module, Analysis]) -> None:
    _, result = synthetic
    assert result.block_names == [f"blocks.{k}" for k in range(DEPTH)]
    assert (result.cosine[:K, 1:] > 0.9999).all()
    assert (result.cosine[K:, 1:] < 0.9).all()


def test_calibration_picks_the_last_constant_block(synthetic: tuple[nn.Module, Analysis]) -> None:
    _, result = synthetic
    cal = calibrate(result, threshold=0.99, end=0.95)
    assert cal.cache_block == K - 1
    assert cal.window == (0.1, 0.95)  # step 1 of 10: the first step with a predecessor
    assert (cal.num_blocks, cal.num_steps, cal.metric) == (DEPTH, STEPS, "cosine")
    assert cal.model == "SyntheticDiT" and cal.block_name == f"blocks.{K - 1}"


def test_calibration_rule_on_a_hand_made_matrix() -> None:
    nan = math.nan
    cos = np.array(
        [
            [nan, 0.5, 0.995, 0.995, 0.995, 0.995, 0.995, 0.995, 0.995, 0.995],  # from step 2
            [nan, 0.5, 0.5, 0.5, 0.5, 0.995, 0.995, 0.995, 0.995, 0.995],  # from step 5
            [nan, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.995, 0.5],  # step 8 only, 9 fails
            [nan, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5],  # the last block: never chosen
        ]
    )
    assert window_start(cos[0], 0.99, 10) == 2
    assert window_start(cos[1], 0.99, 10) == 5
    assert window_start(cos[2], 0.99, 10) is None
    assert window_start(cos[2], 0.99, 9) == 8  # end before the failing step 9
    result = _fake_analysis(cos)
    # end 0.95 of 10 steps -> window steps [s0, 10); BlockDance-2 reuses floor((10 - s0) / 2).
    # block 0: 1 * 4 reuse steps = 4; block 1: 2 * 2 = 4 -> a tie, the deeper block wins.
    cal = calibrate(result, threshold=0.99, end=0.95)
    assert (cal.cache_block, cal.window) == (1, (0.5, 0.95))
    later = cos.copy()
    later[1, 5:7] = 0.5  # block 1 from step 7: 2 * 1 = 2 < 4 -> block 0
    cal = calibrate(_fake_analysis(later), threshold=0.99, end=0.95)
    assert (cal.cache_block, cal.window) == (0, (0.2, 0.95))
    # The threshold decides: at 0.4 every block but the last qualifies from step 1 and the
    # deepest candidate wins (3 * 4).
    assert calibrate(result, threshold=0.4).cache_block == 2
    # A window too short to hold a reuse step earns nothing: only step 9 qualifies anywhere.
    short = np.full_like(cos, 0.5)
    short[:, 9] = 0.995
    assert calibrate(_fake_analysis(short), threshold=0.99).window == (0.95, 0.95)


def test_structure_gate_delays_the_window_until_x0_settles() -> None:
    """Blocks are stable from step 1, but the predicted x0 only from step 5 (Note [The
    structure gate]): the window starts at 5/10; without the gate at 1/10; if x0 never
    settles before the end, nothing is reused."""
    nan = math.nan
    cos = np.full((4, 10), 0.995)
    cos[:, 0] = nan
    x0 = np.array([nan, 0.5, 0.5, 0.5, 0.5, 0.995, 0.995, 0.995, 0.995, 0.995])
    result = _fake_analysis(cos, x0)
    cal = calibrate(result, threshold=0.99, structure_threshold=0.99)
    assert (cal.cache_block, cal.window, cal.structure_threshold) == (2, (0.5, 0.95), 0.99)
    assert calibrate(result, threshold=0.99, structure_threshold=None).window == (0.1, 0.95)
    x0[9] = 0.5
    assert calibrate(_fake_analysis(cos, x0), threshold=0.99).window == (0.95, 0.95)
    # No x0 SSIM at all (packed latents): the gate is skipped.
    assert calibrate(_fake_analysis(cos), threshold=0.99).window == (0.1, 0.95)


def test_calibration_with_nothing_stable_has_an_empty_window() -> None:
    cos = np.full((4, 10), 0.5)
    cos[:, 0] = np.nan
    cal = calibrate(_fake_analysis(cos), threshold=0.99, end=0.95)
    assert cal.window == (0.95, 0.95)
    assert cal.cache_block == bd_compile.default_cache_block(4)


def _fake_analysis(cos: np.ndarray, x0_ssim: np.ndarray | None = None) -> Analysis:
    L, S = cos.shape
    return Analysis(
        block_names=[f"blocks.{k}" for k in range(L)],
        block_classes=["B"] * L,
        timesteps=np.linspace(999, 0, S),
        cosine=cos,
        rel_l2=np.zeros_like(cos),
        chosen_block=0,
        step_cosine=np.eye(S),
        x0_ssim=np.full(S, np.nan) if x0_ssim is None else x0_ssim,
        meta={"model": "Fake"},
    )


def test_calibration_file_round_trip_and_validation(tmp_path: Path) -> None:
    cal = Calibration(
        cache_block=2,
        window=(0.3, 0.95),
        threshold=0.99,
        num_blocks=6,
        num_steps=10,
        model="M",
        created="2025-01-01T00:00:00+00:00",
        block_name="blocks.2",
        structure_threshold=0.99,
    )
    path = save_calibration(cal, tmp_path / "sub" / "cal.json")
    assert load_calibration(path) == cal

    def bad(**changes: Any) -> str:
        data = {**cal.to_json(), **changes}
        p = tmp_path / "bad.json"
        p.write_text(json.dumps(data))
        with pytest.raises(ValueError, match="expected") as info:
            load_calibration(p)
        return str(info.value)

    assert "'cache_block'" in bad(cache_block=5)  # must leave one block after it
    assert "'window'" in bad(window=[0.9, 0.2])
    assert "'threshold'" in bad(threshold=1.5)
    assert "'structure_threshold'" in bad(structure_threshold="high")
    assert "'format'" in bad(format="something else")
    assert "'metric'" in bad(metric="l2")
    assert "unknown ['extra']" in bad(extra=1)
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(ValueError, match="expected JSON"):
        load_calibration(tmp_path / "junk.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object, got list"):
        load_calibration(tmp_path / "list.json")


def test_saved_analysis_round_trips_and_recalibrates(
    synthetic: tuple[nn.Module, Analysis], tmp_path: Path
) -> None:
    _, result = synthetic
    paths = result.save(tmp_path)
    loaded = Analysis.load(tmp_path)
    np.testing.assert_array_equal(loaded.cosine, result.cosine)
    np.testing.assert_array_equal(loaded.step_cosine, result.step_cosine)
    assert calibrate(loaded).cache_block == K - 1
    assert "cache_block = 2" in paths["summary"].read_text()


def test_compiled_model_uses_the_calibrated_cache_block(
    synthetic: tuple[nn.Module, Analysis], tmp_path: Path
) -> None:
    model, result = synthetic
    cal = calibrate(result, threshold=0.99)
    path = save_calibration(cal, tmp_path / "cal.json")
    assert bd_compile.default_cache_block(DEPTH) != cal.cache_block  # the file must matter
    torch._dynamo.reset()
    compiled = torch.compile(
        model, backend="blockdance", options={"calibration": str(path), "inner": "eager"}
    )
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        compiled(x=x, timestep=torch.tensor([500]))
    stats = bd_compile.stats(compiled)
    assert stats.graphs[0].cache_block == K - 1
    assert stats.settings.window == cal.window
    assert f"cache_block = {K - 1}" in str(bd_compile.explain(compiled))


# --------------------------------------------------------------------------------------------
# The CLI
# --------------------------------------------------------------------------------------------


def test_cli_writes_figures_json_summary_and_calibration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    cal_path = tmp_path / "cal.json"
    folder = tmp_path / "tiny-dit"
    model: Any = zoo.build("dit").model  # a tiny class-conditional DiTTransformer2DModel
    model.save_pretrained(folder)  # no scheduler folder: the CLI uses DiT's DDPM schedule
    rc = main(
        [
            "--model", str(folder), "--steps", "6", "--batch", "1", "--out", str(out),
            "--calibration-out", str(cal_path), "--threshold", "0.9", "--no-progress",
        ]
    )  # fmt: skip
    assert rc == 0
    for name in ("block_step_cosine", "block_step_rel_l2", "x0_ssim"):
        assert (out / f"{name}.png").stat().st_size > 1000
    assert list(out.glob("step_cosine_block*.png"))
    data = json.loads((out / "analysis.json").read_text())
    assert len(data["block_names"]) == 6 and len(data["timesteps"]) == 6
    assert data["cosine"][0][0] is None  # step 0 has no predecessor
    assert data["calibration"]["threshold"] == 0.9
    cal = load_calibration(cal_path)
    assert cal.num_blocks == 6 and cal.num_steps == 6
    assert (out / "summary.txt").read_text().strip()
    assert "calibration" in capsys.readouterr().out


def test_cli_rejects_an_unknown_model(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="expected a diffusers model folder with config.json"):
        main(["--model", str(tmp_path / "nope"), "--out", str(tmp_path)])


def test_cli_loads_a_saved_class_conditional_dit_with_its_scheduler(tmp_path: Path) -> None:
    """A folder as ``save_pretrained`` writes it, shaped like the reference model (1x28x28,
    10 classes): the class comes from ``_class_name``, the null class is 10, and the sampler
    is built from the ``scheduler`` subfolder."""
    from diffusers import DDPMScheduler, DiTTransformer2DModel

    from bd_compile.analysis.__main__ import load_subject

    torch.manual_seed(0)
    folder = tmp_path / "model"
    DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=1,
        out_channels=1,
        num_layers=3,
        sample_size=28,
        patch_size=7,
        num_embeds_ada_norm=10,
    ).save_pretrained(folder)
    DDPMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=True).save_pretrained(
        folder / "scheduler"
    )
    subject = load_subject(str(folder), batch=2, device="cpu")
    assert subject.latent_shape == (1, 28, 28)
    assert subject.scheduler_config["beta_schedule"] == "squaredcos_cap_v2"
    kwargs = subject.make_inputs(torch.zeros(4, 1, 28, 28), torch.full((4,), 999))
    assert kwargs["class_labels"].tolist() == [0, 1, 10, 10]  # [cond; uncond]
    assert subject.make_inputs(torch.zeros(2, 1, 28, 28), torch.full((2,), 999))[
        "class_labels"
    ].tolist() == [0, 1]
    out = tmp_path / "out"
    args = ["--model", str(folder), "--steps", "5", "--batch", "2", "--sampler", "dpm"]
    assert main([*args, "--out", str(out), "--no-progress"]) == 0
    data = json.loads((out / "analysis.json").read_text())
    assert data["meta"]["scheduler"] == "DPMSolverMultistepScheduler"
    assert data["block_names"] == [f"transformer_blocks.{k}" for k in range(3)]
    assert all(v is not None for v in data["x0_ssim"][1:])  # x0 from alphas_cumprod
    assert load_calibration(out / "calibration.json").num_blocks == 3
