"""BlockDance-Ada: an instance-adaptive schedule, as a small policy network the runtime runs once
per generation (Note [BlockDance-Ada]).

The paper's decision network reads (latent, condition embedding). A compiler backend does not
know where either lives in an arbitrary DiT, but it holds one architecture-independent state:
the cached region's output (tokens x width, the conditioning already mixed in by the blocks).
The policy reads that, pooled over tokens, so one design serves every DiT the backend rewrites.

Note [BlockDance-Ada]
- Steps at progress ``< rho`` compute. The first call at progress ``>= rho`` in a generation
  computes too (a cache step); the policy reads the first cached value of that call (the
  region's output, ``[rows, tokens..., width]``), pools it per *sample* (mean and std over
  tokens; with ``policy_rows="cfg"`` and an even row count, rows ``i`` and ``i + rows / 2`` are
  one sample: diffusers' batched guidance ``[cond; uncond]``) and outputs one logit per progress
  bin of the remaining trajectory ``[rho, 1]`` (``bins`` equal bins, so any step count works).
  ``p > 0.5`` = cache step (compute), else reuse: greedy, as the paper does at inference.
- A later step at progress ``p`` takes its sample's decision for ``bin_of(p)``. Rows of one
  sample share it; samples of one batch may differ. On a step where some samples reuse and
  others compute, the region runs on the whole batch (same shapes: no recompile) and each row
  takes its cached or its fresh value (``torch.where`` on a row mask); the cache keeps the rows
  that reused and takes the fresh rows. So every row sees exactly what it would see run alone.
- Across context-parallel ranks (each holds a token shard) the pooled statistics are summed
  with ``all_reduce`` over diffusers' context-parallel group before deciding, once per
  generation: the decision is then a function of values every rank holds, and the ranks agree
  (Note [Decisions agree across ranks] in ``tests/test_context_parallel.py``). This is one
  device-to-host copy of ``[samples, 2 * width + 1]`` per generation.
- The policy file records the model it was trained for (block count, ``cache_block``, the
  cached value's name and width); if any graph of the model differs (a graph-break piece
  included), the model runs the static schedule with one warning (``strict``: ``ValueError``).
  The token count is not checked: pooling makes the policy resolution-independent (whether it
  *transfers* is another matter).
- Under CUDA graphs (``own_cache``) the fresh region output is cloned and mixed steps allocate
  new tensors: the in-place cache buffers of Note [Caches under CUDA graphs] are not used.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from bd_compile.layout import Layout

log = logging.getLogger(__name__)

FORMAT = "bd_compile.ada/1"
_META_KEY = "bd_compile.ada"

__all__ = [
    "FORMAT",
    "Decision",
    "DecisionNet",
    "Policy",
    "PolicyMeta",
    "bin_of",
    "load_policy",
    "pooled_stats",
    "sample_rows",
    "save_policy",
    "stats_features",
]


@dataclass(frozen=True)
class PolicyMeta:
    """What a policy was trained for, and how it maps progress to decisions."""

    blocks: int  #: block count of the graph (execution order over all block lists)
    cache_block: int  #: last block skipped on reuse steps
    cached_name: str  #: e.g. "transformer_blocks.8 output": the value the policy reads
    width: int  #: last dim of that value
    cached_shape: tuple[int | str, ...]  #: its shape without the batch dim (a record only)
    rho: float = 0.4  #: progress before which every step computes
    bins: int = 32  #: progress bins over ``[rho, 1]``
    hidden: int = 64  #: hidden units of the MLP
    model: str = ""  #: what it was trained on, in words
    trained: dict[str, Any] = field(default_factory=dict)  #: reward, lambda, curve, ...

    def to_json(self) -> str:
        d = asdict(self)
        d["format"] = FORMAT
        d["cached_shape"] = list(self.cached_shape)
        return json.dumps(d, sort_keys=True)

    @staticmethod
    def from_json(text: str, path: str) -> PolicyMeta:
        try:
            d = json.loads(text)
            if d.pop("format", None) != FORMAT:
                raise ValueError(f"format {FORMAT!r} missing")
            d["cached_shape"] = tuple(d["cached_shape"])
            meta = PolicyMeta(**d)
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(
                f"blockdance option 'policy': expected a BlockDance-Ada policy file "
                f"({FORMAT} metadata), got unreadable metadata in {path}: {e}"
            ) from None
        if not (0.0 <= meta.rho < 1.0 and meta.bins >= 1 and meta.width >= 1 and meta.hidden >= 1):
            raise ValueError(
                f"blockdance option 'policy': expected 0 <= rho < 1, bins, width, hidden >= 1, "
                f"got rho={meta.rho}, bins={meta.bins}, width={meta.width}, hidden={meta.hidden} "
                f"in {path}"
            )
        return meta


class DecisionNet(nn.Module):
    """Pooled region output (mean and std over tokens, ``2 * width``) and progress ->
    ``bins`` logits; a logit > 0 is a cache step. LayerNorm, then a 2-layer MLP."""

    def __init__(self, width: int, bins: int = 32, hidden: int = 64) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(2 * width)
        self.fc1 = nn.Linear(2 * width + 1, hidden)
        self.fc2 = nn.Linear(hidden, bins)

    def forward(self, features: torch.Tensor, progress: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.norm(features), progress.reshape(-1, 1).to(features.dtype)], dim=1)
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))  # type: ignore[no-any-return]


def bin_of(progress: float, rho: float, bins: int) -> int:
    """The bin of ``[rho, 1]`` that a step at ``progress`` (>= rho) falls in."""
    x = (progress - rho) / (1.0 - rho) * bins
    return min(bins - 1, max(0, math.floor(x + 1e-9)))


def sample_rows(rows: int, policy_rows: str) -> tuple[int, torch.Tensor]:
    """``(samples, sample index of each row)``: with ``"cfg"`` and an even row count, rows ``i``
    and ``i + rows / 2`` are one sample (batched guidance ``[cond; uncond]``); otherwise every
    row is its own sample."""
    if policy_rows == "cfg" and rows % 2 == 0:
        s = rows // 2
        return s, torch.arange(rows) % s
    return rows, torch.arange(rows)


def pooled_stats(hidden: torch.Tensor, policy_rows: str) -> torch.Tensor:
    """Per sample: sums over its rows and tokens of ``h`` and ``h^2`` and the count,
    ``[samples, 2 * width + 1]`` float64. Sums (not means) so that context-parallel shards add
    up to the whole sequence's statistics with one ``all_reduce``."""
    h = hidden.detach().to(torch.float64)
    rows, width = h.shape[0], h.shape[-1]
    h = h.reshape(rows, -1, width)
    per_row = torch.cat(
        [h.sum(1), (h * h).sum(1), torch.full((rows, 1), h.shape[1], dtype=h.dtype)], dim=1
    )
    samples, index = sample_rows(rows, policy_rows)
    out = torch.zeros(samples, per_row.shape[1], dtype=h.dtype, device="cpu")
    return out.index_add_(0, index, per_row.cpu())


