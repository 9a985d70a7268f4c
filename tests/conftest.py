"""Test-session defaults: one CPU thread, a seeded RNG per test, a repo-local inductor cache.

The machines running these tests share two cores between workers; more than one thread made
timings 10-17x slower (FIELD-NOTES). The inductor cache lives in the repo (git-ignored) so that
warm compiles survive across sessions.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault(
    "TORCHINDUCTOR_CACHE_DIR", str(Path(__file__).resolve().parent.parent / ".inductor-cache")
)

import pytest  # noqa: E402
import torch  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seeded() -> Iterator[None]:
    """Every test starts from the same global RNG state."""
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    """Every test starts without compiled graphs or counts from the tests before it."""
    torch._dynamo.reset()
    counters.clear()
