"""BlockDance under diffusers context parallelism: 2 spawned CPU processes, gloo, a tiny Flux.

Each rank holds a sequence shard (ulysses: all-to-all over heads; ring: all-gather of K/V). The
backend sees one Dynamo graph per rank with the collectives inside the blocks, so the cached
region contains them: on a reuse step every rank skips the same collectives. That is safe only
because every rank makes the same decision at every call, which holds by construction today
(see the Note below). The test checks it end to end: same counters on both ranks, and each
rank's output at every step equal to the non-parallel blockdance run of the same weights and
inputs.

Two CPU-only obstacles of diffusers 0.42 are worked around here, in the test only (FIELD-NOTES,
"diffusers context parallelism on CPU"): ``enable_parallelism`` divides by
``torch.accelerator.device_count()`` (0 on a CPU-only torch), and ring attention asks the
native SDPA backend for the log-sum-exp, which it refuses on CPU.

Note [Decisions agree across ranks]
Every collective in the cached region must run on all ranks or on none: a rank that reuses
while its peer computes leaves the peer blocked in an all-to-all (a hang until the process
group's timeout), and even a decision that skips no collective would mix steps across shards.
Today every decision is a function of the timestep sequence, the schedule options and the
input shapes, which are the same on every rank by construction (the pipeline passes the same
timestep to all ranks; shards have equal shapes), so the ranks agree without talking.
A future data-dependent decision (an adaptive policy that reads a feature of the rank's own
shard, e.g. a similarity between steps) breaks this: shards differ, so their scores differ. It
must then be agreed explicitly, from a value every rank holds:
- reduce the per-rank evidence over the model's context-parallel process group (the default
  group if none is given) before deciding: ``all_reduce(score, op=MIN)`` (reuse only where
  every shard allows it) or an all-reduce of the decision mask with ``op=MIN`` (logical AND);
  or decide on rank 0 and ``broadcast`` the decision;
- do it once per generation (or at a calibration point), turning the result into a fixed
  schedule mask, not once per step: a per-step collective on the host path adds a
  synchronisation to every call and, on GPU, a device-to-host copy;
- the agreed schedule then drives all ranks exactly as today's timestep-derived one does.
BlockDance-Ada (``bd_compile/ada.py``) is such a policy: each rank pools its shard's region
output into per-sample *sums* (of h, h^2 and the token count), ``all_reduce``s them once per
generation (``policy_sync``), and decides from the whole sequence's statistics, identical on
every rank (``tests/test_ada.py::test_decision_agrees_across_ranks``, with a fake group; here
end to end on 2 processes: ``test_context_parallel_policy_agrees_across_ranks``).
"""

from __future__ import annotations

import datetime
import os
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import zoo
from torch._dynamo.utils import counters

WORLD = 2
STEPS = 10
SEED = 0
OPTIONS: dict[str, Any] = {"inner": "cp_recorder", "interval": 2, "window": (0.25, 0.95)}
"""Schedule with reuse (10 steps: CCCCRCRCRC); the inner compiler is aot_eager, recorded."""
ATOL = 1e-5
COUNTERS = ("graphs_rewritten", "fallbacks", "cache_steps", "reuse_steps")
COLLECTIVES = ("all_to_all", "all_gather", "all_reduce", "reduce_scatter", "broadcast")
JOIN_TIMEOUT_S = 400.0
"""A hung worker fails the test after this long (a whole case takes ~1 min on 1 free core)."""
PG_TIMEOUT = datetime.timedelta(seconds=120)
"""gloo collectives of a rank whose peer diverged raise after this long instead of hanging."""


# --------------------------------------------------------------------------------------------
# A recording inner compiler: finds the compute and reuse graphs without the runtime's insides
# --------------------------------------------------------------------------------------------


@dataclass
class GraphRecord:
    """One graph the backend handed to its inner compiler, and what running it did."""

    collectives: dict[str, int]
    calls: int = 0


def _collectives(gm: torch.fx.GraphModule) -> Counter[str]:
    """The collectives a call of ``gm`` runs, those of its outlined blocks (Note [Compile-once
    blocks]: ``invoke_subgraph`` calls of shared subgraphs) once per call."""
    found: Counter[str] = Counter()
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is torch.ops.higher_order.invoke_subgraph:
            found.update(_collectives(getattr(gm, node.args[0].target)))
        else:
            found.update(c for c in COLLECTIVES if c in str(node.target))
    return found


