"""bd_compile.export / load (Note [Export]): AOTInductor packages of the variants, run without
Dynamo under the backend's own runtime; compared with the backend on the reference DiT."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import zoo

import bd_compile
from bd_compile import deploy
from bd_compile.deploy import ExportedModel, export, load
from bd_compile.sampling import denoise, load_reference, make_scheduler

STEPS = 10
LABELS = torch.tensor([3, 7])


@pytest.fixture(scope="module")
def reference() -> tuple[torch.nn.Module, Any]:
    model, train_scheduler = load_reference()
    return model, make_scheduler(train_scheduler.config, "ddim")


def inputs(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    size = model.config.sample_size  # type: ignore[union-attr]
    both = torch.cat([LABELS, torch.full_like(LABELS, 10)])
    return {
        "hidden_states": torch.randn(4, 1, size, size),
        "timestep": torch.full((4,), 500),
        "class_labels": both,
    }


def generate(model: Any, scheduler: Any, seed: int) -> torch.Tensor:
    size = 28
    x = torch.randn(2, 1, size, size, generator=torch.Generator().manual_seed(seed))
    both = torch.cat([LABELS, torch.full_like(LABELS, 10)])

    def make(x_in: torch.Tensor, t: torch.Tensor) -> dict[str, Any]:
        return {"hidden_states": x_in, "timestep": t, "class_labels": both}

    return denoise(model, scheduler, make, x, STEPS, guidance_scale=3.0)


@pytest.fixture(scope="module")
def exported(reference: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One export with forecast 1: compute, reuse and forecast packages (~3 AOTI compiles)."""
    model, _ = reference
    path = tmp_path_factory.mktemp("export") / "reference"
    return export(model, kwargs=inputs(model), options={"forecast": 1}, path=path)


def backend_run(
    model: torch.nn.Module, scheduler: Any, options: dict[str, Any]
) -> tuple[list[torch.Tensor], list[str]]:
    """The backend through inductor with its blocks inline: the graphs the packages hold
    (AOTInductor cannot call compile-once blocks), compiled with the same kernels, so the
    outputs agree to float rounding (bitwise on this machine; through aot_eager, or with the
    blocks compiled once, they differ by ~3e-5)."""
    torch._dynamo.reset()
    options = {"inner": "inductor", "compile_once": False, **options}
    compiled = torch.compile(model, backend="blockdance", options=options)
    outs = [generate(compiled, scheduler, seed) for seed in (0, 1)]
    return outs, [g.pattern for g in bd_compile.stats(compiled).generations]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["N2", "forecast1", "counted"])
