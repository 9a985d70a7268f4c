"""Streaming per-block statistics of a sampling run: what ``analyze`` measures.

Note [Streaming statistics]
Memory is bounded by one model call: per block only the previous step's output is kept. Per step
``s >= 1`` and block ``k``, with ``a`` the output at step ``s`` and ``b`` at step ``s - 1``, both
flattened per sample (rows of the model's batch):

- cosine similarity ``<a, b> / (|a| |b|)`` per sample, then the mean over samples;
- relative L2 distance ``|a - b| / |b|`` per sample, then the mean.

Step 0 has no predecessor and is NaN. For one *chosen* block (default: the block at 75% depth,
the backend's default ``cache_block``) a fixed random subset of at most ``max_values`` values
(``max_values // rows`` coordinates per sample, same coordinates every step) is kept per step,
from which the step x step cosine-similarity matrix is built (per sample, then the mean); a
random coordinate subset gives an unbiased estimate of the dot products the full cosine uses.

Note [x0 SSIM]
The predicted clean sample x0 of each step is the scheduler's ``pred_original_sample`` when its
``step`` returns one (DDIM, DDPM, Euler); otherwise it is computed from the prediction with the
scheduler's ``alphas_cumprod`` (epsilon, v and sample prediction: DPM-Solver) or ``sigmas``
(flow matching: ``x0 = x - sigma * v``). The SSIM of adjacent steps' x0 uses
``bd_compile.metrics.ssim`` with ``data_range`` = max - min over both x0 of the pair (the whole
batch) unless one is given: a range taken from the data makes the value independent of the
latent scale (SSIM(k a, k b, k L) = SSIM(a, b, L)), so the very noisy early x0 predictions,
whose range can be 100x the final image's, are judged on their own scale. x0 of shape
``[B, ..., C, H, W]`` is compared as images ``[N, C, H, W]``; packed token latents (Flux) have no
image layout and get NaN. ``predicted_x0`` lives in ``bd_compile.sampling``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from bd_compile.metrics import ssim
from bd_compile.settings import default_cache_block

log = logging.getLogger(__name__)

DEFAULT_MAX_VALUES = 4096
_EPS = 1e-12


# --------------------------------------------------------------------------------------------
# Per-sample statistics
# --------------------------------------------------------------------------------------------


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).to(torch.float64)


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each row pair, float64 ``[R]``; rows are the first dimension.

    Zero vectors count as norm ``1e-12`` (so a zero row has similarity 0 to anything).
    """
    if a.shape != b.shape:
        raise ValueError(
            f"expected tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    x, y = _rows(a), _rows(b)
    dot = (x * y).sum(dim=1)
    return dot / (x.norm(dim=1).clamp_min(_EPS) * y.norm(dim=1).clamp_min(_EPS))


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``|a - b| / |b|`` of each row pair, float64 ``[R]`` (``b`` is the reference)."""
    if a.shape != b.shape:
        raise ValueError(
            f"expected tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    x, y = _rows(a), _rows(b)
    return (x - y).norm(dim=1) / y.norm(dim=1).clamp_min(_EPS)


def cosine_matrix(steps: torch.Tensor) -> torch.Tensor:
    """Step x step cosine similarity of ``[S, R, F]`` features: per row (sample), then the mean."""
    if steps.dim() != 3:
        raise ValueError(f"expected features [S, R, F], got shape {tuple(steps.shape)}")
    x = steps.to(torch.float64)
    x = x / x.norm(dim=2, keepdim=True).clamp_min(_EPS)
    return torch.einsum("srf,urf->sur", x, x).mean(dim=2)


# --------------------------------------------------------------------------------------------
# The statistics sink
# --------------------------------------------------------------------------------------------


@dataclass
class _Call:
    rows: int
    values: dict[str, torch.Tensor] = field(default_factory=dict)


class StatsSink:
    """Receives every block's output per model call and keeps the streaming statistics.

    Protocol (driven by ``analyze``): ``begin_step(step)`` once per denoising step,
    ``begin_call(rows)`` before each model call of the step, ``record(block, cls, tensors)``
    from the recording backend for each block of the call, ``end_step()``, and ``finish()``.
    """

    def __init__(
        self, chosen_block: int | None = None, max_values: int = DEFAULT_MAX_VALUES, seed: int = 0
    ) -> None:
        if max_values < 1:
            raise ValueError(f"expected max_values >= 1, got {max_values}")
        self.requested_block = chosen_block
        self.max_values = max_values
        self.seed = seed
        self.names: list[str] = []
        self.classes: dict[str, str] = {}
        self.features: dict[str, int] = {}
        self.cosine: list[dict[str, float]] = []
        self.rel_l2: list[dict[str, float]] = []
        self.chosen: str | None = None
        self._chosen_index: torch.Tensor | None = None
        self.chosen_values: list[torch.Tensor] = []
        self._prev: list[_Call] = []
        self._calls: list[_Call] = []
        self._step = -1
        self._warned: set[str] = set()

    # -- protocol -------------------------------------------------------------------------
    def begin_step(self, step: int) -> None:
        self._step = step
        self._calls = []

    def begin_call(self, rows: int) -> None:
        self._calls.append(_Call(rows))

    def record(self, name: str, cls: str, tensors: Sequence[torch.Tensor]) -> None:
        if not self._calls:
            raise RuntimeError("StatsSink.record called outside a model call (begin_call missing)")
        call = self._calls[-1]
        if name not in self.classes:
            self.names.append(name)
            self.classes[name] = cls
            if self._step > 0:
                self._warn(
                    name, "block %s first seen at step %d; earlier steps are NaN", self._step
                )
        if name in call.values:
            self._warn(name, "block %s recorded twice in one call (graph break inside it?)")
        call.values[name] = self._flatten(name, call.rows, tensors)

    def end_step(self) -> None:
        cos_row: dict[str, float] = {}
        l2_row: dict[str, float] = {}
        for name in self.names:
            pairs = [
                (cur.values[name], prev.values[name])
                for cur, prev in zip(self._calls, self._prev, strict=False)
                if name in cur.values
                and name in prev.values
                and cur.values[name].shape == prev.values[name].shape
            ]
            if pairs:
                cos_row[name] = float(torch.cat([cosine_similarity(a, b) for a, b in pairs]).mean())
                l2_row[name] = float(torch.cat([relative_l2(a, b) for a, b in pairs]).mean())
        self.cosine.append(cos_row)
        self.rel_l2.append(l2_row)
        self._keep_chosen()
        self._prev = self._calls
        self._calls = []

    def finish(self) -> None:
        """Drop the kept outputs (only the statistics remain)."""
        self._prev = []
        self._calls = []

    # -- helpers --------------------------------------------------------------------------
    def _warn(self, key: str, msg: str, *args: object) -> None:
        """Log ``msg % (key, *args)`` once per key."""
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, key, *args)

    def _flatten(self, name: str, rows: int, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        parts = []
        for t in tensors:
            if t.numel() % rows:
                self._warn(
                    name,
                    "block %s: an output of shape %s does not split into %d samples; "
                    "measuring it as one sample",
                    tuple(t.shape),
                    rows,
                )
                rows = 1
        for t in tensors:
            parts.append(t.detach().reshape(rows, -1).float())
        value = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        self.features.setdefault(name, value.shape[1])
        return value

    def _keep_chosen(self) -> None:
        if self.chosen is None and self.names:
            n = len(self.names)
            k = self.requested_block if self.requested_block is not None else default_cache_block(n)
            if not 0 <= k < n:
                raise ValueError(f"expected 0 <= chosen_block < {n} (blocks found), got {k}")
            self.chosen = self.names[k]
        if self.chosen is None:
            return
        values = [c.values[self.chosen] for c in self._calls if self.chosen in c.values]
        if not values:
            self.chosen_values.append(torch.full((1, 1), math.nan))
            return
        v = (
            torch.cat(values, dim=0)
            if all(x.shape[1] == values[0].shape[1] for x in values)
            else values[0]
        )
        if self._chosen_index is None:
            per_row = max(1, min(v.shape[1], self.max_values // v.shape[0]))
            gen = torch.Generator().manual_seed(self.seed)
            perm = torch.randperm(v.shape[1], generator=gen)[:per_row]
            self._chosen_index = perm.sort().values
        self.chosen_values.append(v[:, self._chosen_index.to(v.device)].cpu())


# --------------------------------------------------------------------------------------------
# x0 SSIM
# --------------------------------------------------------------------------------------------


def _as_images(x: torch.Tensor) -> torch.Tensor | None:
    if x.dim() < 4:
        return None
    img = x.reshape(-1, *x.shape[-3:]).float()
    return img if min(img.shape[-2:]) >= 2 else None


def x0_ssim(a: torch.Tensor, b: torch.Tensor, data_range: float | None = None) -> float:
    """Mean SSIM between two x0 predictions (Note [x0 SSIM]); NaN if they are not images."""
    ia, ib = _as_images(a), _as_images(b)
    if ia is None or ib is None:
        return math.nan
    if data_range is None:
        both = torch.stack([ia, ib])
        data_range = float(both.max() - both.min())
        if data_range <= 0:
            return 1.0 if torch.equal(ia, ib) else 0.0
    window = min(11, 2 * min(ia.shape[-2:]) - 1)
    window -= 1 - window % 2
    return float(ssim(ia, ib, data_range=data_range, window_size=window).mean())
