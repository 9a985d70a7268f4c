"""Note [Compile-once blocks] (``passes/outline_blocks.py``): each kind of block is one subgraph
called per block through ``invoke_subgraph``, the variant stays one graph, and the outputs are
those of the inline graph."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
import zoo
from bd_testing import AOT, TOL, assert_rewritten_and_reused
from torch import nn
from torch._dynamo.utils import counters

from passes import outline_blocks, tag_blocks
from passes.outline_blocks import SUBGRAPH_PREFIX

INVOKE = torch.ops.higher_order.invoke_subgraph


def _calls(gm: torch.fx.GraphModule) -> list[str]:
    """The subgraph name of every ``invoke_subgraph`` call, in graph order."""
    return [n.args[1] for n in gm.graph.find_nodes(op="call_function", target=INVOKE)]


def _outlined(
    model: nn.Module, *args: Any, inductor: bool = False
) -> tuple[torch.fx.GraphModule, torch.Tensor]:
    """Dynamo's graph of ``model(*args)`` with its blocks outlined, and what it returns (run as
    it is, or compiled by inductor as the backend compiles it)."""
    from torch._inductor.compile_fx import compile_fx

    from passes.outline_blocks import subgraph_input_asserts_skipped

    got: list[torch.fx.GraphModule] = []

    def capture(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        tag_blocks(gm)
        out = outline_blocks(gm)
        assert out is not None
        got.append(out)
        if not inductor:
            return out.forward
        with subgraph_input_asserts_skipped():
            return compile_fx(out, example_inputs)

    with torch.no_grad():
        result = torch.compile(model, backend=capture, fullgraph=True)(*args)
    return got[0], result


class Block(nn.Module):
    """The same code for every block, whatever its widths (nothing in it names them)."""

    def __init__(self, width: int, width_out: int, in_place: bool = False) -> None:
        super().__init__()
        self.proj = nn.Linear(width, width_out)
        self.in_place = in_place

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.in_place:
            x.mul_(0.5)
        h = torch.nn.functional.gelu(self.proj(x))
        both = torch.cat([h, h * 2])
        n = x.shape[0]
        return both[:n], both[n:]  # two views of one tensor, like Flux's single blocks


class Stack(nn.Module):
    def __init__(self, widths: list[tuple[int, int]], in_place: int | None = None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(a, b, in_place=i == in_place) for i, (a, b) in enumerate(widths)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for block in self.blocks:
            a, b = block(y)
            y = a + b
        return y


def test_blocks_of_one_shape_share_one_subgraph_and_other_shapes_get_their_own() -> None:
    model = Stack([(8, 8), (8, 8), (8, 16), (16, 16), (16, 16)])
    x = torch.randn(2, 8)
    gm, out = _outlined(model, x)
    names = [SUBGRAPH_PREFIX + k for k in "00122"]
    assert _calls(gm) == names  # a key without the input shapes would share them all
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)


class Turn(nn.Module):
    """A block returning its result transposed: the next block reads a non-contiguous input."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(self.proj(x)).t()


class Turns(nn.Module):
    def __init__(self, width: int, n: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Turn(width) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def test_blocks_whose_inputs_have_other_strides_get_their_own_subgraph() -> None:
    """Note [Subgraph input asserts]: the subgraphs do not check their inputs' strides, so the
    strides must be part of a kind: the first block reads a contiguous input, the others the
    previous block's transposed (cloned, still transposed) output. Through inductor (as the
    backend compiles, without subgraph input checks) the outputs are the model's; a key without
    strides fails there ("subgraph args must have consistent values")."""
    model = Turns(8, 3)
    x = torch.randn(8, 8)
    gm, out = _outlined(model, x)
    assert _calls(gm) == [SUBGRAPH_PREFIX + k for k in "011"]
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), rtol=0, atol=0)
    torch._dynamo.reset()
    _, out = _outlined(model, x, inductor=True)
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), **TOL)


def test_aliasing_outputs_are_cloned_and_a_block_writing_its_input_stays_inline() -> None:
    model = Stack([(8, 8)] * 4, in_place=2)
    x = torch.randn(2, 8)
    gm, out = _outlined(model, x.clone())
    assert _calls(gm) == [SUBGRAPH_PREFIX + "0"] * 3
    sub = getattr(gm, SUBGRAPH_PREFIX + "0")
    outputs = sub.graph.output_node().args[0]
    assert [o.target for o in outputs] == ["clone", "clone"]
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)