def test_loaded_packages_equal_the_backend_over_two_generations(
    reference: Any, exported: Path, kind: str
) -> None:
    model, scheduler = reference
    scheduler.set_timesteps(STEPS)
    options: dict[str, Any] = {
        "N2": {"forecast": 0},
        "forecast1": {},  # the export's own forecast=1
        "counted": {"forecast": 0, "timesteps": scheduler.timesteps.tolist()},
    }[kind]
    loaded = load(exported, options)
    outs = [generate(loaded, scheduler, seed) for seed in (0, 1)]
    patterns = [g.pattern for g in loaded.generations]
    assert len(patterns) == 2 and all("R" in p for p in patterns), patterns
    want, want_patterns = backend_run(model, scheduler, {"forecast": 1, **options})
    assert patterns == want_patterns
    for got, ref in zip(outs, want, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    if kind == "forecast1":  # forecast reuse differs from copying: the test sees which one ran
        copied = [generate(load(exported, {"forecast": 0}), scheduler, seed) for seed in (0, 1)]
        assert (copied[0] - outs[0]).abs().max() > 1e-4


@pytest.mark.slow
def test_calls_that_do_not_fit_the_export_raise(reference: Any, exported: Path) -> None:
    model, _ = reference
    loaded = load(exported)
    good = inputs(model)
    with pytest.raises(
        ValueError, match=r"hidden_states: exported for a float32 tensor of shape \[4, 1, 28, 28\]"
    ):
        loaded(**{**good, "hidden_states": torch.randn(2, 1, 28, 28)})
    with pytest.raises(ValueError, match="return_dict"):
        loaded(**good, return_dict=False)
    with pytest.raises(TypeError, match="unexpected keyword argument 'sample'"):
        loaded(**good, sample=1)
    out = loaded(**good)
    assert type(out).__name__ == "Transformer2DModelOutput" and out.sample.shape == (4, 1, 28, 28)


@pytest.mark.slow
def test_a_changed_export_directory_is_refused_naming_what_differs(
    exported: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    assert isinstance(load(copy), ExportedModel)
    (copy / "manifest.json").write_text(json.dumps({**manifest, "torch": "2.12.0"}))
    with pytest.raises(bd_compile.BlockDanceError, match=r"torch 2\.12\.0, this is torch"):
        load(copy)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    shutil.copy(copy / "compute.pt2", copy / "reuse.pt2")
    with pytest.raises(bd_compile.BlockDanceError, match="not the reuse package"):
        load(copy)
    shutil.copy(exported / "reuse.pt2", copy / "reuse.pt2")
    del manifest["variants"]["forecast"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="needs the forecast package"):
        load(copy, {"forecast": 1})
    with pytest.raises(ValueError, match=r"\['cache_block'\] cannot change after export"):
        load(copy, {"cache_block": 3})


class NoBlocks(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden_states) * timestep


def test_exporting_a_model_the_passes_cannot_rewrite_raises_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(bd_compile.BlockDanceError, match="cannot export this model: .*block"):
        export(NoBlocks(), (torch.randn(2, 8), torch.ones(1)), path=tmp_path)
    assert not list(tmp_path.iterdir())  # nothing written


def test_options_export_cannot_honour_raise() -> None:
    with pytest.raises(ValueError, match=r"\['policy'\] not supported"):
        export(NoBlocks(), (torch.randn(2, 8), torch.ones(1)), options={"policy": "p.json"})


@pytest.mark.parametrize(
    ("compile_once", "aoti_calls_subgraphs"), [(True, True), (True, False), (False, True)]
)
def test_a_graph_that_does_not_export_outlined_is_exported_inline_with_a_warning(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    compile_once: bool,
    aoti_calls_subgraphs: bool,
) -> None:
    """AOTInductor is stubbed: it refuses outlined blocks, and writes a stand-in package. Where
    it cannot call subgraphs at all (torch 2.13), the blocks are exported inline from the start:
    not tried outlined, no warning (Note [Compile-once blocks])."""
    tried: list[bool] = []  # per _aoti call: were the blocks outlined?
    exported: list[str] = []

    def aoti(gm: torch.fx.GraphModule, *args: Any) -> None:
        dest: Path = args[-1]
        tried.append(torch.ops.higher_order.invoke_subgraph in {n.target for n in gm.graph.nodes})
        if tried[-1]:
            raise RuntimeError("no outlined blocks here")
        exported.append(dest.name)
        dest.write_bytes(b"stand-in")

    monkeypatch.setattr(deploy, "_aoti", aoti)
    monkeypatch.setattr(deploy, "cpp_wrapper_calls_subgraphs", lambda: aoti_calls_subgraphs)
    case = zoo.get("dit")
    with caplog.at_level(logging.WARNING, logger="bd_compile.deploy"):
        export(
            case.model,
            kwargs=case.example_inputs(batch=2),
            options={"compile_once": compile_once},
            path=tmp_path,
        )
    assert exported == ["compute.pt2", "reuse.pt2"]
    warned = [r.getMessage() for r in caplog.records if "did not export" in r.getMessage()]
    if compile_once and aoti_calls_subgraphs:
        assert tried == [True, False, True, False]
        assert len(warned) == 2
        assert "each block compiled once (RuntimeError: no outlined blocks here)" in warned[0]
    else:
        assert tried == [False, False]
        assert not warned
