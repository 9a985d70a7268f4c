"""BlockDance-Ada test helpers: a policy with fixed decisions and the plan it must give,
written out independently of ``bd_compile.ada`` (shared by test_ada and test_intersections)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import bd_testing
import reference
import torch
import zoo

from bd_compile.ada import DecisionNet, PolicyMeta, save_policy

RHO = 0.4
BINS = 8


def policy_meta(case: zoo.ZooCase, **changes: Any) -> PolicyMeta:
    cb = bd_testing.cache_block(case)
    base: dict[str, Any] = {
        "blocks": len(case.blocks()),
        "cache_block": cb,
        "cached_name": f"stages.{cb} output",
        "width": 48,
        "cached_shape": (16, 48),
        "rho": RHO,
        "bins": BINS,
        "hidden": 4,
        "model": "zoo_dit (test)",
    }
    return PolicyMeta(**{**base, **changes})


def bias_policy(tmp_path: Path, case: zoo.ZooCase, compute_bins: list[bool], **meta: Any) -> str:
    """A policy whose decision ignores the state: cache step in bin b iff compute_bins[b]."""
    net = DecisionNet(48, BINS, 4)
    with torch.no_grad():
        net.fc2.weight.zero_()
        net.fc2.bias.copy_(torch.tensor([5.0 if c else -5.0 for c in compute_bins]))
    path = tmp_path / "bias.safetensors"
    save_policy(path, net, policy_meta(case, **meta))
    return str(path)


def policy_bins(timesteps: list[float]) -> list[int | None]:
    """Each step's bin, written out independently of bd_compile.ada (None before rho)."""
    out: list[int | None] = []
    for p in reference.progress_values(timesteps):
        out.append(None if p < RHO else min(BINS - 1, math.floor((p - RHO) / (1 - RHO) * BINS)))
    return out


def policy_plan(timesteps: list[float], compute_bins: list[bool]) -> list[bool]:
    """Reuse per step: compute up to and including the first step at rho, then the bins."""
    plan, decided = [], False
    for b in policy_bins(timesteps):
        plan.append(decided and b is not None and not compute_bins[b])
        decided = decided or b is not None
    return plan
