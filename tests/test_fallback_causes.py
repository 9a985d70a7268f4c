"""Fallbacks whose cause blockdance names (bd_compile/fallback.py).

Each case hands the backend graphs that hold fewer than 2 blocks, for a reason the user chose
without knowing it matters: regional compilation, a diffusers cache hook, diffusers group
offloading, a model with one block. Each test pins: exactly one blockdance warning per compiled
model however many graph pieces fall back, naming the cause and the remedy; no graph rewritten,
every piece counted in ``fallbacks``; the output of the same model run eagerly with the same
hook; under ``strict=True`` a ``BlockDanceError`` with the same words.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import zoo
from bd_testing import AOT, TOL
from torch._dynamo.utils import counters

import bd_compile

Run = Callable[[Any, dict[str, Any]], torch.Tensor]


@dataclass
class Cause:
    """One way to get a model whose graphs hold fewer than 2 blocks."""

    zoo_name: str
    prepare: Callable[[torch.nn.Module], None]  #: the user's setup, applied to eager and compiled
    compile: Callable[[torch.nn.Module, dict[str, Any]], Any]  #: (model, options) -> callable
    words: tuple[str, ...]  #: what the warning must say: the cause and the remedy
    batches: tuple[int, ...] = (1,)  #: a second batch size recompiles: more graph pieces
    run: Run | None = None


def whole(model: torch.nn.Module, options: dict[str, Any]) -> Any:
    return torch.compile(model, backend="blockdance", options=options)


def regional(model: torch.nn.Module, options: dict[str, Any]) -> Any:
    model._repeated_blocks = ["BasicTransformerBlock"]  # empty for PixArt in diffusers 0.42
    model.compile_repeated_blocks(backend="blockdance", options=options)  # type: ignore[operator]
    return model


def group_offload(model: torch.nn.Module) -> None:
    # diffusers' group offloading moves each group's inputs with accelerate's send_to_device
    pytest.importorskip("accelerate", reason="diffusers' group offloading needs accelerate")
    cpu = torch.device("cpu")
    model.enable_group_offload(  # type: ignore[operator]
        onload_device=cpu, offload_device=cpu, offload_type="block_level", num_blocks_per_group=1
    )


def first_block_cache(model: torch.nn.Module) -> None:
    from diffusers.hooks import FirstBlockCacheConfig

    model.enable_cache(FirstBlockCacheConfig(threshold=0.2))  # type: ignore[operator]


def one_block(model: torch.nn.Module) -> None:
    model.transformer_blocks = torch.nn.ModuleList(model.transformer_blocks[:1])  # type: ignore[index]


def in_cache_context(fn: Any, kwargs: dict[str, Any]) -> torch.Tensor:
    """A diffusers cache hook's state lives in a named context, as the pipelines set it."""
    with getattr(fn, "_orig_mod", fn).cache_context("cond"):
        return zoo.first_tensor(fn(**kwargs))


CAUSES = {
    "regional": Cause(
        "pixart",
        lambda m: None,
        regional,
        (
            "regional compilation",
            "compile_repeated_blocks",
            "one BasicTransformerBlock at a time",
            "torch.compile(model, backend='blockdance')",
        ),
    ),
    "first_block_cache": Cause(
        "flux",
        first_block_cache,
        whole,
        (
            "diffusers cache hook (FirstBlockCache)",
            "model.disable_cache()",
            "blockdance is itself a cache",
        ),
        run=in_cache_context,
    ),
    "group_offloading": Cause(
        "pixart",
        group_offload,
        whole,
        (
            "group offloading",
            "breaks the graph between the blocks",
            "disable group offloading",
            "compile without blockdance",
        ),
    ),
    "one_block": Cause(
        "pixart",
        one_block,
        whole,
        ("transformer_blocks: 1", "needs at least 2 blocks in one list"),
        batches=(1, 2),
    ),
}


def forward(cause: Cause, fn: Any, case: zoo.ZooCase, batch: int, seed: int) -> torch.Tensor:
    kwargs = case.example_inputs(batch=batch, seed=seed)
    with torch.no_grad():
        if cause.run is not None:
            return cause.run(fn, kwargs)
        return zoo.first_tensor(fn(**kwargs))


def warnings_of_blockdance(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("bd_compile") and r.levelno >= logging.WARNING
    ]


@pytest.mark.parametrize("name", list(CAUSES))
def test_fallback_warns_once_naming_the_cause(name: str, caplog: pytest.LogCaptureFixture) -> None:
    cause = CAUSES[name]
    eager_case, case = zoo.build(cause.zoo_name), zoo.build(cause.zoo_name)
    cause.prepare(eager_case.model)
    cause.prepare(case.model)
    compiled = cause.compile(case.model, dict(AOT))
    with caplog.at_level(logging.WARNING, logger="bd_compile"):
        for batch in cause.batches:
            for seed in (0, 1):  # two steps: a cache hook decides again on the second
                want = forward(cause, eager_case.model, eager_case, batch, seed)
                got = forward(cause, compiled, case, batch, seed)
                torch.testing.assert_close(got, want, **TOL)
    said = warnings_of_blockdance(caplog)
    assert len(said) == 1, said
    assert "left uncached" in said[0]
    for words in cause.words:
        assert words in said[0], (words, said[0])
    c = counters["blockdance"]
    assert c["graphs_rewritten"] == 0, dict(c)
    assert c["fallbacks"] >= 2, dict(c)  # several graph pieces, one warning


@pytest.mark.parametrize("name", list(CAUSES))
def test_strict_raises_with_the_same_words(name: str) -> None:
    cause = CAUSES[name]
    case = zoo.build(cause.zoo_name)
    cause.prepare(case.model)
    compiled = cause.compile(case.model, {**AOT, "strict": True})
    with pytest.raises(Exception) as info:  # noqa: PT011 - Dynamo wraps the backend's error
        forward(cause, compiled, case, 1, 0)
    error: BaseException | None = info.value
    while error is not None and not isinstance(error, bd_compile.BlockDanceError):
        error = getattr(error, "inner_exception", None) or error.__cause__  # BackendCompilerFailed
    assert isinstance(error, bd_compile.BlockDanceError), repr(info.value)
    for words in cause.words:
        assert words in str(error), (words, str(error))


def test_other_fallbacks_keep_the_passes_reason(caplog: pytest.LogCaptureFixture) -> None:
    """A 6-block PixArt whose first block breaks the graph (no hook, no regional compile):
    none of the named causes, so each piece says the passes' own reason."""
    case = zoo.build("pixart")
    block = case.model.transformer_blocks[0]  # type: ignore[index]
    original = block.forward

    def broken(*args: object, **kwargs: object) -> torch.Tensor:
        torch._dynamo.graph_break()
        return original(*args, **kwargs)

    block.forward = broken
    compiled = whole(case.model, dict(AOT))
    with caplog.at_level(logging.WARNING, logger="bd_compile"):
        forward(CAUSES["one_block"], compiled, case, 1, 0)
    said = warnings_of_blockdance(caplog)
    assert said and all("left uncached" in s for s in said), said
    assert not any(w in s for s in said for c in CAUSES.values() for w in c.words), said
