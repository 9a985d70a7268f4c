"""BlockDance side by side with what users would pick instead (issue 20): cache-dit's DBCache
(eager and under ``torch.compile``, with and without TaylorSeer), diffusers'
``TaylorSeerCacheConfig`` and ``MagCacheConfig`` hooks, on the project's reference DiTs.

    python -m benchmarks.quality.peers --dataset mnist --samples 20
    python -m benchmarks.quality.peers --dataset colour --samples 8 --speed-batch 2

Every method samples the same seeds and labels (the same initial noise), with the same sampler
(DDIM 50 and DPM-Solver++ 25, batched CFG, scale 3). Per method: the computed block fraction
from the method's own statistics (BlockDance: ``bd_compile.stats``; cache-dit:
``cache_dit.summary``; diffusers' hooks: calls of each block's own forward, counted below the
hook), the median of ``--repeats`` interleaved timed generations at ``--speed-batch`` (one
process, one thread), and PSNR/SSIM/FID/class accuracy against the full output as
``benchmarks.quality`` computes them. Each peer gets a deep copy of the model. A peer whose
package is missing is reported "not run" (``pip install -e .[peers]``). Writes
``results/peers-<dataset>.csv``/``.json`` and ``peers-<dataset>.md`` (``--part report``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers.hooks import HookRegistry
from diffusers.utils import logging as diffusers_logging

import bd_compile
from bd_compile import default_cache_block
from benchmarks.common import log, machine, median, region_flop_fraction, timed, write_csv
from benchmarks.quality.plan import (
    Scenario,
    command_line,
    example_kwargs,
    fixed_inputs,
    load_dataset,
    load_model,
    num_classes,
)
from benchmarks.quality.quality import features, quality_row
from benchmarks.reference.classifier_common import predict
from benchmarks.reference.sampling import make_sampler, sample

BENCHMARKS = Path(__file__).resolve().parent.parent
RESULTS = BENCHMARKS / "results"
COLOUR = BENCHMARKS / "reference" / "colour"

Denoise = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Peer:
    """One method: ``kind`` says which model object runs it, ``settings`` its knobs."""

    name: str
    family: str  # full | blockdance | cache-dit | cache-dit-compiled | taylorseer | magcache
    kind: str
    settings: dict[str, Any] = field(default_factory=dict, hash=False)


def plan_peers(num_blocks: int, quick: bool = False) -> list[Peer]:
    """The methods: BlockDance's copy and forecast 1 at N = 2, 3, 4 (25-95%), forecast 1 at
    N = 4, 6, 8 (10-95%) and, caching all blocks but the last, at N = 3, 4, 6, 8, 12 (10-95%)
    and 16 (10-100%), cache-dit F1B0/F4B0/F8B0 at thresholds and warm-ups spanning 0.3-0.9 of
    the block work, TaylorSeer order 0/1/2, one compiled cache-dit setting per order 0/1,
    diffusers' TaylorSeer at intervals 2/3/5 and MagCache (calibrated) at two thresholds."""
    out = [
        Peer("full (eager)", "full", "eager"),
        Peer("full (inductor)", "full", "inductor"),
    ]
    # the paper's window, and forecast 1 on a wider one at N = 4, 6, 8: settings as fast as the
    # peers' fastest (above 1.5x), where the paper's window has none; and forecast 1 with all
    # blocks but the last cached (cache_block = blocks - 2, like cache-dit's F1B0, which
    # computes one block): each reuse step skips more, so fewer reuse steps reach a speed
    deep = num_blocks - 2
    blockdance = [(f, n, (0.25, 0.95), None) for f in (0, 1) for n in (2, 3, 4)]
    blockdance += [(1, n, (0.1, 0.95), None) for n in (4, 6, 8)]
    blockdance += [(1, n, (0.1, 0.95), deep) for n in (3, 4, 6, 8, 12)]
    blockdance.append((1, 16, (0.1, 1.0), deep))  # as fast as cache-dit's fastest (~3.4x)
    for f, n, (start, end), cache_block in blockdance:
        settings: dict[str, Any] = {"interval": n, "window": (start, end), "forecast": f}
        cached = ""
        if cache_block is not None:
            settings["cache_block"] = cache_block
            cached = f" cached 0-{cache_block}"
        name = f"BlockDance{f' +forecast {f}' if f else ''} N={n} {start:.0%}-{end:.0%}{cached}"
        out.append(Peer(name, "blockdance", "blockdance", settings))
    half = num_blocks // 2
    grid: list[tuple[int, float, int, int]] = [  # Fn, threshold, warm-up steps, TaylorSeer order
        (1, 0.08, 4, 0),
        (1, 0.16, 4, 0),
        (1, 0.3, 4, 0),
        (1, 0.08, 4, 1),
        (1, 0.16, 4, 1),
        (1, 0.3, 4, 1),
        (1, 0.16, 4, 2),
        (1, 0.3, 8, 2),
        (4, 0.16, 4, 1),
        (4, 0.3, 4, 1),
        (min(8, half + 2), 0.3, 4, 1),
    ]
    if quick:
        grid = grid[:2]
    for fn, thr, warm, order in grid:
        ts = f" +TaylorSeer {order}" if order else ""
        out.append(
            Peer(
                f"cache-dit F{fn}B0 R{thr:g} W{warm}{ts}",
                "cache-dit",
                "cache-dit",
                {"Fn": fn, "threshold": thr, "warmup": warm, "order": order},
            )
        )
    for fn, thr, warm, order in ((1, 0.16, 4, 0), (1, 0.16, 4, 1))[: 1 if quick else 2]:
        ts = f" +TaylorSeer {order}" if order else ""
        out.append(
            Peer(
                f"cache-dit F{fn}B0 R{thr:g} W{warm}{ts} (compiled)",
                "cache-dit-compiled",
                "cache-dit-compiled",
                {"Fn": fn, "threshold": thr, "warmup": warm, "order": order},
            )
        )
    for interval in (2, 3, 5):
        out.append(
            Peer(
                f"diffusers TaylorSeer interval {interval}",
                "taylorseer",
                "taylorseer",
                {"interval": interval},
            )
        )
    for thr in (0.06, 0.12, 0.24):
        out.append(Peer(f"diffusers MagCache {thr:g}", "magcache", "magcache", {"threshold": thr}))
    return out