def _kinds_in_compute(case: zoo.ZooCase) -> list[str]:
    """The subgraph calls of ``case``'s compute variant, through the backend's own rewrite."""
    from passes import rewrite

    got: list[list[str]] = []

    def capture(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        rw = rewrite(gm, example_inputs, compile_once=True)
        got.append(_calls(rw.variants.compute.gm))
        assert rw.variants.compute.inline is not None
        return gm.forward

    inputs = case.make_inputs(
        torch.randn(2, *case.latent_shape),
        case.model_timestep(torch.tensor(500), 2),
        zoo.cat_conds(*(dict((k, v[:1]) for k, v in c.items()) for c in case.conditions)),
    )
    with torch.no_grad():
        torch.compile(case.model, backend=capture)(**inputs)
    return got[0]


@pytest.mark.parametrize(("name", "kinds"), [("pixart", 1), ("flux", 3)])
def test_each_kind_of_block_is_one_subgraph(name: str, kinds: int) -> None:
    """PixArt: one kind; its first block takes the patch embedding's transposed output, passed
    contiguous (else it would be a kind of its own: strides are part of a kind). Flux: double
    blocks, single blocks, and the last single block, whose text half nothing reads (one
    output fewer)."""
    case = zoo.get(name)
    calls = _kinds_in_compute(case)
    assert len(calls) == len(case.blocks())
    assert len(set(calls)) == kinds


@pytest.mark.parametrize("name", ["pixart", "flux"])
def test_compile_once_through_inductor_equals_inline(name: str) -> None:
    """Through inductor (aot_eager never saw the wrong values inductor once returned for a
    subgraph output that was a slice: Flux's single blocks)."""
    case, steps = zoo.get(name), 6
    results = {}
    for once in (False, True):
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(case.model, backend="blockdance", options={"compile_once": once})
        results[once] = zoo.run_loop(case, compiled, steps, cfg="batched").latents
        assert_rewritten_and_reused()
        assert counters["blockdance"]["compile_once_failures"] == 0
    torch.testing.assert_close(results[True], results[False], **TOL)


def test_a_variant_that_fails_to_compile_outlined_compiles_inline_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from torch._dynamo.backends.registry import lookup_backend, register_backend

    eager = lookup_backend("aot_eager")

    def refuses_subgraphs(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        if _calls(gm):
            raise RuntimeError("no subgraphs here")
        return eager(gm, example_inputs)

    if "bd_refuses_subgraphs" not in torch._dynamo.list_backends(exclude_tags=()):
        register_backend(refuses_subgraphs, name="bd_refuses_subgraphs")
    case = zoo.get("zoo_dit")
    compiled = torch.compile(
        case.model, backend="blockdance", options={"inner": "bd_refuses_subgraphs"}
    )
    with caplog.at_level("WARNING", logger="bd_compile"):
        got = zoo.run_loop(case, compiled, 6, cfg="batched").latents
    assert_rewritten_and_reused()
    assert counters["blockdance"]["compile_once_failures"] == 2  # compute, then reuse
    assert "did not compile with each block compiled once" in caplog.text
    torch._dynamo.reset()
    plain = torch.compile(case.model, backend="blockdance", options={**AOT, "compile_once": False})
    torch.testing.assert_close(got, zoo.run_loop(case, plain, 6, cfg="batched").latents, **TOL)
    torch._dynamo.reset()
    strict = torch.compile(
        case.model, backend="blockdance", options={"inner": "bd_refuses_subgraphs", "strict": True}
    )
    with pytest.raises(Exception, match="no subgraphs here"):
        zoo.run_loop(case, strict, 2, cfg="batched")


def test_inductors_cpp_wrapper_cannot_call_subgraphs_in_this_torch() -> None:
    """What the export and ``cpp_wrapper`` rely on (Note [Compile-once blocks]). A torch whose
    C++ wrapper calls subgraphs fails this: then check outlined blocks compile and export."""
    from passes.outline_blocks import cpp_wrapper_calls_subgraphs

    assert not cpp_wrapper_calls_subgraphs()


def _check_cpp_wrapper_run(
    caplog: pytest.LogCaptureFixture, cpp_wrapper: bool, skipped: int, reference: dict[str, Any]
) -> None:
    """Six steps of the zoo DiT with ``inner_options={"cpp_wrapper": ...}`` as a user gives it:
    rewritten, reused, ``skipped`` variants compiled inline untried, no warning, and the outputs
    of blockdance with ``reference`` options."""
    case = zoo.get("zoo_dit")
    options = {"inner_options": {"cpp_wrapper": cpp_wrapper}}
    compiled = torch.compile(case.model, backend="blockdance", options=options)
    with caplog.at_level("WARNING", logger="bd_compile"):
        got = zoo.run_loop(case, compiled, 6, cfg="batched").latents
    assert_rewritten_and_reused()
    assert counters["blockdance"]["compile_once_skipped"] == skipped
    assert counters["blockdance"]["compile_once_failures"] == 0
    assert not caplog.records
    torch._dynamo.reset()
    plain = torch.compile(case.model, backend="blockdance", options=reference)
    torch.testing.assert_close(got, zoo.run_loop(case, plain, 6, cfg="batched").latents, **TOL)


@pytest.mark.parametrize(
    ("cpp_wrapper", "calls_subgraphs", "outlined"),
    [(True, False, False), (True, True, True), (False, False, True)],
)
def test_with_a_cpp_wrapper_that_cannot_call_subgraphs_blocks_compile_inline_untried(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    cpp_wrapper: bool,
    calls_subgraphs: bool,
    outlined: bool,
) -> None:
    """Inductor is stubbed by aot_eager recording whether each graph it gets has outlined
    blocks; ``inner_options={"cpp_wrapper": ...}`` as a user gives it."""
    from torch._dynamo.backends.registry import lookup_backend

    import bd_compile.backend as backend
    import bd_compile.runtime as runtime

    eager, seen = lookup_backend("aot_eager"), []

    def inductor(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        seen.append(bool(_calls(gm)))
        return eager(gm, example_inputs)

    monkeypatch.setattr(backend, "resolve_inner", lambda name, patches=None: inductor)
    monkeypatch.setattr(runtime, "cpp_wrapper_calls_subgraphs", lambda: calls_subgraphs)
    reference = {**AOT, "compile_once": False}
    _check_cpp_wrapper_run(caplog, cpp_wrapper, 0 if outlined else 2, reference)
    assert seen[:2] == [outlined, outlined]  # compute, reuse (then the reference's, inline)


@pytest.mark.slow  # inductor with its C++ wrapper, compiled cold
def test_cpp_wrapper_compiles_the_blocks_inline_without_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    _check_cpp_wrapper_run(caplog, True, 2, {"compile_once": False})  # inductor either way


def test_compile_once_must_be_a_bool() -> None:
    import bd_compile.settings as settings

    with pytest.raises(ValueError, match="'compile_once': expected a bool, got 'yes'"):
        settings.from_options({"compile_once": "yes"})


def _subgraph_functions(code: str) -> list[str]:
    """The bodies of the subgraph functions in inductor's generated Python wrapper."""
    return [
        part.split("\ndef call(")[0].split("\nclass ")[0]
        for part in code.split("\ndef repeated_subgraph")[1:]
    ]


@pytest.mark.slow  # inductor, compiled cold (the generated code is what it checks)
def test_inductor_checks_inputs_once_at_the_top_not_again_in_each_block() -> None:
    """Note [Subgraph input asserts]: the top-level graph checks its inputs, the subgraph
    called per block does not repeat it; the outputs are those of the inline graph."""
    from torch._inductor import config
    from torch._inductor.codegen.wrapper import SubgraphPythonWrapperCodegen
    from torch._inductor.utils import run_and_get_code

    case, steps = zoo.get("zoo_dit"), 6
    results = {}
    for once in (False, True):
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(case.model, backend="blockdance", options={"compile_once": once})
        with config.patch(force_disable_caches=True):
            run = run_and_get_code(zoo.run_loop, case, compiled, steps, cfg="batched")
        results[once] = run[0].latents
        assert_rewritten_and_reused()
        codes = run[1]
    assert "codegen_input_size_and_nan_asserts" not in vars(SubgraphPythonWrapperCodegen)
    bodies = [b for code in codes for b in _subgraph_functions(code)]
    assert len(bodies) >= 2  # the compute and the reuse graph's block subgraphs
    assert not [b for b in bodies if re.search(r"assert_size_stride\(repeated_subgraph\d+_arg", b)]
    assert all("assert_size_stride(arg0_1" in code for code in codes)
    # inductor fuses the outlined blocks differently: float reassociation (seen: 1.8e-5)
    torch.testing.assert_close(results[True], results[False], atol=1e-4, rtol=1e-3)