@dataclass(eq=False)  # hashable: Dynamo's registry keys backends by them
class GraphRecorder:
    """An inner backend that compiles with aot_eager and records every graph and its calls.

    Each call runs one graph (Note [One graph per call]): the compute graph's call count is
    the ``cache_steps`` counter, the reuse graph's the ``reuse_steps`` counter.
    """

    graphs: list[GraphRecord] = field(default_factory=list)

    def __call__(
        self, gm: torch.fx.GraphModule, example_inputs: list[Any], **kwargs: Any
    ) -> Callable[..., Any]:
        from torch._dynamo.backends.registry import lookup_backend

        record = GraphRecord(dict(_collectives(gm)))
        self.graphs.append(record)
        compiled = lookup_backend("aot_eager")(gm, example_inputs)

        def run(*args: Any) -> Any:
            out = compiled(*args)
            record.calls += 1
            return out

        return run

    def called(self, times: int) -> GraphRecord:
        found = [g for g in self.graphs if g.calls == times]
        assert len(found) == 1, (
            f"expected one graph called {times} times, got calls {[g.calls for g in self.graphs]}"
        )
        return found[0]


RECORDER = GraphRecorder()


def _register_recorder() -> None:
    from torch._dynamo.backends.registry import register_backend

    if OPTIONS["inner"] not in torch._dynamo.list_backends(exclude_tags=()):
        register_backend(RECORDER, name=OPTIONS["inner"])


# --------------------------------------------------------------------------------------------
# One run of the sampling loop, parallel or not
# --------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    """What a run produced; saved by each worker for the parent to compare."""

    outputs: list[torch.Tensor]
    counters: dict[str, int]
    graphs: list[GraphRecord]
    compute: GraphRecord
    reuse: GraphRecord
    cache_bytes: int
    """Peak bytes the caches of the generation held."""
    samples: tuple[str, ...] = ()
    """BlockDance-Ada: the per-sample C/R patterns of the generation."""
    decisions: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    """BlockDance-Ada: (decision made, decision this rank's own shard alone would give)."""


def run_blockdance(case: zoo.ZooCase, options: dict[str, Any] = OPTIONS) -> RunResult:
    """Compile ``case.model`` with the blockdance backend and run the loop, keeping every output
    (and, with a ``policy``, each decision next to the one the rank's own shard would give)."""
    import bd_compile
    from bd_compile import ada

    _register_recorder()
    torch._dynamo.reset()
    counters.clear()
    RECORDER.graphs.clear()
    compiled = torch.compile(case.model, backend="blockdance", options=options)
    outputs: list[torch.Tensor] = []
    decisions: list[tuple[torch.Tensor, torch.Tensor]] = []
    decide = ada.Policy.decide

    def recording_decide(self: ada.Policy, hidden: torch.Tensor, *args: Any) -> ada.Decision:
        made = decide(self, hidden, *args)
        alone = decide(self, hidden, *args[:3], False)  # no sync: this shard's statistics only
        decisions.append((made.compute.clone(), alone.compute.clone()))
        return made

    def call(**kwargs: Any) -> torch.Tensor:
        # return_dict=False: diffusers' context-parallel output hook gathers tensors or tuples.
        out = zoo.first_tensor(compiled(**kwargs, return_dict=False))
        outputs.append(out.detach().clone())
        return out

    ada.Policy.decide = recording_decide  # type: ignore[method-assign]
    try:
        zoo.run_loop(case, call, STEPS, cfg="none", seed=SEED)
    finally:
        ada.Policy.decide = decide  # type: ignore[method-assign]
    stats = {k: int(counters["blockdance"][k]) for k in COUNTERS}
    return RunResult(
        outputs,
        stats,
        list(RECORDER.graphs),
        RECORDER.called(stats["cache_steps"]),
        RECORDER.called(stats["reuse_steps"]),
        bd_compile.stats(compiled).last.cache_bytes,
        bd_compile.stats(compiled).last.samples,
        decisions,
    )