class BlockCounter:
    """The block work a hooked model really computed: calls of each block's ``attn1.to_q`` and
    ``ff`` (plain forward hooks below diffusers' hooks, which run only when the module really
    computes), weighted by their FLOP shares (``torch.utils.flop_counter``). MagCache skips
    whole blocks (both count); diffusers' TaylorSeer predicts the attention modules only."""

    def __init__(self, model: Any) -> None:
        self.attn = self.ff = 0
        n = len(model.transformer_blocks)
        kwargs = example_kwargs(model)
        a = region_flop_fraction(model, kwargs, [f"transformer_blocks.{i}.attn1" for i in range(n)])
        f = region_flop_fraction(model, kwargs, [f"transformer_blocks.{i}.ff" for i in range(n)])
        self.attn_weight = a / (a + f)
        for b in model.transformer_blocks:
            b.attn1.to_q.register_forward_hook(self._on_attn)
            b.ff.register_forward_hook(self._on_ff)

    def _on_attn(self, *_: Any) -> None:
        self.attn += 1

    def _on_ff(self, *_: Any) -> None:
        self.ff += 1

    def reset(self) -> None:
        self.attn = self.ff = 0

    def fraction(self, full_calls: int) -> float:
        w = self.attn_weight
        return (w * self.attn + (1 - w) * self.ff) / full_calls


