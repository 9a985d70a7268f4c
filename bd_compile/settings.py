"""The one settings object of the backend: defaults, validation, and parsing of ``options``.

Every option a user can pass as ``torch.compile(..., backend="blockdance", options={...})``
is a field here, with its default in one place. Unknown keys and bad values raise
``ValueError`` naming what was expected and what was given.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from passes.find_cached_region import default_cache_block  # re-exported: a public name

__all__ = ["FIELDS", "Settings", "default_cache_block", "from_options", "validate"]


@dataclass(frozen=True)
class Settings:
    """BlockDance options. See the README's options table for the user-facing description.

    cache_block: index, in execution order over all block lists, of the last block skipped on
        reuse steps; ``None`` means 75% of depth (``passes.default_cache_block``). Checked
        against the graph's block count in ``passes.resolve_cache_block`` only.
    interval: N of BlockDance-N; in the reuse window the first step of every group of N is a
        cache step and the other N-1 reuse the cache. ``1`` computes every step.
    window: (start, end) fractions of the denoising trajectory where reuse may happen.
    timesteps: the sampler's model-facing timestep list; the paper's rule is then applied to
        it exactly, and steps are counted on the host, never read from the timestep tensor (no
        device-to-host sync per call, Note [Counted steps]): a generation is exactly
        ``len(timesteps)`` steps of ``branches`` calls each.
    branches: with ``timesteps``: how many times the loop calls the model per step (1 for
        batched CFG, 2 for sequential cond/uncond).
    schedule: explicit bool mask indexed by integer timestep, ``True`` = reuse at that timestep.
    calibration: path of a calibration JSON written by ``bd_compile.analyze`` whose
        ``cache_block`` and ``window`` replace the defaults.
    inner: the compiler the rewritten graphs go to: ``"inductor"`` or any registered backend.
    strict: raise instead of falling back to the inner compiler when the graph can't be rewritten.
    timestep_input: name of the forward argument that carries the timestep, if it isn't
        ``timestep``/``t``/``sigma``.
    forecast: 0 = the paper's copy; 1 or 2 = on a reuse step, extrapolate the cached values
        from the last ``forecast + 1`` cache steps (linear / quadratic in the trajectory's
        progress, Note [Forecast reuse] in runtime.py); copies until that many exist.
    inner_options: for ``inner="inductor"``: ``{"mode": "max-autotune" | "reduce-overhead" |
        ...}`` and/or inductor config keys (``"triton.cudagraphs": True``), applied to the
        compile of every graph. Stored as sorted (key, value) pairs.
    policy: path of a BlockDance-Ada policy file (``bd_compile.ada``): per-sample decisions
        from the region output at progress ``rho`` replace the static schedule for the rest of
        the generation (Note [BlockDance-Ada]). Not together with ``schedule`` or ``forecast``.
    policy_rows: how batch rows form samples for the policy: ``"cfg"`` (rows ``i`` and
        ``i + rows / 2`` are one sample, diffusers' batched guidance ``[cond; uncond]``; an odd
        row count: one row per sample) or ``"each"`` (every row is a sample: no guidance, or
        sequential guidance).
    policy_sync: ``"auto"`` (sum the policy's pooled statistics over diffusers'
        context-parallel group when the model has one), ``"always"`` (that group, else the
        default group) or ``"never"``.
    compile_once: compile each kind of block once and call it per block, inside each
        variant's one graph (Note [Compile-once blocks] in ``passes/outline_blocks.py``): a
        cold start near regional compilation's. ``False``: every block inline, as before.
    """

    cache_block: int | None = None
    interval: int = 2
    window: tuple[float, float] = (0.4, 0.95)
    timesteps: tuple[float, ...] | None = None
    branches: int = 1
    schedule: torch.Tensor | None = field(default=None, compare=False)
    calibration: str | None = None
    inner: str = "inductor"
    strict: bool = False
    timestep_input: str | None = None
    forecast: int = 0
    inner_options: tuple[tuple[str, Any], ...] = field(default=(), compare=False)
    policy: str | None = None
    policy_rows: str = "cfg"
    policy_sync: str = "auto"
    compile_once: bool = True

    def __post_init__(self) -> None:
        validate(self)

    def replace(self, **changes: Any) -> Settings:
        return from_options(changes, base=self)


def _fail(name: str, expected: str, got: object) -> ValueError:
    return ValueError(f"blockdance option {name!r}: expected {expected}, got {got!r}")


def validate(s: Settings) -> None:
    if s.cache_block is not None and (
        isinstance(s.cache_block, bool) or not isinstance(s.cache_block, int) or s.cache_block < 0
    ):
        raise _fail("cache_block", "an int >= 0 or None", s.cache_block)
    if isinstance(s.interval, bool) or not isinstance(s.interval, int) or s.interval < 1:
        raise _fail("interval", "an int >= 1", s.interval)
    w = s.window
    if (
        not isinstance(w, tuple)
        or len(w) != 2
        or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in w)
        or not 0.0 <= w[0] <= w[1] <= 1.0
    ):
        raise _fail("window", "(start, end) with 0 <= start <= end <= 1", w)
    if s.timesteps is not None and (
        len(s.timesteps) == 0 or not all(isinstance(x, (int, float)) for x in s.timesteps)
    ):
        raise _fail("timesteps", "a non-empty sequence of numbers", s.timesteps)
    if isinstance(s.branches, bool) or not isinstance(s.branches, int) or s.branches < 1:
        raise _fail("branches", "an int >= 1 (model calls per step)", s.branches)
    if s.branches != 1 and s.timesteps is None:
        raise _fail(
            "branches", "1 unless 'timesteps' is given (it counts calls per step)", s.branches
        )
    if s.schedule is not None:
        if not isinstance(s.schedule, torch.Tensor) or s.schedule.dim() != 1:
            raise _fail("schedule", "a 1-d bool tensor indexed by timestep", s.schedule)
        if s.schedule.dtype != torch.bool:
            raise _fail("schedule", "dtype torch.bool", s.schedule.dtype)
    if s.schedule is not None and s.timesteps is not None:
        raise ValueError(
            "blockdance options 'schedule' and 'timesteps': expected at most one, got both"
        )
    if not isinstance(s.inner, str) or not s.inner or s.inner == "blockdance":
        raise _fail("inner", "a registered backend name other than 'blockdance'", s.inner)
    if not isinstance(s.strict, bool):
        raise _fail("strict", "a bool", s.strict)
    if not isinstance(s.compile_once, bool):
        raise _fail("compile_once", "a bool", s.compile_once)
    if s.timestep_input is not None and not isinstance(s.timestep_input, str):
        raise _fail("timestep_input", "an argument name (str) or None", s.timestep_input)
    if s.calibration is not None and not isinstance(s.calibration, str):
        raise _fail("calibration", "a path (str) or None", s.calibration)
    if type(s.forecast) is not int or s.forecast not in (0, 1, 2):
        raise _fail("forecast", "0 (copy), 1 (linear) or 2 (quadratic)", s.forecast)
    if s.inner_options:
        inductor_config_patches(s)  # raises on unknown keys or modes
    if s.policy is not None and (not isinstance(s.policy, str) or not s.policy):
        raise _fail("policy", "a path (str) of a BlockDance-Ada policy file or None", s.policy)
    if s.policy is not None and s.schedule is not None:
        raise ValueError(
            "blockdance options 'policy' and 'schedule': expected at most one, got both"
        )
    if s.policy is not None and s.forecast:
        raise ValueError(
            "blockdance options 'policy' and 'forecast': expected at most one, got both "
            f"(forecast={s.forecast})"
        )
    if s.policy_rows not in POLICY_ROWS:
        raise _fail("policy_rows", f"one of {list(POLICY_ROWS)}", s.policy_rows)
    if s.policy_sync not in POLICY_SYNC:
        raise _fail("policy_sync", f"one of {list(POLICY_SYNC)}", s.policy_sync)


POLICY_ROWS = ("cfg", "each")
POLICY_SYNC = ("auto", "always", "never")


INNER_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def inductor_config_patches(s: Settings) -> dict[str, Any]:
    """The inductor config patches ``inner_options`` stands for (``mode`` expanded as
    ``torch.compile`` does). Raises ``ValueError`` for another inner compiler, an unknown mode
    or an unknown config key."""
    if not s.inner_options:
        return {}
    if s.inner != "inductor":
        raise _fail("inner_options", "no inner_options unless inner='inductor'", s.inner_options)
    import torch._inductor  # inductor's config: only when inner_options are given

    options = dict(s.inner_options)
    mode = options.pop("mode", None)
    patches: dict[str, Any] = {}
    if mode is not None:
        if mode not in INNER_MODES:
            raise _fail("inner_options['mode']", f"one of {list(INNER_MODES)}", mode)
        patches.update(torch._inductor.list_mode_options(mode))
    known = torch._inductor.config.get_config_copy()
    unknown = sorted(k for k in options if k not in known)
    if unknown:
        raise _fail("inner_options", "'mode' or inductor config keys", unknown)
    patches.update(options)
    return patches


def uses_cpp_wrapper(s: Settings) -> bool:
    """Whether the inner compiler is inductor generating a C++ wrapper (``cpp_wrapper`` in
    ``inner_options``, else inductor's config)."""
    if s.inner != "inductor":
        return False
    from torch._inductor import config

    return bool(inductor_config_patches(s).get("cpp_wrapper", config.cpp_wrapper))


FIELDS = tuple(f.name for f in dataclasses.fields(Settings))


def _coerce(key: str, value: Any) -> Any:
    """Accept the natural Python spellings (lists, numpy values) for tuple/tensor fields."""
    if key == "window" and isinstance(value, Sequence) and not isinstance(value, str):
        return tuple(float(x) if isinstance(x, (int, float)) else x for x in value)
    if key == "timesteps" and value is not None:
        if isinstance(value, torch.Tensor):
            return tuple(float(x) for x in value.flatten().tolist())
        if isinstance(value, Sequence) and not isinstance(value, str):
            return tuple(float(x) if hasattr(x, "__float__") else x for x in value)
    if key == "schedule" and value is not None and not isinstance(value, torch.Tensor):
        if isinstance(value, Sequence) and not isinstance(value, str):
            return torch.tensor([bool(x) for x in value], dtype=torch.bool)
    if key in ("calibration", "policy") and value is not None and hasattr(value, "__fspath__"):
        return str(value)
    if key == "inner_options":
        if value is None:
            return ()
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise _fail("inner_options", "a dict of str keys", value)
        return tuple(sorted(value.items()))
    return value


def from_options(options: Mapping[str, Any] | None, base: Settings | None = None) -> Settings:
    """Settings from a ``torch.compile`` options dict; unknown keys raise ``ValueError``."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(FIELDS))
    if unknown:
        raise ValueError(
            f"blockdance: unknown option(s) {unknown}; expected a subset of {list(FIELDS)}"
        )
    changes = {k: _coerce(k, v) for k, v in options.items()}
    return dataclasses.replace(base or Settings(), **changes)
