"""Kept importable for the backend and existing callers: the calibration now lives in
``bd_compile.analysis.calibration`` (see Note [The calibration rule] there)."""

from __future__ import annotations

from bd_compile.analysis.calibration import (
    CALIBRATION_FORMAT,
    DEFAULT_END,
    DEFAULT_STRUCTURE_THRESHOLD,
    DEFAULT_THRESHOLD,
    Calibration,
    calibrate,
    load_calibration,
    save_calibration,
    window_start,
)

__all__ = [
    "CALIBRATION_FORMAT",
    "DEFAULT_END",
    "DEFAULT_STRUCTURE_THRESHOLD",
    "DEFAULT_THRESHOLD",
    "Calibration",
    "calibrate",
    "load_calibration",
    "save_calibration",
    "window_start",
]