def stats_features(stats: torch.Tensor) -> torch.Tensor:
    """``[samples, 2 * width]`` float32: mean and std over tokens from ``pooled_stats``."""
    width = (stats.shape[1] - 1) // 2
    n = stats[:, -1:].clamp_min(1.0)
    mean = stats[:, :width] / n
    var = (stats[:, width : 2 * width] / n - mean * mean).clamp_min(0.0)
    return torch.cat([mean, var.sqrt()], dim=1).to(torch.float32)


def _sync_stats(stats: torch.Tensor, sync: bool, group: Any = None) -> torch.Tensor:
    """Sum the statistics over ``group`` (the context-parallel group; ``None``: the default
    group): each rank holds a token shard, the sums add up to the whole sequence's."""
    if not sync:
        return stats
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) < 2:
        return stats
    backend = str(dist.get_backend(group))
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else "cpu"
    buf = stats.to(device)
    dist.all_reduce(buf, group=group)
    return buf.cpu()


@dataclass
class Decision:
    """One generation's per-sample decisions: ``compute[s, b]`` = sample ``s`` computes in bin
    ``b``; made at step ``step``. ``patterns`` grows one letter per step per sample."""

    compute: torch.Tensor  #: bool [samples, bins], on the host
    step: int
    rho: float
    policy_rows: str
    patterns: list[list[str]]
    last_step: int = -1

    @property
    def samples(self) -> int:
        return int(self.compute.shape[0])

    def reuse_rows(self, progress: float, rows: int) -> torch.Tensor | None:
        """Bool [rows]: which rows reuse at ``progress``; ``None`` if this call's rows are not
        the samples the decision was made for (another batch: compute all)."""
        samples, index = sample_rows(rows, self.policy_rows)
        if samples != self.samples:
            return None
        b = bin_of(progress, self.rho, int(self.compute.shape[1]))
        return ~self.compute[index, b]

    def note_step(self, step: int, reuse_rows: torch.Tensor | None) -> None:
        """Record one letter per sample for ``step`` (the first call of the step decides)."""
        if step <= self.last_step:
            return
        self.last_step = step
        index = None
        if reuse_rows is not None:
            _, index = sample_rows(int(reuse_rows.shape[0]), self.policy_rows)
        for s, pattern in enumerate(self.patterns):
            reused = reuse_rows is not None and bool(reuse_rows[index == s].all())
            pattern.append("R" if reused else "C")


