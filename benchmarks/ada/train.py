"""Train a BlockDance-Ada policy with REINFORCE on the reference DiT (resumable, budgeted).

    python -m benchmarks.ada.train --out benchmarks/reference/ada-policy.safetensors \
        --work blockdance-ada/run --minutes 30 --lam 2 [--dataset colour]

Reward (Note [Ada reward]): ``R = C + lambda * Q`` with ``C`` the fraction of the steps after
the decision step that reuse, and ``Q = clip(PSNR / 60 dB, 0, 1) * k``: PSNR of the final
sample against the all-compute sample of the same noise, times a class term ``k``: by default
(``--class-term relative``) ``min(1, p(class | sample) / p(class | all-compute sample))`` with
the reference classifier's probability of the requested class; ``--class-term product`` (the
shipped MNIST policies) uses ``p(class | sample)`` itself.

Note [Ada reward]
SSIM against the all-compute output is the paper's consistency metric, but on this model it is
saturated: static N = 2, 3, 4 (40%-95%) give 0.9998, 0.9991, 0.9983 (benchmarks/results/
quality.md) while C moves by ~0.2 between them, so with SSIM as Q lambda would need to be ~100
before quality mattered at all. PSNR (a log of the error) spreads the same settings over
54, 47, 44 dB, so ``PSNR / 60`` moves by ~0.1 per N: lambda around 2 trades them. The class
probability multiplies it so that a sample that stops looking like its digit loses its quality
reward however close its pixels are on average; it is ~1 for every static setting here, so it
only guards against collapse. On the colour model (classifier accuracy 0.69, p(class) of the
all-compute samples from 0.15 to 0.99 by class) the plain product taught the policies to reuse
most on the samples the classifier does not recognise anyway (correlation of a sample's reuse
with its all-compute p(class): -0.6): their quality reward was worth less. Dividing by the
all-compute sample's own p(class) keeps the guard (a sample that loses class evidence relative
to what full compute gives) and weighs every sample's PSNR alike. The baseline is the mean
reward of the draws of the same noise (a mean-reward baseline per instance, which also removes
the instance's difficulty).

Training data: a pool of noises (seeds, labels ``i % classes``) whose steps up to the decision step
and all-compute finals are computed once and kept in the work folder; each iteration draws
``--states`` of them and ``--draws`` Bernoulli decision vectors each. Checkpoints (net, Adam,
generator, curve) are written every ``--save-every`` iterations and at the end; a rerun with the
same ``--work`` resumes. Progress is logged every ``--log-every`` iterations.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from bd_compile.ada import DecisionNet, PolicyMeta, load_policy, save_policy, stats_features
from bd_compile.metrics import psnr
from benchmarks.ada import reference
from benchmarks.ada.rollout import Prefix, Sampler
from benchmarks.common import log, machine
from benchmarks.quality.plan import seeded_inputs

logger = logging.getLogger(__name__)

PSNR_SCALE = 60.0


def class_probability(classifier: Any, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return classifier(x.clamp(-1, 1)).softmax(-1).gather(1, labels[:, None]).squeeze(1)


def quality(
    classifier: Any,
    x: torch.Tensor,
    full: torch.Tensor,
    labels: torch.Tensor,
    p_full: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(Q, PSNR, p(class))`` per sample (Note [Ada reward]); with ``p_full`` (the all-compute
    samples' p(class)) the class term is relative to it."""
    db = psnr(x.clamp(-1, 1), full.clamp(-1, 1)).clamp(max=100.0).float()
    p = class_probability(classifier, x, labels)
    k = p if p_full is None else (p / p_full.clamp_min(1e-6)).clamp(max=1.0)
    return (db / PSNR_SCALE).clamp(0, 1) * k, db, p


def build_pool(sampler: Sampler, n: int, seed: int, chunk: int) -> dict[str, torch.Tensor]:
    """Noises ``seed..seed+n-1`` (labels ``i % classes``): decision-step state and all-compute
    final."""
    xs, caches, stats, fulls, labels = [], [], [], [], []
    for lo in range(0, n, chunk):
        ids = range(lo, min(n, lo + chunk))
        y, noise = seeded_inputs(ids, seed, sampler.model)
        pre = sampler.prefix(noise, y)
        full, _ = sampler.finish(pre, y)
        c = pre.cache.reshape(2, len(ids), *pre.cache.shape[1:]).transpose(0, 1)
        xs.append(pre.x)
        caches.append(c)
        stats.append(pre.stats)
        fulls.append(full)
        labels.append(y)
        log(f"pool: {lo + len(ids)}/{n}")
    return {
        "x": torch.cat(xs),
        "cache": torch.cat(caches),  # [n, 2, tokens, width]: (cond, uncond) rows per sample
        "stats": torch.cat(stats),
        "full": torch.cat(fulls),
        "labels": torch.cat(labels),
    }


