"""Deployment without Dynamo: one AOTInductor package per variant, and a loader that runs them.

Note [Export]
``export(model, args, kwargs, options, path)`` captures the forward with Dynamo once (one graph,
static shapes), runs the passes on it as the backend does, and exports each variant graph the
schedule needs (Note [One graph per call]: ``compute``, ``reuse``, and ``forecast`` when
``forecast > 0``) with ``torch.export`` and ``aoti_compile_and_package``, each block kind
compiled once as the backend does where AOTInductor can call subgraphs (``compile_once``, Note
[Compile-once blocks]: not in torch 2.13; a graph that does not export outlined is exported
inline, with a warning). The model's weights
become constants of each package (a package holds the weights its graph reads: ``reuse`` only
those of the blocks after the region); a package's inputs are the call's tensors and, for
``reuse``/``forecast``, the cached values, in the order ``manifest.json`` records as its plan.

``load(path)`` reads the manifest and builds the backend's own ``GraphRuntime`` and
``LoopState`` over the loaded packages, so a loaded model applies the schedule exactly as the
compiled one does (automatic, or counted with ``timesteps``): no Dynamo, no model code. A
package loads at its variant's first call.

Not supported (said here and in the README): BlockDance-Ada (``policy``), dynamic shapes (a
package runs the shapes it was exported with; others raise), inputs that are not top-level tensor
arguments of the forward, context parallelism, and the inner compiler options (AOTInductor
compiles). The manifest names the bd_compile and torch versions and each package's SHA-256:
loading a directory written by another version, or holding a package of another export, raises
a ``BlockDanceError`` naming what differs.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import inspect
import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from bd_compile.backend import BlockDanceError, apply_calibration
from bd_compile.keys import GenerationStats
from bd_compile.layout import CachedValue, Layout
from bd_compile.loop import LoopState
from bd_compile.runtime import GraphRuntime
from bd_compile.settings import Settings, from_options
from passes import RegionError, rewrite
from passes.build_variants import ARGS, Part, Variants
from passes.outline_blocks import cpp_wrapper_calls_subgraphs

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "manifest.json"
#: what a loaded model may change (the schedule; the graphs stay as exported)
LOAD_OPTIONS = ("interval", "window", "timesteps", "branches", "schedule", "forecast")
#: what ``export`` accepts: the schedule and what picks the region
EXPORT_OPTIONS = (*LOAD_OPTIONS, "cache_block", "calibration", "timestep_input", "compile_once")


def _versions() -> dict[str, str]:
    return {"bd_compile": importlib.metadata.version("bd_compile"), "torch": torch.__version__}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _settings_json(s: Settings) -> dict[str, Any]:
    out: dict[str, Any] = {k: getattr(s, k) for k in LOAD_OPTIONS}
    out["window"] = list(s.window)
    out["timesteps"] = None if s.timesteps is None else list(s.timesteps)
    out["schedule"] = None if s.schedule is None else s.schedule.tolist()
    return out


def _spec(x: torch.Tensor) -> dict[str, Any]:
    return {
        "shape": list(x.shape),
        "dtype": str(x.dtype).removeprefix("torch."),
        "device": str(x.device),
    }


def _capture(
    model: torch.nn.Module, args: Sequence[Any], kwargs: Mapping[str, Any]
) -> tuple[fx.GraphModule, list[Any], Any]:
    """The forward's one Dynamo graph, its example inputs, and the model's output."""
    graphs: list[tuple[fx.GraphModule, list[Any]]] = []

    def keep(gm: fx.GraphModule, example_inputs: list[Any]) -> Any:
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    try:
        with torch.no_grad():
            out = torch.compile(model, backend=keep, fullgraph=True, dynamic=False)(*args, **kwargs)
    except torch._dynamo.exc.Unsupported as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BlockDanceError(
            f"export needs the forward as one graph, and Dynamo could not capture it: {first}"
        ) from e
    if not graphs:
        raise BlockDanceError("export: Dynamo captured no graph of the forward (nothing to export)")
    return graphs[-1][0], graphs[-1][1], out


def _output_form(out: Any, n: int) -> dict[str, Any]:
    """How the forward's ``n`` flat outputs are put back together: a tensor, a tuple, or a
    diffusers output class (``Transformer2DModelOutput``) by import path and field names."""
    if isinstance(out, torch.Tensor) and n == 1:
        return {"kind": "tensor"}
    if isinstance(out, (tuple, list)) and len(out) == n:
        return {"kind": "tuple"}
    if hasattr(out, "to_tuple") and len(out) == n:
        cls = type(out)
        return {
            "kind": "output",
            "class": f"{cls.__module__}:{cls.__qualname__}",
            "keys": list(out),
        }
    raise BlockDanceError(f"export: cannot describe the forward's output {type(out).__name__}")


class _Variant(torch.nn.Module):
    """A variant graph with the model's weights (and numbers) as constants: what is exported.
    ``sources[j]``: graph input ``j`` is ``inputs[k]`` (an int), a buffer (a str), or a number
    (a 1-tuple)."""

    def __init__(self, gm: fx.GraphModule, sources: list[Any], weights: dict[str, torch.Tensor]):
        super().__init__()
        self.gm, self.sources = gm, sources
        for name, w in weights.items():
            self.register_buffer(name, w.detach())

    def forward(self, *inputs: Any) -> tuple[Any, ...]:
        full = [
            inputs[s] if isinstance(s, int) else getattr(self, s) if isinstance(s, str) else s[0]
            for s in self.sources
        ]
        return tuple(self.gm(*full))


def _package(
    part: Part, pools: Sequence[Sequence[Any]], user: list[int], dest: Path
) -> list[tuple[int, int]]:
    """Export ``part`` to ``dest`` on the values of ``pools``; returns the plan of the package's
    inputs over the loaded model's pools (its call's tensors first)."""
    values = part.gather(*pools)
    sources: list[Any] = []
    weights: dict[str, torch.Tensor] = {}
    plan: list[tuple[int, int]] = []
    inputs: list[torch.Tensor] = []
    for (pool, i), v in zip(part.plan, values, strict=True):
        if pool == ARGS and i not in user:
            sources.append(f"w{len(weights)}")
            weights[sources[-1]] = v
        elif isinstance(v, torch.Tensor):
            sources.append(len(inputs))
            inputs.append(v)
            plan.append((pool, user.index(i) if pool == ARGS else i))
        else:
            sources.append((v,))
    t0 = time.perf_counter()
    inline = part.inline if part.inline is not None else part.gm
    gm = part.gm if cpp_wrapper_calls_subgraphs() else inline  # Note [Compile-once blocks]
    try:
        _aoti(gm, sources, weights, inputs, dest)
    except Exception as e:
        if gm is inline:  # nothing else to try
            raise
        log.warning(
            "blockdance: the %s graph did not export with each block compiled once (%s: %s); "
            "exporting its blocks inline",
            dest.stem,
            type(e).__name__,
            str(e).splitlines()[0] if str(e) else "",
        )
        _aoti(inline, sources, weights, inputs, dest)
    log.info("blockdance: exported %s in %.0f s", dest.name, time.perf_counter() - t0)
    return plan


def _aoti(
    gm: fx.GraphModule,
    sources: list[Any],
    weights: dict[str, torch.Tensor],
    inputs: list[torch.Tensor],
    dest: Path,
) -> None:
    with torch.no_grad():
        ep = torch.export.export(_Variant(gm, sources, weights), tuple(inputs))
        torch._inductor.aoti_compile_and_package(ep, package_path=str(dest))


def export(
    model: torch.nn.Module,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
    path: str | Path = "blockdance_export",
) -> Path:
    """Write one AOTInductor package per variant the schedule needs and ``manifest.json`` to
    ``path`` (Note [Export]); ``args``/``kwargs``: one call of ``model`` with the shapes to
    serve. Raises ``BlockDanceError`` (with the reason) when the graph cannot be rewritten."""
    kwargs = dict(kwargs or {})
    options = dict(options or {})
    unsupported = sorted(set(options) - set(EXPORT_OPTIONS))
    if unsupported:
        raise ValueError(
            f"blockdance export: option(s) {unsupported} not supported; expected a subset of "
            f"{list(EXPORT_OPTIONS)} (Ada, inner compilers and context parallelism do not export)"
        )
    s, calibrated_for = apply_calibration(from_options(options))
    gm, example_inputs, out = _capture(model, args, kwargs)
    try:
        rw = rewrite(
            gm,
            example_inputs,
            timestep_input=s.timestep_input,
            cache_block=s.cache_block,
            calibrated_for=calibrated_for,
            compile_once=s.compile_once,
        )
    except RegionError as e:
        raise BlockDanceError(f"blockdance cannot export this model: {e}") from e
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    user = [
        i
        for i, (n, x) in enumerate(zip(placeholders, example_inputs, strict=True))
        if not isinstance(x, torch.nn.Parameter) and not n.name.startswith("l_self_")
    ]
    bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
    names = [rw.input_names[i] for i in user]
    for i, name in zip(user, names, strict=True):
        if not isinstance(example_inputs[i], torch.Tensor) or name not in bound:
            raise BlockDanceError(
                f"export takes tensors passed as top-level arguments of the forward; the graph "
                f"input {name!r} is not one (got {sorted(bound)})"
            )
    v = rw.variants
    if rw.timestep_index is None or rw.timestep_index not in user:
        raise BlockDanceError("export needs the timestep as a tensor argument of the forward")
    dest = Path(path)
    dest.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        cache = tuple(v.compute.gm(*example_inputs)[v.num_outputs :])
    if not all(isinstance(c, torch.Tensor) for c in cache):
        raise BlockDanceError("export supports models whose cached values are all tensors")
    # one (oldest, older, last) weights tensor per cached value, as the forecast graph takes them
    weights = [torch.tensor([0.0, -1.0, 2.0], dtype=c.dtype, device=c.device) for c in cache]
    # torch.export treats one tensor passed as several inputs as one input: the forecast
    # package would read the last cache for all three, so the older caches are copies
    older, oldest = (tuple(c.clone() for c in cache) for _ in range(2))
    pools = (example_inputs, cache, older, oldest, weights)
    names_needed = ("compute", "reuse", *(("forecast",) if s.forecast else ()))
    plans = {}
    for name in names_needed:
        log.info("blockdance: exporting the %s graph (AOTInductor compiles it: minutes)", name)
        plans[name] = _package(v.by_name(name), pools, user, dest / f"{name}.pt2")
    region = rw.region
    manifest = {
        "format": FORMAT,
        **_versions(),
        "model": type(model).__name__,
        "parameters": list(inspect.signature(model.forward).parameters),
        "inputs": [
            {"name": nm, **_spec(example_inputs[i])} for i, nm in zip(user, names, strict=True)
        ],
        "constants": {
            k: x for k, x in bound.items() if not isinstance(x, torch.Tensor) and _jsonable(x)
        },
        "timestep_index": user.index(rw.timestep_index),
        "num_outputs": v.num_outputs,
        "single_output": v.single_output,
        "output": _output_form(out, v.num_outputs),
        "layout": {
            "blocks": [[b.name, b.cls] for b in region.blocks],
            "cache_block": region.cache_block,
            "cached": [
                [d, list(c.shape), str(c.dtype).removeprefix("torch.")]
                for d, c in zip(region.descriptions, cache, strict=True)
            ],
        },
        "settings": _settings_json(s),
        "variants": {
            name: {
                "file": f"{name}.pt2",
                "sha256": _sha256(dest / f"{name}.pt2"),
                "plan": plans[name],
            }
            for name in names_needed
        },
    }
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return dest


def _jsonable(x: Any) -> bool:
    try:
        json.dumps(x)
    except TypeError:
        return False
    return True


class ExportedModel:
    """A model loaded by ``load``: called like the model's forward, it runs the exported
    packages under the backend's runtime (Note [Export])."""

    def __init__(self, path: Path, manifest: dict[str, Any], settings: Settings) -> None:
        self.path, self.manifest, self.settings = path, manifest, settings
        self.inputs: list[dict[str, Any]] = manifest["inputs"]
        self._loaded: dict[str, Any] = {}
        stubs: dict[str, Part] = {}
        for name in ("compute", "reuse", "forecast", "mixed"):
            plan = manifest["variants"].get(name, {}).get("plan", [])
            gm = fx.GraphModule(torch.nn.Module(), fx.Graph(), class_name=name)
            stubs[name] = Part(gm, tuple((int(p), int(i)) for p, i in plan), ())
        self._names = {id(part.gm): name for name, part in stubs.items()}
        variants = Variants(
            **stubs,
            num_outputs=manifest["num_outputs"],
            single_output=manifest["single_output"],
        )
        lay = manifest["layout"]
        layout = Layout(
            blocks=tuple((b, c) for b, c in lay["blocks"]),
            cache_block=lay["cache_block"],
            cached=tuple(
                CachedValue(d, tuple(shape), getattr(torch, dtype))
                for d, shape, dtype in lay["cached"]
            ),
            timestep_input=self.inputs[manifest["timestep_index"]]["name"],
            inner="aoti",
        )
        self.state = LoopState(settings)
        self.runtime = GraphRuntime(
            variants,
            self._package,
            self.state,
            layout,
            manifest["timestep_index"],
            range(len(self.inputs)),
            frozenset(),
        )

    def _package(self, gm: fx.GraphModule, example_inputs: list[Any]) -> Any:
        """The runtime's inner compiler: loads the variant's package (once)."""
        name = self._names[id(gm)]
        if name not in self.manifest["variants"]:
            raise BlockDanceError(
                f"the export at {self.path} has no {name} package: export with the options "
                f"that need it (forecast > 0 for forecast)"
            )
        if name not in self._loaded:
            file = self.path / self.manifest["variants"][name]["file"]
            log.info("blockdance: loading %s", file)
            self._loaded[name] = torch._inductor.aoti_load_package(str(file))
        return self._loaded[name]

    @property
    def generations(self) -> list[GenerationStats]:
        """The finished and running generations, oldest first (``bd_compile.stats``' records)."""
        return [*self.state.finished, *self.state.running()]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        params: list[str] = self.manifest["parameters"]
        if len(args) > len(params):
            raise TypeError(f"expected at most {len(params)} positional arguments, got {len(args)}")
        given = dict(zip(params, args, strict=False))
        for k, x in kwargs.items():
            if k in given:
                raise TypeError(f"got multiple values for argument {k!r}")
            if k not in params:
                raise TypeError(f"unexpected keyword argument {k!r}; the forward takes {params}")
            given[k] = x
        tensors = []
        for spec in self.inputs:
            x = given.pop(spec["name"], None)
            if not isinstance(x, torch.Tensor) or _spec(x) != {
                k: spec[k] for k in ("shape", "dtype", "device")
            }:
                got = _spec(x) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"{spec['name']}: exported for {_describe(spec)}, got {got}")
            tensors.append(x.contiguous())  # a package assumes its inputs' strides
        constants = self.manifest["constants"]
        for k, x in given.items():
            if constants.get(k) != x:
                raise ValueError(
                    f"{k}: the export was made with {k}={constants.get(k)!r} (fixed in the "
                    f"packages), got {x!r}"
                )
        flat = self.runtime(*tensors)
        form = self.manifest["output"]
        if form["kind"] == "tensor":
            return flat
        flat = (flat,) if self.manifest["single_output"] else tuple(flat)
        if form["kind"] == "tuple":
            return flat
        module, qualname = form["class"].split(":")
        cls: Any = importlib.import_module(module)
        for part in qualname.split("."):
            cls = getattr(cls, part)
        return cls(**dict(zip(form["keys"], flat, strict=True)))


