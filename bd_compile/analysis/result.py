"""The result of an analysis: per block x step arrays, their JSON form and the written report.

``Analysis.to_json``/``from_json``/``load`` need only numpy; ``save`` also writes the figures
(``bd_compile.analysis.report``), which need matplotlib (the ``analysis`` extra).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bd_compile.analysis import report
from bd_compile.analysis.calibration import Calibration, calibrate
from bd_compile.analysis.stats import StatsSink, cosine_matrix

log = logging.getLogger(__name__)

ANALYSIS_FORMAT = "bd_compile.analysis/1"


# --------------------------------------------------------------------------------------------
# The result
# --------------------------------------------------------------------------------------------


def _nan_list(a: np.ndarray) -> Any:
    """A JSON-safe nested list: NaN/inf -> None."""
    if a.ndim == 0:
        v = float(a)
        return v if math.isfinite(v) else None
    return [_nan_list(x) for x in a]


def _from_nan_list(x: Any) -> np.ndarray:
    def conv(v: Any) -> Any:
        if isinstance(v, list):
            return [conv(u) for u in v]
        return math.nan if v is None else float(v)

    return np.asarray(conv(x), dtype=np.float64)


@dataclass
class Analysis:
    """Per block x step statistics of one sampling run (see ``analyze``).

    Arrays (``L`` blocks, ``S`` steps; column ``s`` compares step ``s`` with step ``s - 1``, so
    column 0 is NaN):

    - ``cosine [L, S]``, ``rel_l2 [L, S]``: adjacent-step statistics per block;
    - ``step_cosine [S, S]``: cosine similarity of the chosen block across all step pairs;
    - ``x0_ssim [S]``: SSIM of the x0 predictions of steps ``s`` and ``s - 1``.
    """

    block_names: list[str]
    block_classes: list[str]
    timesteps: np.ndarray
    cosine: np.ndarray
    rel_l2: np.ndarray
    chosen_block: int
    step_cosine: np.ndarray
    x0_ssim: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_blocks(self) -> int:
        return len(self.block_names)

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def model(self) -> str:
        return str(self.meta.get("model", "unknown"))

    @classmethod
    def from_sink(
        cls,
        sink: StatsSink,
        timesteps: Sequence[float],
        x0_ssim: Sequence[float],
        meta: dict[str, Any],
    ) -> Analysis:
        steps = len(timesteps)
        cos = np.full((len(sink.names), steps), np.nan)
        l2 = np.full_like(cos, np.nan)
        for s in range(steps):
            for k, name in enumerate(sink.names):
                cos[k, s] = sink.cosine[s].get(name, np.nan)
                l2[k, s] = sink.rel_l2[s].get(name, np.nan)
        chosen = sink.names.index(sink.chosen) if sink.chosen is not None else 0
        shapes = {tuple(v.shape) for v in sink.chosen_values}
        if len(shapes) == 1:
            mat = cosine_matrix(torch.stack(sink.chosen_values)).numpy()
        else:
            mat = np.full((steps, steps), np.nan)
        meta = {**meta, "features": {n: sink.features.get(n) for n in sink.names}}
        return cls(
            block_names=list(sink.names),
            block_classes=[sink.classes[n] for n in sink.names],
            timesteps=np.asarray(timesteps, dtype=np.float64),
            cosine=cos,
            rel_l2=l2,
            chosen_block=chosen,
            step_cosine=mat,
            x0_ssim=np.asarray(x0_ssim, dtype=np.float64),
            meta=meta,
        )

    # -- serialisation --------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format": ANALYSIS_FORMAT,
            "meta": self.meta,
            "block_names": self.block_names,
            "block_classes": self.block_classes,
            "timesteps": _nan_list(self.timesteps),
            "chosen_block": self.chosen_block,
            "cosine": _nan_list(self.cosine),
            "rel_l2": _nan_list(self.rel_l2),
            "step_cosine": _nan_list(self.step_cosine),
            "x0_ssim": _nan_list(self.x0_ssim),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Analysis:
        if not isinstance(data, dict) or data.get("format") != ANALYSIS_FORMAT:
            got = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"expected an analysis with format {ANALYSIS_FORMAT!r}, got {got!r}")
        return cls(
            block_names=list(data["block_names"]),
            block_classes=list(data["block_classes"]),
            timesteps=_from_nan_list(data["timesteps"]),
            cosine=_from_nan_list(data["cosine"]).reshape(len(data["block_names"]), -1),
            rel_l2=_from_nan_list(data["rel_l2"]).reshape(len(data["block_names"]), -1),
            chosen_block=int(data["chosen_block"]),
            step_cosine=_from_nan_list(data["step_cosine"]),
            x0_ssim=_from_nan_list(data["x0_ssim"]),
            meta=dict(data.get("meta", {})),
        )

    @classmethod
    def load(cls, path: str | Path) -> Analysis:
        """Read an ``analysis.json`` written by ``save`` (a file or its folder)."""
        p = Path(path)
        if p.is_dir():
            p = p / "analysis.json"
        return cls.from_json(json.loads(p.read_text()))

    # -- the report ---------------------------------------------------------------------------
    def summary(self, calibration: Calibration | None = None) -> str:
        """One plain-English paragraph: is there an STSS pattern, where, what calibration picks
        (``report.summary``)."""
        return report.summary(self, calibration)

    def save(
        self, out_dir: str | Path, calibration: Calibration | None = None, figures: bool = True
    ) -> dict[str, Path]:
        """Write ``analysis.json``, ``summary.txt`` and (``figures``) the PNGs; return their paths.

        ``calibration`` is reported in the summary and the JSON; by default ``calibrate(self)``
        with its default threshold. The JSON and the summary need only numpy; without matplotlib
        the figures are skipped with a warning.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        cal = calibration if calibration is not None else calibrate(self)
        paths: dict[str, Path] = {}
        if figures:
            try:
                paths.update(report.plot(self, out))
            except ImportError as e:  # matplotlib is optional (the ``analysis`` extra)
                log.warning("blockdance analysis: no figures written (%s)", e)
        data = self.to_json()
        data["calibration"] = cal.to_json()
        paths["json"] = out / "analysis.json"
        paths["json"].write_text(json.dumps(data, indent=1) + "\n")
        paths["summary"] = out / "summary.txt"
        paths["summary"].write_text(self.summary(cal) + "\n")
        log.info("blockdance analysis written to %s", out)
        return paths