def prefix_of(pool: dict[str, torch.Tensor], idx: torch.Tensor, sampler: Sampler) -> Prefix:
    c = pool["cache"][idx]
    cache = torch.cat([c[:, 0], c[:, 1]])
    k = sampler.decision_step
    return Prefix(pool["x"][idx], cache, pool["stats"][idx], k, sampler.progress[k])


def rollout(
    sampler: Sampler,
    pool: dict[str, torch.Tensor],
    idx: torch.Tensor,
    compute_bins: torch.Tensor,
    bins_of_steps: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Final latents and C (reuse fraction) per sample for per-sample bin decisions."""
    start = prefix_of(pool, idx, sampler)
    k = sampler.decision_step
    steps = torch.tensor(bins_of_steps)
    per_step = compute_bins[:, steps]  # [n, steps after k]
    x, _ = sampler.finish(start, pool["labels"][idx], lambda i: per_step[:, i - k - 1])
    return x, 1.0 - per_step.float().mean(1)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    reference.add_arguments(ap)
    ap.add_argument("--out", required=True, help="policy file to write (safetensors)")
    ap.add_argument("--work", required=True, help="folder for the pool and checkpoints")
    ap.add_argument("--minutes", type=float, default=30.0, help="training budget (this run)")
    ap.add_argument("--lam", type=float, default=2.0, help="lambda of R = C + lambda Q")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--entropy", type=float, default=0.01, help="bonus per bin (keeps exploring)")
    ap.add_argument(
        "--class-term",
        choices=("relative", "product"),
        default="relative",
        help="Q's class factor: p(class) relative to the all-compute sample's, or p(class)",
    )
    ap.add_argument("--states", type=int, default=8, help="pool entries per iteration")
    ap.add_argument("--draws", type=int, default=2, help="decision draws per pool entry")
    ap.add_argument("--pool", type=int, default=256)
    ap.add_argument("--pool-seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=reference.STEPS)
    ap.add_argument("--guidance", type=float, default=reference.GUIDANCE)
    ap.add_argument("--rho", type=float, default=reference.RHO)
    ap.add_argument("--bins", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init-from", default=None, help="start from this policy's weights")
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument("--save-every", type=int, default=20)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)

    ref = reference.load(args, args.steps, args.guidance, args.rho)
    sampler, cache_block = ref.sampler, ref.cache_block
    bins_of_steps = sampler.bins(args.bins)
    if len(set(bins_of_steps)) < len(bins_of_steps):
        log(f"note: {len(bins_of_steps)} steps share {len(set(bins_of_steps))} bins")
    classifier = ref.data().classifier
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    pool_path = work / "pool.pt"
    key = {
        "pool": args.pool, "seed": args.pool_seed, "steps": args.steps, "rho": args.rho,
        "cache_block": cache_block, "guidance": args.guidance, "model": str(ref.model_path),
    }  # fmt: skip
    pool: dict[str, Any] | None = None
    if pool_path.exists():
        saved = torch.load(pool_path)
        if saved.get("key") == key:
            pool = saved["pool"]
    if pool is None:
        t0 = time.time()
        pool = build_pool(sampler, args.pool, args.pool_seed, chunk=32)
        torch.save({"key": key, "pool": pool}, pool_path)
        log(f"pool built in {time.time() - t0:.0f} s")
    assert pool is not None

    width = int(pool["cache"].shape[-1])
    net = DecisionNet(width, args.bins, args.hidden)
    torch.nn.init.zeros_(net.fc2.weight)  # p = 0.5 everywhere at the start: explore
    torch.nn.init.zeros_(net.fc2.bias)
    if args.init_from is not None:
        net.load_state_dict(load_policy(args.init_from).net.state_dict())
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    curve: list[dict[str, float]] = []
    it, spent = 0, 0.0
    ckpt = work / "checkpoint.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        state.setdefault("class_term", "product")  # checkpoints from before --class-term
        for option in ("lam", "class_term"):
            if state[option] != getattr(args, option):
                raise SystemExit(
                    f"{ckpt} was trained with --{option.replace('_', '-')} {state[option]}, "
                    f"not {getattr(args, option)}"
                )
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        curve, it, spent = state["curve"], state["it"], state["spent"]
        log(f"resumed at iteration {it} ({spent / 60:.1f} min spent before)")

    feats_all = stats_features(pool["stats"])
    p_full = None
    if args.class_term == "relative":
        p_full = class_probability(classifier, pool["full"], pool["labels"])
    k = sampler.decision_step
    used = sorted(set(bins_of_steps))

    def checkpoint() -> None:
        torch.save(
            {"net": net.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
             "curve": curve, "it": it, "spent": spent, "lam": args.lam,
             "class_term": args.class_term},
            ckpt,
        )  # fmt: skip

    start = seg = time.time()
    window: list[dict[str, float]] = []
    while time.time() - start < args.minutes * 60:
        idx = torch.randperm(args.pool, generator=gen)[: args.states].repeat(args.draws)
        progress = torch.full((idx.numel(),), sampler.progress[k])
        logits = net(feats_all[idx], progress)
        probs = torch.sigmoid(logits)
        compute = torch.bernoulli(probs.detach(), generator=gen).bool()
        x, c = rollout(sampler, pool, idx, compute, bins_of_steps)
        q, db, pc = quality(
            classifier, x, pool["full"][idx], pool["labels"][idx],
            None if p_full is None else p_full[idx],
        )  # fmt: skip
        reward = c + args.lam * q
        base = reward.reshape(args.draws, args.states).mean(0).repeat(args.draws)
        adv = reward - base
        dist = torch.distributions.Bernoulli(logits=logits[:, used])
        logp = dist.log_prob(compute[:, used].float()).sum(1)
        loss = -(adv.detach() * logp).mean() - args.entropy * dist.entropy().sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        it += 1
        with torch.no_grad():
            greedy_c = 1.0 - (logits[:, used] > 0).float().mean().item()
        window.append({"reward": reward.mean().item(), "C": c.mean().item(),
                       "psnr": db.mean().item(), "p_class": pc.mean().item(),
                       "greedy_C": greedy_c})  # fmt: skip
        if it % args.log_every == 0:
            row = {k2: sum(w[k2] for w in window) / len(window) for k2 in window[0]}
            row["it"] = it
            row["minutes"] = (spent + time.time() - seg) / 60
            curve.append(row)
            window = []
            log(
                f"it {it} ({row['minutes']:.1f} min): reward {row['reward']:.3f}, C {row['C']:.3f}"
                f" (greedy {row['greedy_C']:.3f}), PSNR {row['psnr']:.1f} dB, "
                f"p(class) {row['p_class']:.3f}"
            )
        if it % args.save_every == 0:
            spent, seg = spent + time.time() - seg, time.time()
            checkpoint()
    spent += time.time() - seg
    checkpoint()

    layout_shape = tuple(int(s) for s in pool["cache"].shape[2:])
    meta = PolicyMeta(
        blocks=ref.blocks,
        cache_block=cache_block,
        cached_name=f"transformer_blocks.{cache_block} output",
        width=width,
        cached_shape=layout_shape,
        rho=args.rho,
        bins=args.bins,
        hidden=args.hidden,
        model=ref.describe(),
        trained={
            "reward": f"C + lambda * clip(PSNR/{PSNR_SCALE:g} dB, 0, 1) * "
            + ("p(class)" if p_full is None else "min(1, p(class) / p(class | all-compute))"),
            "lambda": args.lam,
            "iterations": it,
            "minutes": round(spent / 60, 1),
            "episodes_per_iteration": args.states * args.draws,
            "pool": args.pool,
            "lr": args.lr,
            "entropy_bonus": args.entropy,
            "init_from": args.init_from,
            "machine": machine(),
            "curve_last": curve[-1] if curve else {},
        },
    )
    save_policy(args.out, net, meta)
    (work / "curve.json").write_text(json.dumps(curve, indent=1))
    log(f"wrote {args.out} after {it} iterations, {spent / 60:.1f} min")


if __name__ == "__main__":
    main()
