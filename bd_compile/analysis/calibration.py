"""Pick ``cache_block`` and the reuse window from a measured STSS pattern, and store the pick.

The paper hand-picks one setting per model family (skip blocks 0-20 of 28, reuse in 25%-95% or
40%-95% of the steps). ``calibrate`` makes that choice from an ``Analysis`` of the user's own
model and sampler; ``save_calibration`` writes it as JSON for
``torch.compile(model, backend="blockdance", options={"calibration": path})``.

Note [The calibration rule]
Let ``C[i, s]`` be the cosine similarity of block ``i``'s output at step ``s`` to step ``s - 1``
(``Analysis.cosine``), ``S`` the number of steps and ``e = ceil(end * S)`` the first step after
the window. For every candidate ``i`` in ``0 .. L-2`` (at least one block must stay computed):

    s_i = max(the smallest step s0 >= 1 with C[i, s] >= threshold for every s in [s0, e),
              g)

(undefined if ``C[i, e-1]`` already fails), where ``g`` is the structure gate below. The window
is ``(s_i / S, end)``. The first step of the window is a cache step, so the first reuse is at
``s_i + 1``; requiring ``C[i, s_i]`` too leaves one step of slack for the backend's
timestep-based step placement (within one step of ``i / S``). The saved compute is scored as
``(i + 1) * R_i``: blocks skipped per reuse step times ``R_i``, the number of reuse steps
BlockDance-2 makes in that window (``paper_rule``; ``R_i = floor((e - s_i) / 2)``, i.e.
``(i + 1) * (end - s_i / S)`` up to rounding, without crediting a window too short to reuse
anything). The rule takes the ``i`` with the largest score, the deeper one on ties. If no block
scores above 0 the window is empty ``(end, end)``: nothing is reused, with ``cache_block`` at
the default depth.

Only adjacent steps are checked: with ``interval`` N > 2 a reuse step reads a cache N - 1 steps
old, which the step x step matrix of ``Analysis`` shows for its chosen block.

Note [The structure gate]
``g`` is the smallest step from which the SSIM of adjacent steps' predicted x0
(``Analysis.x0_ssim``) stays >= ``structure_threshold`` up to ``e`` (the same ``window_start``
rule): reuse starts only once the image structure has settled, which is the paper's reason for
its 25%/40% window starts ("reuse during the first 40% of steps breaks structure"). Block cosine
alone cannot see this: on a trained pixel-space DiT (MNIST, 8 blocks) every block's output had
cosine >= 0.999 to the previous step during the first 40% of the steps (the residual stream is
dominated by the slowly changing noisy input there) and the lowest values in the last steps, so
the cosine-only rule put the window at 2%-95% and the final images fell to SSIM 0.905 against
the uncached run, against 0.988 for the paper's 40%-95%. With the gate at 0.99 the window
became 42%-95% (SSIM 0.991, 23% of block evaluations saved vs 19.5%). If the analysis has no x0
SSIM (packed latents) the gate is skipped with a warning; if x0 never settles, nothing reuses.

Note [Default thresholds]
DEFAULT_THRESHOLD = 0.99 (block cosine) and DEFAULT_STRUCTURE_THRESHOLD = 0.99 (x0 SSIM), from
``python -m benchmarks.threshold_sweep`` (``benchmarks/results/threshold-sweep-reference.md``) on
the trained reference model (12 blocks, DDIM 50, guidance 3, 16 samples, SSIM of the final
samples against the uncached run):

- cosine alone (no x0 gate) reuses from 2% of the steps, where the structure is still forming:
  SSIM 0.9939 at 42% of block evaluations saved; 0.998 and 0.999 collapse to block 1-2 (8-12%
  saved, SSIM 0.986), so the cosine threshold sits on a plateau from 0.9 to 0.995 and 0.99 is
  inside it with margin;
- the x0 gate fixes that: 0.98 / 0.99 / 0.995 start the window at 16% / 24% / 30% (block 10)
  for 35% / 31% / 29% saved at SSIM 0.9989 / 0.9995 / 0.9997. 0.99 is the lowest gate that
  matches the paper's 25%-95% setting in SSIM (0.9996 at 25.5% saved) while saving more.

The proxy runs that first set these values (8 blocks, 2,000 CPU steps, before the reference
model existed) gave the same choice: ``benchmarks/results/threshold-sweep-proxy.md``.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from bd_compile.schedule import paper_rule
from bd_compile.settings import default_cache_block

log = logging.getLogger(__name__)

CALIBRATION_FORMAT = "bd_compile.calibration/1"
DEFAULT_THRESHOLD = 0.99
DEFAULT_STRUCTURE_THRESHOLD: float | None = 0.99
DEFAULT_END = 0.95
SAVING_INTERVAL = 2  # the saving is scored for BlockDance-2, the paper's default N
METRICS = ("cosine",)


class _Analysed(Protocol):
    cosine: np.ndarray
    x0_ssim: np.ndarray
    block_names: list[str]

    @property
    def num_steps(self) -> int: ...

    @property
    def model(self) -> str: ...


@dataclass(frozen=True)
class Calibration:
    """A calibrated BlockDance setting (Note [The calibration rule]).

    cache_block: last block skipped on reuse steps (execution order, as ``bd_compile.explain``).
    window: (start, end) fractions of the trajectory where reuse may happen.
    threshold: the similarity every reuse step's block output met in the analysis.
    num_blocks, num_steps: the analysed model's block count and the analysis' step count.
    metric: the similarity measured (``"cosine"``).
    model: class name of the analysed model.
    created: ISO-8601 UTC time of the calibration.
    block_name: module path of ``cache_block`` (for humans; not checked on load).
    structure_threshold: the x0 SSIM every window step met (``None``: gate not used).
    """

    cache_block: int
    window: tuple[float, float]
    threshold: float
    num_blocks: int
    num_steps: int
    metric: str = "cosine"
    model: str = "unknown"
    created: str = ""
    block_name: str = ""
    structure_threshold: float | None = None

    def __post_init__(self) -> None:
        _validate(self.to_json())

    @property
    def saved_fraction(self) -> float:
        """Share of block compute skipped with N = 2 (upper bound: ~half the window reuses)."""
        return (
            (self.cache_block + 1) / self.num_blocks * max(0.0, self.window[1] - self.window[0]) / 2
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "format": CALIBRATION_FORMAT,
            "cache_block": self.cache_block,
            "window": [self.window[0], self.window[1]],
            "threshold": self.threshold,
            "structure_threshold": self.structure_threshold,
            "num_blocks": self.num_blocks,
            "num_steps": self.num_steps,
            "metric": self.metric,
            "model": self.model,
            "created": self.created,
            "block_name": self.block_name,
        }


def window_start(similarity: np.ndarray, threshold: float, end_step: int) -> int | None:
    """Smallest ``s0 >= 1`` with ``similarity[s] >= threshold`` for all ``s0 <= s < end_step``.

    ``similarity`` is one block's row of ``Analysis.cosine`` (index = step; NaN fails).
    ``None`` when ``similarity[end_step - 1]`` already fails (or ``end_step <= 1``).
    """
    s0 = None
    for s in range(end_step - 1, 0, -1):
        v = similarity[s]
        if not (math.isfinite(v) and v >= threshold):
            break
        s0 = s
    return s0


def calibrate(
    analysis: _Analysed,
    threshold: float = DEFAULT_THRESHOLD,
    end: float = DEFAULT_END,
    structure_threshold: float | None = DEFAULT_STRUCTURE_THRESHOLD,
) -> Calibration:
    """The ``cache_block`` and window of Note [The calibration rule].

    ``threshold``: the block-output cosine similarity every step of the window must meet.
    ``structure_threshold``: the adjacent-step x0 SSIM every step of the window must meet
    (Note [The structure gate]); ``None`` disables the gate.
    """
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"expected a cosine threshold in [-1, 1], got {threshold}")
    if structure_threshold is not None and not -1.0 <= structure_threshold <= 1.0:
        raise ValueError(
            f"expected an SSIM structure_threshold in [-1, 1], got {structure_threshold}"
        )
    if not 0.0 < end <= 1.0:
        raise ValueError(f"expected 0 < end <= 1, got {end}")
    cos = np.asarray(analysis.cosine, dtype=np.float64)
    num_blocks, steps = cos.shape
    if num_blocks < 2:
        raise ValueError(f"expected at least 2 blocks to calibrate, got {num_blocks}")
    end_step = math.ceil(round(end * steps, 9))
    structure_start: int | None = 1
    if structure_threshold is not None:
        x0_ssim = np.asarray(analysis.x0_ssim, dtype=np.float64)
        if np.isfinite(x0_ssim).any():
            structure_start = window_start(x0_ssim, structure_threshold, end_step)
            log.debug("calibrate: structure stable (x0 SSIM) from step %s", structure_start)
        else:
            log.warning("calibrate: no x0 SSIM in the analysis; structure gate not applied")
    best: tuple[int, int, int] | None = None  # (saving, i, s0)
    for i in range(num_blocks - 1 if structure_start is not None else 0):
        s0 = window_start(cos[i], threshold, end_step)
        if s0 is None:
            continue
        s0 = max(s0, structure_start or 1)
        reuse_steps = sum(paper_rule(steps, (s0 / steps, end), SAVING_INTERVAL))
        saving = (i + 1) * reuse_steps
        log.debug("calibrate: block %d window from step %d, saving %d", i, s0, saving)
        if saving > 0 and (best is None or saving >= best[0]):
            best = (saving, i, s0)
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    common = {
        "threshold": float(threshold),
        "structure_threshold": None if structure_threshold is None else float(structure_threshold),
        "num_blocks": num_blocks,
        "num_steps": steps,
        "metric": "cosine",
        "model": analysis.model,
        "created": created,
    }
    if best is None:
        i = default_cache_block(num_blocks)
        log.warning(
            "calibrate: no block keeps cosine >= %s (with x0 SSIM >= %s) up to %.0f%% of the "
            "steps; empty window",
            threshold,
            structure_threshold,
            end * 100,
        )
        return Calibration(
            cache_block=i, window=(end, end), block_name=analysis.block_names[i], **common
        )
    _, i, s0 = best
    return Calibration(
        cache_block=i,
        window=(round(s0 / steps, 6), float(end)),
        block_name=analysis.block_names[i],
        **common,
    )


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------

_FIELDS: dict[str, str] = {
    "format": f"the string {CALIBRATION_FORMAT!r}",
    "cache_block": "an int >= 0",
    "window": "[start, end] with 0 <= start <= end <= 1",
    "threshold": "a number in [-1, 1]",
    "structure_threshold": "null or a number in [-1, 1]",
    "num_blocks": "an int >= 2",
    "num_steps": "an int >= 1",
    "metric": f"one of {list(METRICS)}",
    "model": "a string",
    "created": "a string",
    "block_name": "a string",
}


_OPTIONAL = ("block_name", "structure_threshold")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _validate(data: Any, source: str = "calibration") -> None:
    def fail(key: str, got: object) -> ValueError:
        return ValueError(f"{source}: {key!r}: expected {_FIELDS[key]}, got {got!r}")

    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
    missing = sorted(set(_FIELDS) - set(_OPTIONAL) - set(data))
    unknown = sorted(set(data) - set(_FIELDS))
    if missing or unknown:
        raise ValueError(
            f"{source}: expected keys {sorted(_FIELDS)}, got missing {missing}, unknown {unknown}"
        )
    if data["format"] != CALIBRATION_FORMAT:
        raise fail("format", data["format"])
    if not (_is_int(data["num_blocks"]) and data["num_blocks"] >= 2):
        raise fail("num_blocks", data["num_blocks"])
    if not (_is_int(data["num_steps"]) and data["num_steps"] >= 1):
        raise fail("num_steps", data["num_steps"])
    cb = data["cache_block"]
    if not (_is_int(cb) and 0 <= cb <= data["num_blocks"] - 2):
        raise ValueError(
            f"{source}: 'cache_block': expected an int in [0, {data['num_blocks'] - 2}] "
            f"(num_blocks - 2), got {cb!r}"
        )
    w = data["window"]
    if not (
        isinstance(w, (list, tuple))
        and len(w) == 2
        and all(_is_num(x) for x in w)
        and 0.0 <= w[0] <= w[1] <= 1.0
    ):
        raise fail("window", w)
    if not (_is_num(data["threshold"]) and -1.0 <= data["threshold"] <= 1.0):
        raise fail("threshold", data["threshold"])
    st = data.get("structure_threshold")
    if st is not None and not (_is_num(st) and -1.0 <= st <= 1.0):
        raise fail("structure_threshold", st)
    if data["metric"] not in METRICS:
        raise fail("metric", data["metric"])
    for key in ("model", "created", "block_name"):
        if key in data and not isinstance(data[key], str):
            raise fail(key, data[key])


def save_calibration(cal: Calibration, path: str | Path) -> Path:
    """Write ``cal`` as JSON to ``path`` (parent folders created); return the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(cal.to_json(), indent=1) + "\n")
    return p


def load_calibration(path: str | Path) -> Calibration:
    """Read and validate a calibration JSON; ``ValueError`` ("expected ..., got ...") if bad."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"calibration {p}: expected JSON, got a parse error: {e}") from e
    _validate(data, f"calibration {p}")
    return Calibration(
        cache_block=data["cache_block"],
        window=(float(data["window"][0]), float(data["window"][1])),
        threshold=float(data["threshold"]),
        num_blocks=data["num_blocks"],
        num_steps=data["num_steps"],
        metric=data["metric"],
        model=data["model"],
        created=data["created"],
        block_name=data.get("block_name", ""),
        structure_threshold=(
            None if data.get("structure_threshold") is None else float(data["structure_threshold"])
        ),
    )