# --------------------------------------------------------------------------------------------
# The workers and their CPU-only workarounds
# --------------------------------------------------------------------------------------------


def _cpu_device_count_workaround() -> None:
    """``enable_parallelism`` computes ``rank % torch.accelerator.device_count()``: 0 on CPU."""
    torch.accelerator.device_count = lambda *args, **kwargs: 1  # type: ignore[assignment]


def _cpu_ring_lse_workaround() -> None:
    """Ring attention needs (out, lse); native SDPA refuses ``return_lse=True`` on CPU.

    Replaces diffusers' native forward op (looked up by name at call time) with one on
    ``aten._scaled_dot_product_flash_attention_for_cpu``, which returns the log-sum-exp.
    Inference only: nothing is saved for a backward pass.
    """
    from diffusers.models import attention_dispatch

    def forward_op(
        ctx: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
        return_lse: bool = False,
        _save_ctx: bool = True,
        _parallel_config: Any = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        # diffusers' layout is (B, S, H, D) and lse (B, S, H); aten's (B, H, S, D) and (B, H, S).
        q, k, v = (x.permute(0, 2, 1, 3) for x in (query, key, value))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale
        )
        out = out.permute(0, 2, 1, 3)
        return (out, lse.permute(0, 2, 1)) if return_lse else out

    attention_dispatch._native_attention_forward_op = forward_op


def _worker(rank: int, port: int, mode: str, out_dir: str, options: dict[str, Any]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=PG_TIMEOUT,
    )
    try:
        from diffusers.models._modeling_parallel import ContextParallelConfig
        from diffusers.models.modeling_utils import ModelMixin

        _cpu_device_count_workaround()
        if mode == "ring":
            _cpu_ring_lse_workaround()
        config = (
            ContextParallelConfig(ulysses_degree=WORLD)
            if mode == "ulysses"
            else ContextParallelConfig(ring_degree=WORLD)
        )
        case = zoo.make_flux(SEED)
        cast(ModelMixin, case.model).enable_parallelism(config=config)
        result = run_blockdance(case, options)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# Spawning: free port, one retry on a port race, worker tracebacks in the failure, no leftovers
# --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_taken(error: BaseException) -> bool:
    text = str(error).lower()
    return "address already in use" in text or "eaddrinuse" in text