class Runner:
    """A method's model object and one generation of it."""

    def __init__(self, peer: Peer, model: Any, train_config: Any, shared: dict[str, Any]):
        self.peer, self.train_config = peer, train_config
        self.model = copy.deepcopy(model)
        self.num_blocks = len(model.transformer_blocks)
        self.null_class = num_classes(model)
        self.counter: BlockCounter | None = None
        self.fn: Any = self.model
        self.cache_dit: Any = None
        k, s = peer.kind, peer.settings
        if k == "inductor":
            self.fn = torch.compile(self.model, dynamic=False)
        elif k == "blockdance":  # one compiled model per cached region; schedule per generation
            self.cache_block = s.get("cache_block", default_cache_block(self.num_blocks))
            key = f"blockdance-{self.cache_block}"
            if key not in shared:
                options = {"strict": True, "cache_block": self.cache_block}
                shared[key] = torch.compile(
                    self.model, backend="blockdance", options=options, dynamic=False
                )
            self.fn = shared[key]
        elif k in ("cache-dit", "cache-dit-compiled"):
            import cache_dit

            self.cache_dit = cache_dit
            self._cache_dit_configs = lambda steps: _cache_dit_configs(s, steps)
            cfg, cal = self._cache_dit_configs(50)
            cache_dit.enable_cache(self.model, cache_config=cfg, calibrator_config=cal)
            if k == "cache-dit-compiled":
                self.fn = torch.compile(self.model)
        elif k == "taylorseer":
            self.counter = BlockCounter(self.model)  # before the hooks: its probe has no context
            from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache

            apply_taylorseer_cache(
                self.model,
                TaylorSeerCacheConfig(
                    cache_interval=s["interval"],
                    disable_cache_before_step=3,
                    max_order=1,
                    taylor_factors_dtype=torch.float32,
                    # the default identifiers ('^transformer_blocks.*attn', fullmatch) hook
                    # nothing on DiT, whose attention is ``attn1``: name it
                    cache_identifiers=[r"transformer_blocks\.\d+\.attn1"],
                ),
            )
        elif k == "magcache":
            self._bare = copy.deepcopy(self.model)
            self.counter = BlockCounter(self.model)
        self._mag_ratios: dict[str, list[float]] = {}

    # MagCache needs its calibration run per sampler (its ratios are per step).
    def calibrate_magcache(self, sc: Scenario, labels: torch.Tensor, noise: torch.Tensor) -> None:
        from diffusers.hooks import MagCacheConfig, apply_mag_cache

        if sc.key in self._mag_ratios:
            return
        probe = copy.deepcopy(self.model)
        apply_mag_cache(probe, MagCacheConfig(calibrate=True, num_inference_steps=sc.steps))
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed), _cache_context(probe):  # prints the ratios
            self._sample(lambda x, t, y: probe(x, timestep=t, class_labels=y)[0], sc, labels, noise)
        lines = [ln for ln in printed.getvalue().splitlines() if ln.startswith("[")]
        ratios = [float(v) for v in lines[-1].strip("[]").split(",")]
        self._mag_ratios[sc.key] = ratios
        log(f"  MagCache calibration {sc.name}: {len(ratios)} ratios, e.g. {ratios[:4]}")

    def _sample(self, denoise: Denoise, sc: Scenario, labels: torch.Tensor, noise: torch.Tensor):
        scheduler = make_sampler(self.train_config, sc.key)  # type: ignore[arg-type]
        return sample(
            denoise, scheduler, labels, sc.steps, 3.0, noise=noise, null_class=self.null_class
        )

    def generate(
        self, sc: Scenario, labels: torch.Tensor, noise: torch.Tensor
    ) -> tuple[torch.Tensor, float]:
        """Images and the computed block fraction (blocks computed / blocks of a full run)."""
        k, s = self.peer.kind, self.peer.settings
        fn = self.fn

        def denoise(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return fn(x, timestep=t, class_labels=y, return_dict=False)[0]

        if k in ("eager", "inductor"):
            return self._sample(denoise, sc, labels, noise), 1.0
        if k == "blockdance":
            if not bd_compile.runtimes_of(fn):
                scheduler = make_sampler(self.train_config, sc.key)  # type: ignore[arg-type]
                sample(denoise, scheduler, labels, 1, 3.0, noise=noise, null_class=self.null_class)
            bd_compile.set_schedule(
                fn, interval=s["interval"], window=s["window"], forecast=s["forecast"]
            )
            bd_compile.reset(fn)
            images = self._sample(denoise, sc, labels, noise)
            last = bd_compile.stats(fn).last
            skipped = (self.cache_block + 1) / self.num_blocks
            return images, 1.0 - last.reused_calls / last.calls * skipped
        if k in ("cache-dit", "cache-dit-compiled"):
            cfg, cal = self._cache_dit_configs(sc.steps)
            self.cache_dit.refresh_context(self.model, cache_config=cfg, calibrator_config=cal)
            images = self._sample(denoise, sc, labels, noise)
            stats = self.cache_dit.summary(self.model)[0]
            cached = len(stats.cached_steps)
            executed = stats.accumulated_executed_steps or sc.steps
            skipped = (self.num_blocks - s["Fn"]) / self.num_blocks
            return images, 1.0 - cached / executed * skipped
        assert self.counter is not None
        if k == "magcache":
            self.calibrate_magcache(sc, labels[:4], noise[:4])
            if getattr(self, "_mag_key", None) != sc.key:
                from diffusers.hooks import MagCacheConfig, apply_mag_cache

                if getattr(self, "_mag_key", None) is not None:  # ratios per sampler: fresh copy
                    self.model = copy.deepcopy(self._bare)
                    self.counter = BlockCounter(self.model)
                    self.fn = self.model
                apply_mag_cache(
                    self.model,
                    MagCacheConfig(
                        threshold=s["threshold"],
                        num_inference_steps=sc.steps,
                        mag_ratios=self._mag_ratios[sc.key],
                    ),
                )
                self._mag_key = sc.key
        HookRegistry.check_if_exists_or_initialize(self.model).reset_stateful_hooks()
        self.counter.reset()
        with _cache_context(self.model):
            images = self._sample(denoise, sc, labels, noise)
        return images, self.counter.fraction(self.num_blocks * sc.steps)


@contextlib.contextmanager
def _cache_context(model: Any) -> Iterator[None]:
    """One cache context for the batched (cond + uncond) call on every stateful hook's state
    manager under ``model``, as ``CacheMixin.cache_context`` sets it (``DiTTransformer2DModel``
    is no ``CacheMixin``)."""
    from diffusers.hooks.hooks import CacheContext, StateManager

    managers = [
        attr
        for module in model.modules()
        if hasattr(module, "_diffusers_hook")
        for hook in module._diffusers_hook.hooks.values()
        for attr in vars(hook).values()
        if isinstance(attr, StateManager)
    ]
    for sm in managers:
        sm.set_context(CacheContext("cfg"))
    try:
        yield
    finally:
        for sm in managers:
            sm._context = None


def _cache_dit_configs(s: dict[str, Any], steps: int) -> tuple[Any, Any]:
    from cache_dit import DBCacheConfig, TaylorSeerCalibratorConfig

    cfg = DBCacheConfig(
        Fn_compute_blocks=s["Fn"],
        Bn_compute_blocks=0,
        residual_diff_threshold=s["threshold"],
        max_warmup_steps=s["warmup"],
        num_inference_steps=steps,
        enable_separate_cfg=False,
    )
    cal = TaylorSeerCalibratorConfig(taylorseer_order=s["order"]) if s["order"] else None
    return cfg, cal


@dataclass
class PeerRow:
    dataset: str
    scenario: str
    family: str
    method: str
    status: str  # "ok" or "not run: why"
    settings: str
    samples: int
    computed_fraction: float
    speed_batch: int
    gen_time_s: float
    gen_time_min_s: float
    gen_time_max_s: float
    speedup_vs_inductor: float
    speedup_vs_eager: float
    ssim: float
    ssim_se: float
    psnr: float
    psnr_se: float
    fid: float
    fid_se: float
    accuracy: float
    accuracy_se: float


def _available(kind: str) -> str | None:
    """None if the method's package imports, else why not."""
    try:
        if kind.startswith("cache-dit"):
            import cache_dit  # noqa: F401
        elif kind == "taylorseer":
            from diffusers import TaylorSeerCacheConfig  # noqa: F401
        elif kind == "magcache":
            from diffusers import MagCacheConfig  # noqa: F401
    except ImportError as e:
        return f"not run: {e} (pip install -e .[peers])"
    return None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality.peers", description=__doc__)
    p.add_argument("--part", choices=("run", "report", "all"), default="all")
    p.add_argument("--dataset", choices=("mnist", "colour"), default="mnist")
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--splits", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speed-batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--scenarios", nargs="+", default=["ddim", "dpm"], choices=("ddim", "dpm"))
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--quick", action="store_true", help="two cache-dit settings, one compiled")
    p.add_argument("--results", type=Path, default=RESULTS)
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> Path:
    cpu = torch.device("cpu")
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    if args.dataset == "mnist":
        from bd_compile.data import REFERENCE_MODEL

        model_path, clf_path = REFERENCE_MODEL, BENCHMARKS / "reference" / "classifier.safetensors"
    else:
        model_path, clf_path = COLOUR / "model", COLOUR / "classifier.safetensors"
    model, train_sched = load_model(model_path, cpu)
    num_blocks = len(model.transformer_blocks)
    data = load_dataset(args.dataset, clf_path, args.data, cpu)
    train_feats = features(data.classifier, data.split.train_images, cpu)
    n = args.samples
    labels, noise = fixed_inputs(n, args.seed, model)
    s_labels, s_noise = labels[: args.speed_batch], noise[: args.speed_batch]
    scenarios = [Scenario(k, 50 if k == "ddim" else 25) for k in args.scenarios]
    peers = plan_peers(num_blocks, args.quick)
    log(
        f"[peers] machine: {machine()}; {n} samples, speed batch {args.speed_batch}, "
        f"{args.repeats} repeats, {len(peers)} methods"
    )
    rows: list[PeerRow] = []
    for sc in scenarios:
        runners: dict[str, Runner] = {}
        shared: dict[str, Any] = {}
        missing: dict[str, str] = {}
        for peer in peers:
            why = _available(peer.kind)
            if why:
                missing[peer.name] = why
            else:
                try:
                    runners[peer.name] = Runner(peer, model, train_sched.config, shared)
                except Exception as e:  # a peer that does not apply to this model: say why
                    missing[peer.name] = f"not run: {type(e).__name__}: {str(e)[:160]}"
                    log(f"[peers] {peer.name}: {missing[peer.name]}")
        quality: dict[str, tuple[torch.Tensor, float]] = {}
        for name, r in runners.items():
            t0 = time.perf_counter()
            try:
                with torch.no_grad():
                    quality[name] = r.generate(sc, labels, noise)
            except Exception as e:  # a peer that fails on this model is reported, not dropped
                missing[name] = f"not run: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
                log(f"[peers] {sc.name} | {name}: FAILED {missing[name]}")
                continue
            log(
                f"[peers] {sc.name} | {name}: computed {quality[name][1]:.3f}, "
                f"{time.perf_counter() - t0:.1f} s (total {time.perf_counter() - t_start:.0f} s)"
            )
        times: dict[str, list[float]] = {name: [] for name in quality}
        for rep in range(args.repeats + 1):  # repeat 0 warms up at the speed batch (compiles)
            for name in quality:
                r = runners[name]
                with torch.no_grad():
                    elapsed = timed(lambda r=r, sc=sc: r.generate(sc, s_labels, s_noise), cpu)
                if rep:
                    times[name].append(elapsed)
            log(
                f"[peers] {sc.name} | timing round {rep} done "
                f"(total {time.perf_counter() - t_start:.0f} s)"
            )
        ref = quality["full (eager)"][0]
        base, eager = median(times["full (inductor)"]), median(times["full (eager)"])
        for peer in peers:
            nan = float("nan")
            settings = json.dumps(peer.settings)
            if peer.name not in quality:
                rows.append(
                    PeerRow(
                        args.dataset,
                        sc.name,
                        peer.family,
                        peer.name,
                        missing.get(peer.name, "not run"),
                        settings,
                        0,
                        nan,
                        0,
                        nan,
                        nan,
                        nan,
                        nan,
                        nan,
                        *([nan] * 8),
                    )
                )
                continue
            images, frac = quality[peer.name]
            feats = features(data.classifier, images, cpu)
            q = quality_row(
                sc,
                _as_method(sc),
                images,
                ref,
                labels,
                feats,
                train_feats,
                predict(data.classifier, images),
                args.splits,
                0,
                sc.steps,
                0.0,
            )
            t = median(times[peer.name])
            rows.append(
                PeerRow(
                    args.dataset,
                    sc.name,
                    peer.family,
                    peer.name,
                    "ok",
                    settings,
                    n,
                    frac,
                    args.speed_batch,
                    t,
                    min(times[peer.name]),
                    max(times[peer.name]),
                    base / t,
                    eager / t,
                    q.ssim,
                    q.ssim_se,
                    q.psnr,
                    q.psnr_se,
                    q.fid,
                    q.fid_se,
                    q.accuracy,
                    q.accuracy_se,
                )
            )
        torch._dynamo.reset()
    out = args.results / f"peers-{args.dataset}.csv"
    write_csv(out, rows)
    meta = {
        "machine": machine() + " (machine loaded: shared with other workers)",
        "command": command_line().replace("benchmarks.quality ", "benchmarks.quality.peers "),
        "dataset": args.dataset,
        "samples": n,
        "splits": args.splits,
        "seeds": f"{args.seed}..{args.seed + n - 1}",
        "speed_batch": args.speed_batch,
        "repeats": args.repeats,
        "threads": 1,
        "num_blocks": num_blocks,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
    log(f"[peers] wrote {out} ({time.perf_counter() - t_start:.0f} s)")
    return out


def _as_method(sc: Scenario) -> Any:
    from benchmarks.quality.plan import Method

    return Method("peer", "peer", "peer", sc.steps)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    diffusers_logging.set_verbosity_error()
    logging.getLogger("cache_dit").setLevel(logging.ERROR)
    for name in list(logging.root.manager.loggerDict):
        if "cache_dit" in name or "Cache-DiT" in name:
            logging.getLogger(name).setLevel(logging.ERROR)
    args.results.mkdir(parents=True, exist_ok=True)
    if args.part in ("run", "all"):
        run(args)
    if args.part in ("report", "all"):
        from benchmarks.quality.peers_report import write_peers_report

        write_peers_report(args.results, args.dataset)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
