"""Measure the STSS pattern of any DiT: how much each block's output changes between steps.

BlockDance rests on one observation (the paper's Figs. 2-3): between adjacent denoising steps the
outputs of the shallow and middle blocks barely change once the structure has formed, while the
deep blocks keep changing. ``analyze`` measures that on *your* model and sampler, and
``calibrate`` turns the measurement into a ``cache_block`` and a window.

The package, one concern per module:

- ``record``: the recording Dynamo backend (the backend's own block tagging) and ``analyze``,
  which samples with ``bd_compile.sampling.denoise`` and records every block on every step;
- ``stats``: the streaming statistics (cosine, relative L2, step x step matrix, x0 SSIM);
- ``result``: ``Analysis``, the arrays of one run, and its JSON form (numpy only);
- ``report``: the plain-English summary and the figures (matplotlib, optional);
- ``calibration``: the calibration rule (``calibrate``) and its JSON file
  (``bd_compile.calibration`` re-exports it);
- ``__main__``: the command line, ``python -m bd_compile.analysis``.

The names below are loaded on first use (PEP 562): the backend imports ``calibration`` to read
a calibration file, and that must not pull in the recording and sampling stack (diffusers models).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bd_compile.analysis.calibration import (
        Calibration,
        calibrate,
        load_calibration,
        save_calibration,
        window_start,
    )
    from bd_compile.analysis.record import analyze, block_outputs, recording_backend
    from bd_compile.analysis.result import ANALYSIS_FORMAT, Analysis
    from bd_compile.analysis.stats import (
        StatsSink,
        cosine_matrix,
        cosine_similarity,
        relative_l2,
        x0_ssim,
    )

_MODULE_OF = {
    "Calibration": "calibration",
    "calibrate": "calibration",
    "load_calibration": "calibration",
    "save_calibration": "calibration",
    "window_start": "calibration",
    "analyze": "record",
    "block_outputs": "record",
    "recording_backend": "record",
    "ANALYSIS_FORMAT": "result",
    "Analysis": "result",
    "StatsSink": "stats",
    "cosine_matrix": "stats",
    "cosine_similarity": "stats",
    "relative_l2": "stats",
    "x0_ssim": "stats",
}

__all__ = [
    "ANALYSIS_FORMAT",
    "Analysis",
    "Calibration",
    "StatsSink",
    "analyze",
    "block_outputs",
    "calibrate",
    "cosine_matrix",
    "cosine_similarity",
    "load_calibration",
    "recording_backend",
    "relative_l2",
    "save_calibration",
    "window_start",
    "x0_ssim",
]


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    # Note: no module of this package is named like one of its names (``calibrate`` lives in
    # ``calibration``), or importing the module would shadow the name.
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
