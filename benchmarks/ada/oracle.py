"""Is there per-instance variation for an adaptive schedule to exploit? An oracle upper bound.

    python -m benchmarks.ada.oracle --samples 100 [--dataset colour]

Each held-out sample runs static N=2 and N=4 (same noise). The oracle then gives N=4 to the
fraction of samples that lose the least PSNR by it, sized so that the mean block work equals
N=3's (13 + 7 f = 18 reuse steps on DDIM 50), and N=2 to the rest; compared with N=3 itself and
with the same mixture assigned at random (which isolates the gain of mixing from the gain of
choosing per instance). A policy that only picks between N=2 and N=4 per sample cannot do
better than the oracle.
"""

from __future__ import annotations

import argparse

import torch

import bd_compile
from bd_compile.metrics import psnr
from benchmarks.ada import reference
from benchmarks.common import log
from benchmarks.quality.plan import seeded_inputs


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    reference.add_arguments(ap)
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--seed", type=int, default=100_000)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    ref = reference.load(args)
    model, sampler = ref.model, ref.sampler
    log(ref.describe())
    k = sampler.decision_step
    window = (reference.RHO, 0.95)
    plans = {n: bd_compile.plan(sampler.timesteps, interval=n, window=window) for n in (2, 3, 4)}
    db: dict[int, list[torch.Tensor]] = {n: [] for n in plans}
    for lo in range(0, args.samples, args.batch):
        ids = list(range(lo, min(args.samples, lo + args.batch)))
        labels, noise = seeded_inputs(ids, args.seed, model)
        pre = sampler.prefix(noise, labels)
        full, _ = sampler.finish(pre, labels)
        for n, plan in plans.items():
            comp = torch.tensor([not r for r in plan])

            def fn(i: int, _c: torch.Tensor = comp, _n: int = len(ids)) -> torch.Tensor:
                return _c[i].expand(_n)

            x, _ = sampler.finish(pre, labels, fn)
            db[n].append(psnr(x.clamp(-1, 1), full.clamp(-1, 1)).float())
        log(f"oracle: {ids[-1] + 1}/{args.samples}")
    d2, d3, d4 = (torch.cat(db[n]) for n in (2, 3, 4))
    reuse = {n: sum(plans[n][k + 1 :]) for n in plans}
    f = (reuse[3] - reuse[2]) / (reuse[4] - reuse[2])
    m = round(f * len(d2))
    loss = d2 - d4
    order = loss.argsort()  # smallest loss first: these take N=4
    oracle = d2.clone()
    oracle[order[:m]] = d4[order[:m]]
    rand = d2.clone()
    perm = torch.randperm(len(d2), generator=torch.Generator().manual_seed(0))
    rand[perm[:m]] = d4[perm[:m]]
    corr = torch.corrcoef(torch.stack([d2, d4]))[0, 1]
    log(f"reuse steps: N=2 {reuse[2]}, N=3 {reuse[3]}, N=4 {reuse[4]}")
    log(f"mixture: {m} of {len(d2)} samples at N=4, the rest at N=2")
    log(f"mean PSNR dB: N=2 {d2.mean():.2f}, N=3 {d3.mean():.2f}, N=4 {d4.mean():.2f}")
    log(
        f"N=2/N=4 mixture at N=3's block work: random {rand.mean():.2f}, oracle {oracle.mean():.2f}"
    )
    log(f"per-sample loss N=2 -> N=4: mean {loss.mean():.2f} dB, std {loss.std():.2f}, "
        f"min {loss.min():.2f}, max {loss.max():.2f}; corr(PSNR N=2, N=4) {corr:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
