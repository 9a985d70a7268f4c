"""Eager per-sample BlockDance rollouts on a diffusers DiT, for training and evaluating
BlockDance-Ada (Note [BlockDance-Ada] in ``bd_compile/ada.py``).

Forward hooks on the DiT's blocks ``0..cache_block`` run those blocks only for the rows that
compute at this step and put the cached rows back after block ``cache_block``: the same
semantics as the backend's mixed steps (each row sees what it would see run alone), but rows
that reuse are not computed at all (eager has no recompiles to fear). Tested against the
backend with the same policy in ``tests/test_ada.py::test_rollout_engine_matches_backend``.

The loop is DDIM with batched CFG (``[x; x]``, labels ``[y; null]``), as
``bd_compile.sampling.denoise`` runs it; steps before the decision step are shared by every
rollout of one noise (``prefix``), so training pays for them once per pool entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bd_compile.ada import bin_of, pooled_stats
from bd_compile.schedule import progress as progress_of

#: ``compute(step) -> bool [samples]``: which samples compute the cached blocks at ``step``.
ComputeFn = Callable[[int], torch.Tensor]


class RowCache:
    """Hooks on blocks ``0..cache_block``: rows not in ``compute_rows`` skip them and take the
    cached output of block ``cache_block``; ``cache`` holds the last output of every row."""

    def __init__(self, blocks: nn.ModuleList, cache_block: int) -> None:
        self.cache_block = cache_block
        self.compute_rows: torch.Tensor | None = None  # None: every row computes
        self.cache: torch.Tensor | None = None
        self.block_rows = 0  # rows x blocks computed in 0..cache_block (block work)
        self._handles: list[Any] = []
        for i, block in enumerate(blocks[: cache_block + 1]):
            self._handles.append(
                block.register_forward_pre_hook(self._pre(first=i == 0), with_kwargs=True)
            )
        self._handles.append(blocks[cache_block].register_forward_hook(self._post))

    def close(self) -> None:
        for h in self._handles:
            h.remove()

    def _rows(self, n: int) -> torch.Tensor | None:
        idx = self.compute_rows
        if idx is None or idx.numel() == n:
            return None
        # all rows reuse: run one row and throw it away (a 0-row batch is not worth the risk)
        return idx if idx.numel() else torch.zeros(1, dtype=torch.long)

    def _pre(self, first: bool) -> Callable[..., Any]:
        def hook(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> tuple[tuple[Any, ...], dict[str, Any]]:
            rows = kwargs["timestep"].shape[0]
            idx = self._rows(rows)
            self.block_rows += rows if idx is None else int(self.compute_rows.numel())  # type: ignore[union-attr]
            if idx is None:
                return args, kwargs
            kw = {
                k: v[idx] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == rows else v
                for k, v in kwargs.items()
            }
            return ((args[0][idx], *args[1:]) if first else args), kw

        return hook

    def _post(self, module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        if self.compute_rows is None or self.cache is None:
            self.cache = out
            return out
        full = self.cache.clone()
        if self.compute_rows.numel() and self.compute_rows.numel() < full.shape[0]:
            full[self.compute_rows] = out
        elif self.compute_rows.numel() == full.shape[0]:
            full = out
        self.cache = full
        return full


@dataclass
class Prefix:
    """The shared part of a generation: latents after the decision step, the cache written at
    it (block ``cache_block``'s output, rows ``[cond; uncond]``), and the pooled statistics."""

    x: torch.Tensor  #: [n, C, H, W] latents after the decision step
    cache: torch.Tensor  #: [2n, tokens, width]
    stats: torch.Tensor  #: [n, 2 * width + 1] (``bd_compile.ada.pooled_stats``, "cfg" rows)
    step: int  #: index of the decision step
    progress: float  #: its progress


class Sampler:
    """DDIM with batched CFG on a diffusers DiT, with per-sample cache decisions."""

    def __init__(
        self,
        model: Any,
        scheduler: Any,
        cache_block: int,
        steps: int = 50,
        guidance: float = 3.0,
        rho: float = 0.4,
    ) -> None:
        self.model, self.scheduler, self.cache_block = model, scheduler, cache_block
        self.steps, self.guidance, self.rho = steps, guidance, rho
        scheduler.set_timesteps(steps)
        self.timesteps = [float(t) for t in scheduler.timesteps]
        t0 = self.timesteps[0]
        direction = -1 if len(self.timesteps) > 1 and self.timesteps[1] < t0 else 0
        self.progress = [progress_of(t0, t, direction) for t in self.timesteps]
        self.null = int(model.config["num_embeds_ada_norm"])
        #: the decision step: the first at progress >= rho
        self.decision_step = next(i for i, p in enumerate(self.progress) if p >= rho)

    def bins(self, bins: int) -> list[int]:
        """The bin of every step after the decision step."""
        return [bin_of(p, self.rho, bins) for p in self.progress[self.decision_step + 1 :]]

    def _step(
        self, rc: RowCache, x: torch.Tensor, i: int, labels: torch.Tensor, compute: torch.Tensor
    ) -> torch.Tensor:
        n = x.shape[0]
        rows = torch.cat([compute, compute]).nonzero().flatten()
        rc.compute_rows = None if rows.numel() == 2 * n else rows
        t = self.scheduler.timesteps[i]
        x_in = torch.cat([x, x])
        y = torch.cat([labels, torch.full_like(labels, self.null)])
        out = self.model(x_in, timestep=t.reshape(1).expand(2 * n), class_labels=y).sample
        cond, uncond = out[:, : x.shape[1]].chunk(2)
        pred = uncond + self.guidance * (cond - uncond)
        return self.scheduler.step(pred, t, x).prev_sample  # type: ignore[no-any-return]

    @torch.no_grad()
    def prefix(self, noise: torch.Tensor, labels: torch.Tensor) -> Prefix:
        """Steps ``0..decision_step``, all computing."""
        rc = RowCache(self.model.transformer_blocks, self.cache_block)
        try:
            x = noise * self.scheduler.init_noise_sigma
            every = torch.ones(noise.shape[0], dtype=torch.bool)
            for i in range(self.decision_step + 1):
                x = self._step(rc, x, i, labels, every)
            assert rc.cache is not None
            cache = rc.cache
        finally:
            rc.close()
        k = self.decision_step
        return Prefix(x, cache, pooled_stats(cache, "cfg"), k, self.progress[k])

    @torch.no_grad()
    def finish(
        self, start: Prefix, labels: torch.Tensor, compute: ComputeFn | None = None
    ) -> tuple[torch.Tensor, int]:
        """Steps after the decision step; ``compute(step)`` picks the computing samples (all if
        ``None``). Returns the final latents and the rows x blocks computed in the cached region
        after the decision step."""
        rc = RowCache(self.model.transformer_blocks, self.cache_block)
        rc.cache = start.cache.clone()
        n = start.x.shape[0]
        every = torch.ones(n, dtype=torch.bool)
        try:
            x = start.x
            for i in range(start.step + 1, self.steps):
                x = self._step(rc, x, i, labels, every if compute is None else compute(i))
        finally:
            rc.close()
        return x, rc.block_rows

    def static_compute(self, reuse: list[bool], n: int) -> ComputeFn:
        """A fixed per-step pattern for every sample (``True`` = reuse)."""

        def fn(i: int) -> torch.Tensor:
            return torch.full((n,), not reuse[i])

        return fn