def _describe(spec: Mapping[str, Any]) -> str:
    return f"a {spec['dtype']} tensor of shape {spec['shape']} on {spec['device']}"


def load(path: str | Path, options: Mapping[str, Any] | None = None) -> ExportedModel:
    """The model ``export`` wrote to ``path``, callable like its forward. ``options`` may change
    the schedule (a subset of ``LOAD_OPTIONS``); the graphs stay as exported."""
    folder = Path(path)
    file = folder / MANIFEST
    if not file.is_file():
        raise FileNotFoundError(f"expected a blockdance export with {MANIFEST}, got {folder}")
    manifest = json.loads(file.read_text())
    if manifest.get("format") != FORMAT:
        raise BlockDanceError(
            f"{file}: export format {manifest.get('format')!r}, this bd_compile reads {FORMAT}"
        )
    for what, version in _versions().items():
        if manifest.get(what) != version:
            raise BlockDanceError(
                f"{folder} was exported with {what} {manifest.get(what)}, this is {what} "
                f"{version}: export it again with this version"
            )
    for name, entry in manifest["variants"].items():
        if _sha256(folder / entry["file"]) != entry["sha256"]:
            raise BlockDanceError(
                f"{folder / entry['file']} is not the {name} package this manifest was written "
                f"with (its SHA-256 differs): a package of another export?"
            )
    unknown = sorted(set(options or {}) - set(LOAD_OPTIONS))
    if unknown:
        raise ValueError(
            f"blockdance load: option(s) {unknown} cannot change after export; expected a "
            f"subset of {list(LOAD_OPTIONS)}"
        )
    settings = from_options({**manifest["settings"], **(options or {})})
    if settings.forecast and "forecast" not in manifest["variants"]:
        raise ValueError(
            f"forecast={settings.forecast} needs the forecast package; export with forecast > 0"
        )
    return ExportedModel(folder, manifest, settings)
