"""What the passes found in one graph and what its cache steps store: shown by
``bd_compile.explain``, checked by BlockDance-Ada policies, and the key under which graphs may
read each other's caches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class CachedValue:
    """One value a cache step stores: where it comes from (in the model's terms), its shape."""

    name: str  #: e.g. "transformer_blocks.8 output"
    shape: tuple[int | str, ...]  #: symbolic dims as their expression ("s0")
    dtype: torch.dtype | None  #: None for a number (a size computed inside the blocks)

    @property
    def nbytes(self) -> int | None:
        if self.dtype is None:
            return 0
        if not all(isinstance(s, int) for s in self.shape):
            return None  # symbolic: known per call only
        n = 1
        for s in self.shape:
            n *= int(s)
        return n * self.dtype.itemsize


@dataclass(frozen=True)
class Layout:
    """What was found in one graph and what is cached; shown by ``bd_compile.explain``."""

    blocks: tuple[tuple[str, str], ...]  #: (module path, class), execution order
    cache_block: int
    cached: tuple[CachedValue, ...]
    timestep_input: str | None  #: the forward's argument name; None: follows another graph
    inner: str

    @property
    def key(self) -> tuple[Any, ...]:
        """Graphs with equal keys may read each other's caches (recompiles of one graph)."""
        return (
            tuple(b for b, _ in self.blocks[: self.cache_block + 1]),
            tuple((v.name, v.dtype, len(v.shape)) for v in self.cached),
        )