class Policy:
    """A trained decision network and what it was trained for."""

    def __init__(self, meta: PolicyMeta, net: DecisionNet, path: str = "") -> None:
        self.meta, self.net, self.path = meta, net.eval(), path

    @property
    def rho(self) -> float:
        return self.meta.rho

    def mismatch(self, layout: Layout) -> str | None:
        """Why this policy cannot drive a graph of ``layout``; ``None`` if it can."""
        m = self.meta
        if not layout.cached or layout.cached[0].dtype is None:
            return "the graph's first cached value is not a tensor"
        first = layout.cached[0]
        width = first.shape[-1] if first.shape else None
        got = (len(layout.blocks), layout.cache_block, first.name, width)
        want = (m.blocks, m.cache_block, m.cached_name, m.width)
        if got != want:
            return (
                f"expected (blocks, cache_block, cached value, width) = {want}, "
                f"got {got} for this graph"
            )
        return None

    @torch.no_grad()
    def logits(self, stats: torch.Tensor, progress: float) -> torch.Tensor:
        feats = stats_features(stats)
        p = torch.full((feats.shape[0],), progress, dtype=torch.float32)
        return self.net(feats, p)  # type: ignore[no-any-return]

    def decide(
        self,
        hidden: torch.Tensor,
        progress: float,
        step: int,
        policy_rows: str,
        sync: bool,
        group: Any = None,
    ) -> Decision:
        """Greedy per-sample decisions from the region output of the step at ``rho``; with
        ``sync`` the pooled statistics are summed over ``group`` first."""
        stats = _sync_stats(pooled_stats(hidden, policy_rows), sync, group)
        compute = self.logits(stats, progress) > 0.0  # sigmoid(z) > 0.5
        patterns = [["C"] * (step + 1) for _ in range(compute.shape[0])]
        return Decision(compute, step, self.rho, policy_rows, patterns, last_step=step)


def save_policy(path: str | os.PathLike[str], net: DecisionNet, meta: PolicyMeta) -> Path:
    """Write ``net``'s weights (safetensors) with ``meta`` as JSON metadata."""
    from safetensors.torch import save_file

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    save_file(state, str(out), metadata={_META_KEY: meta.to_json()})
    return out


def load_policy(path: str | os.PathLike[str]) -> Policy:
    """Read a policy written by ``save_policy``; ``ValueError`` naming the path and what was
    expected for a missing, unreadable or inconsistent file. Cached per (path, mtime, size)."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        raise ValueError(
            f"blockdance option 'policy': expected a BlockDance-Ada policy file, got {str(p)!r}, "
            "which does not exist"
        ) from None
    return _load(str(p.resolve()), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=16)
def _load(path: str, mtime: int, size: int) -> Policy:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            text = (f.metadata() or {}).get(_META_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(
            f"blockdance option 'policy': expected a safetensors policy file, got {path!r}, "
            f"which could not be read ({type(e).__name__}: {e})"
        ) from None
    if text is None:
        raise ValueError(
            f"blockdance option 'policy': expected {FORMAT} metadata in {path!r}, got none "
            "(is this a policy file?)"
        )
    meta = PolicyMeta.from_json(text, path)
    net = DecisionNet(meta.width, meta.bins, meta.hidden)
    try:
        net.load_state_dict(tensors)
    except RuntimeError as e:
        raise ValueError(
            f"blockdance option 'policy': expected weights of a DecisionNet(width={meta.width}, "
            f"bins={meta.bins}, hidden={meta.hidden}) in {path!r}, got others: {e}"
        ) from None
    return Policy(meta, net, path)