def _spawn_once(mode: str, out_dir: Path, options: dict[str, Any]) -> None:
    ctx = mp.start_processes(
        _worker,
        args=(_free_port(), mode, str(out_dir), options),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    try:
        # join() raises ProcessRaisedException with the worker's traceback (and terminates the
        # other worker) as soon as one fails.
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                pytest.fail(f"{mode}: workers still running after {JOIN_TIMEOUT_S:.0f} s (hang?)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
            p.join()


def spawn_workers(mode: str, out_dir: Path, options: dict[str, Any] = OPTIONS) -> list[RunResult]:
    """Run ``_worker`` on 2 spawned ranks; retry once if the free port was taken meanwhile."""
    try:
        _spawn_once(mode, out_dir, options)
    except mp.ProcessRaisedException as e:
        if not _port_taken(e):
            raise
        _spawn_once(mode, out_dir, options)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


# --------------------------------------------------------------------------------------------
# The test
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def non_parallel() -> RunResult:
    """The blockdance run of the same model, weights and inputs in one process."""
    # Here, not at collection: importing diffusers takes seconds.
    pytest.importorskip("diffusers.models._modeling_parallel", reason="diffusers without CP")
    ref = run_blockdance(zoo.make_flux(SEED))
    assert ref.counters["reuse_steps"] > 0, ref.counters
    return ref


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")
@pytest.mark.parametrize(
    ("mode", "collective"), [("ulysses", "all_to_all"), ("ring", "all_gather")]
)
def test_context_parallel_ranks_agree_and_match_non_parallel(
    mode: str, collective: str, non_parallel: RunResult, tmp_path: Path
) -> None:
    ranks = spawn_workers(mode, tmp_path)
    for rank, got in enumerate(ranks):
        where = f"{mode} rank {rank}"
        assert got.counters["graphs_rewritten"] >= 1, (where, got.counters)
        assert got.counters["fallbacks"] == 0, (where, got.counters)
        assert got.counters["reuse_steps"] > 0, (where, got.counters)
        # The collectives of the skipped blocks are not in the reuse graph.
        computed = got.compute.collectives.get(collective, 0)
        assert computed > got.reuse.collectives.get(collective, 0), (where, got.graphs)
        # Each rank caches its sequence shard: half the non-parallel cache.
        assert got.cache_bytes * WORLD == non_parallel.cache_bytes, (
            where,
            got.cache_bytes,
            non_parallel.cache_bytes,
        )
        assert len(got.outputs) == len(non_parallel.outputs) == STEPS
        for step, (out, ref) in enumerate(zip(got.outputs, non_parallel.outputs, strict=True)):
            assert out.shape == ref.shape, (where, step, out.shape, ref.shape)
            err = (out - ref).abs().max().item()
            assert err <= ATOL, f"{where} step {step}: max abs difference {err:.2e} > {ATOL}"
    # Same decisions on every rank, and the same as without parallelism.
    assert ranks[0].counters == ranks[1].counters == non_parallel.counters


POLICY_BINS = 4


def _flux_policy(path: Path, seed: int) -> dict[str, Any]:
    """Options with a random BlockDance-Ada policy for ``zoo.make_flux`` (its cached layout read
    from a compile), its decisions made sharp (``fc2`` scaled) so that shards would disagree."""
    import bd_compile
    from bd_compile.ada import DecisionNet, PolicyMeta, save_policy

    torch._dynamo.reset()
    case = zoo.make_flux(SEED)
    compiled = torch.compile(case.model, backend="blockdance", options={"inner": "aot_eager"})
    zoo.run_loop(case, compiled, 1, cfg="none", seed=SEED)
    layout = next(r.layout for r in bd_compile.runtimes_of(compiled) if r.layout.cached)
    first = layout.cached[0]
    width = int(first.shape[-1])
    torch.manual_seed(seed)
    net = DecisionNet(width, POLICY_BINS, 8)
    with torch.no_grad():
        net.fc2.weight.mul_(30.0)
    meta = PolicyMeta(
        len(layout.blocks), layout.cache_block, first.name, width, tuple(first.shape[1:]),
        bins=POLICY_BINS, hidden=8, model="zoo flux (test)",
    )  # fmt: skip
    save_policy(path, net, meta)
    return {"inner": OPTIONS["inner"], "policy": str(path)}


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")
def test_context_parallel_policy_agrees_across_ranks(tmp_path: Path) -> None:
    """BlockDance-Ada under ulysses: each rank pools its own shard, the statistics are summed
    over the context-parallel group, and both ranks take the decision of the whole sequence
    (the non-parallel run's), which their own shards alone would not have given."""
    pytest.importorskip("diffusers.models._modeling_parallel", reason="diffusers without CP")
    options = _flux_policy(tmp_path / "policy.safetensors", seed=1)  # pattern CCCCCRRCRR
    ref = run_blockdance(zoo.make_flux(SEED), options)
    assert ref.counters["graphs_rewritten"] >= 1 and ref.counters["fallbacks"] == 0, ref.counters
    assert len(ref.samples) == 1 and len(ref.decisions) == 1, (ref.samples, ref.decisions)
    after = ref.samples[0][int(STEPS * 0.4) + 1 :]
    assert "R" in after and "C" in after, ref.samples  # a mixed pattern: decisions matter
    ranks = spawn_workers("ulysses", tmp_path, options)
    for rank, got in enumerate(ranks):
        where = f"ulysses rank {rank}"
        assert got.samples == ref.samples, (where, got.samples, ref.samples)
        assert got.counters == ref.counters, (where, got.counters, ref.counters)
        (made, _), (ref_made, _) = got.decisions[0], ref.decisions[0]
        assert torch.equal(made, ref_made), where
        for step, (out, want) in enumerate(zip(got.outputs, ref.outputs, strict=True)):
            err = (out - want).abs().max().item()
            assert err <= ATOL, f"{where} step {step}: max abs difference {err:.2e} > {ATOL}"
    # The test has teeth: without the sum over ranks some rank would have decided otherwise.
    assert any(not torch.equal(a, b) for got in ranks for a, b in got.decisions), [
        got.decisions for got in ranks
    ]
