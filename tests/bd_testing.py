"""Helpers shared by the backend's golden tests (imported as ``import bd_testing``)."""

from __future__ import annotations

import os

import zoo
from torch._dynamo.utils import counters

import bd_compile

#: Most tests compile through aot_eager: the rewrite is the same, the compile is seconds.
#: ``BD_TEST_COMPILE_ONCE=0`` runs them with every block inline (Note [Compile-once blocks]).
AOT: dict[str, object] = {"inner": "aot_eager"}
if os.environ.get("BD_TEST_COMPILE_ONCE") == "0":
    AOT["compile_once"] = False
TOL = {"rtol": 1e-4, "atol": 1e-5}


def model_timesteps(case: zoo.ZooCase, steps: int) -> list[float]:
    """The model-facing timesteps of a `steps`-step loop of `case`'s scheduler."""
    sched = case.make_scheduler()
    sched.set_timesteps(steps)
    return [float(case.model_timestep(t, 1)[0]) for t in sched.timesteps]


def cache_block(case: zoo.ZooCase) -> int:
    return bd_compile.default_cache_block(len(case.blocks()))


def pattern(plan: list[bool]) -> str:
    return "".join("R" if r else "C" for r in plan)


def assert_rewritten_and_reused(reuse: int | None = None) -> None:
    """No silent fallback, and reuse happened (exactly `reuse` calls if given)."""
    c = counters["blockdance"]
    assert c["graphs_rewritten"] >= 1 and c["fallbacks"] == 0, dict(c)
    assert c["reuse_steps"] > 0 if reuse is None else c["reuse_steps"] == reuse, dict(c)
