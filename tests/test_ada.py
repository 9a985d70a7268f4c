"""BlockDance-Ada: policy files, per-sample decisions in a batch, fallbacks, rank agreement
(Note [BlockDance-Ada] in bd_compile/ada.py)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import bd_testing
import pytest
import reference
import torch
import zoo
from ada_testing import BINS, bias_policy, policy_meta, policy_plan
from torch._dynamo.utils import counters

import bd_compile
from bd_compile import ada
from bd_compile.ada import DecisionNet, PolicyMeta, load_policy, save_policy

STEPS = 10
SCALE = 3.0


def _compile(case: zoo.ZooCase, **options: Any) -> Any:
    return torch.compile(case.model, backend="blockdance", options={**bd_testing.AOT, **options})


# -- the policy file ------------------------------------------------------------------------------


def test_policy_file_round_trip(tmp_path: Path) -> None:
    case = zoo.get("zoo_dit")
    net = DecisionNet(48, BINS, 4)
    meta = policy_meta(case, trained={"lambda": 2.0})
    save_policy(tmp_path / "p.safetensors", net, meta)
    policy = load_policy(tmp_path / "p.safetensors")
    assert policy.meta == meta
    for k, v in net.state_dict().items():
        assert torch.equal(policy.net.state_dict()[k], v), k


def test_missing_or_corrupt_policy_file_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_policy(tmp_path / "nope.safetensors")
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="could not be read"):
        load_policy(bad)
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="metadata"):
        load_policy(plain)
    wrong = tmp_path / "wrong.safetensors"
    save_policy(wrong, DecisionNet(32, BINS, 4), policy_meta(zoo.get("zoo_dit")))  # says width 48
    with pytest.raises(ValueError, match="DecisionNet"):
        load_policy(wrong)


def test_policy_with_schedule_or_forecast_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'policy' and 'schedule'"):
        bd_compile.from_options({"policy": "p.safetensors", "schedule": [False] * 10})
    with pytest.raises(ValueError, match="'policy' and 'forecast'"):
        bd_compile.from_options({"policy": "p.safetensors", "forecast": 1})
    with pytest.raises(ValueError, match="policy_rows"):
        bd_compile.from_options({"policy_rows": "pairs"})


def test_missing_policy_fails_the_compile(tmp_path: Path) -> None:
    case = zoo.get("zoo_dit")
    model = _compile(case, policy=str(tmp_path / "missing.safetensors"))
    with pytest.raises(Exception, match="does not exist"):
        model(**case.example_inputs(batch=2))


# -- decisions ------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", ["batched", "sequential"])
def test_bias_policy_gives_its_pattern_and_matches_the_reference(
    tmp_path: Path, cfg: zoo.CfgMode
) -> None:
    """A policy with fixed decisions reproduces exactly its pattern, and the output equals the
    independent eager reference driven by that plan."""
    case = zoo.build("zoo_dit")
    compute_bins = [True, False, False, True, False, True, False, True]
    path = bias_policy(tmp_path, case, compute_bins)
    ts = bd_testing.model_timesteps(case, STEPS)
    plan = policy_plan(ts, compute_bins)
    rows = "cfg" if cfg == "batched" else "each"
    model = _compile(case, policy=path, policy_rows=rows)
    counters.clear()
    got = zoo.run_loop(case, model, STEPS, cfg=cfg, batch=2, guidance_scale=SCALE)
    branches = 1 if cfg == "batched" else 2
    bd_testing.assert_rewritten_and_reused(reuse=branches * sum(plan))
    assert counters["blockdance"]["ada_decisions"] == 1
    st = bd_compile.stats(model).last
    assert st.pattern == bd_testing.pattern(plan)
    assert st.samples == (bd_testing.pattern(plan),) * 2
    rows_per_call = 4 if cfg == "batched" else 2
    assert counters["blockdance"]["ada_row_steps_reused"] == branches * rows_per_call * sum(plan)
    want, _ = reference.run_reference_loop(
        case, bd_testing.cache_block(case), plan, STEPS, cfg, batch=2, guidance_scale=SCALE
    )
    torch.testing.assert_close(got.latents, want.latents, **bd_testing.TOL)
    text = str(bd_compile.explain(model))
    assert "BlockDance-Ada policy" in text and "sample 1:" in text


def _ddim_loop(
    case: zoo.ZooCase, model: Any, noise: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Batched CFG on given noise and labels (zoo.run_loop draws both itself)."""
    sched = case.make_scheduler()
    sched.set_timesteps(STEPS)
    x = noise.clone()
    n = x.shape[0]
    y = torch.cat([labels, torch.full_like(labels, 10)])
    with torch.no_grad():
        for t in sched.timesteps:
            out = case.output(model(x=torch.cat([x, x]), t=case.model_timestep(t, 2 * n), y=y))
            c, u = out.chunk(2)
            x = sched.step(u + SCALE * (c - u), t, x, return_dict=False)[0]
    return x


def _splitting_policy(
    tmp_path: Path, case: zoo.ZooCase, stats: torch.Tensor, first: list[str]
) -> str:
    """A policy that decides differently for two samples whose pooled statistics are ``stats``
    ([2, 2w+1]): per bin, ``first[b]`` is "both" (compute), "none" (reuse), "0" (only sample 0
    computes) or "1" (only sample 1 computes)."""
    net = DecisionNet(48, BINS, 4)
    with torch.no_grad():
        normed = net.norm(ada.stats_features(stats))
        d = normed[0] - normed[1]
        mid = (normed[0] + normed[1]) / 2
        net.fc1.weight.zero_()
        net.fc1.bias.zero_()
        net.fc1.weight[0, : 2 * 48] = d
        net.fc1.weight[1, : 2 * 48] = -d
        net.fc1.bias[0], net.fc1.bias[1] = -(d @ mid), d @ mid
        # gelu(h) - gelu(-h) = h: positive for sample 0, negative for sample 1
        net.fc2.weight.zero_()
        net.fc2.bias.zero_()
        for b, who in enumerate(first):
            if who in ("both", "none"):
                net.fc2.bias[b] = 5.0 if who == "both" else -5.0
            else:
                sign = 1.0 if who == "0" else -1.0
                net.fc2.weight[b, 0], net.fc2.weight[b, 1] = 50 * sign, -50 * sign
    path = tmp_path / "split.safetensors"
    save_policy(path, net, policy_meta(case))
    return str(path)


def test_samples_in_a_batch_decide_apart_and_equal_each_sample_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    case = zoo.build("zoo_dit")
    gen = torch.Generator().manual_seed(3)
    noise = torch.randn((2, *case.latent_shape), generator=gen)
    labels = torch.tensor([3, 7])
    # 1. the two samples' statistics at the decision step (an all-compute policy, spied on)
    seen: list[torch.Tensor] = []
    pooled = ada.pooled_stats
    monkeypatch.setattr(ada, "pooled_stats", lambda h, r: seen.append(pooled(h, r)) or seen[-1])
    spy = _compile(case, policy=bias_policy(tmp_path, case, [True] * BINS))
    _ddim_loop(case, spy, noise, labels)
    (stats,) = seen
    assert stats.shape == (2, 2 * 48 + 1)
    # 2. a policy that splits them, per bin
    ts = bd_testing.model_timesteps(case, STEPS)
    plan_bins = ["both", "none", "0", "1", "none", "0", "none", "1"]
    path = _splitting_policy(tmp_path, case, stats, plan_bins)
    model = torch.compile(
        zoo.build("zoo_dit").model,
        backend="blockdance",
        options={**bd_testing.AOT, "policy": path},
    )
    counters.clear()
    both = _ddim_loop(case, model, noise, labels)
    expected = [
        bd_testing.pattern(policy_plan(ts, [w in ("both", str(s)) for w in plan_bins]))
        for s in (0, 1)
    ]
    assert bd_compile.stats(model).last.samples == tuple(expected)
    assert expected[0] != expected[1]
    assert counters["blockdance"]["ada_mixed_calls"] > 0
    assert counters["blockdance"]["fallbacks"] == 0
    # the floor: the plain eager model, batch of 2 against each sample alone (batch-size
    # dependent matmul blocking; these random-weight latents reach ~300)
    eager = _ddim_loop(case, case.model, noise, labels)
    floor = max(
        float(
            (eager[s : s + 1] - _ddim_loop(case, case.model, noise[s : s + 1], labels[s : s + 1]))
            .abs()
            .max()
        )
        for s in (0, 1)
    )
    for s in (0, 1):
        torch._dynamo.reset()  # a fresh graph (and loop state) for the new model instance
        alone_model = torch.compile(
            zoo.build("zoo_dit").model,
            backend="blockdance",
            options={**bd_testing.AOT, "policy": path},
        )
        alone = _ddim_loop(case, alone_model, noise[s : s + 1], labels[s : s + 1])
        assert bd_compile.stats(alone_model).last.samples == (expected[s],)
        diff = float((both[s : s + 1] - alone).abs().max())
        assert diff <= 2 * floor + 1e-5, (diff, floor)


def test_rows_of_one_cfg_pair_share_a_decision() -> None:
    """Rows i and i + B/2 (batched guidance) are pooled into one sample; "each" keeps rows."""
    h = torch.randn(4, 5, 3, dtype=torch.float64)
    s = ada.pooled_stats(h, "cfg")
    assert s.shape == (2, 7)
    torch.testing.assert_close(s[0, :3], h[0].sum(0) + h[2].sum(0))
    torch.testing.assert_close(s[1, 3:6], (h[1] ** 2).sum(0) + (h[3] ** 2).sum(0))
    assert s[0, -1] == 10
    assert ada.pooled_stats(h, "each").shape == (4, 7)
    assert ada.pooled_stats(h[:3], "cfg").shape == (3, 7)  # odd: one row per sample
    reuse = ada.Decision(torch.tensor([[True], [False]]), 0, 0.0, "cfg", [[], []])
    assert reuse.reuse_rows(0.5, 4).tolist() == [False, True, False, True]
    assert reuse.reuse_rows(0.5, 6) is None  # another batch: compute


def test_decision_agrees_across_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each rank pools its token shard; one ``all_reduce`` over the context-parallel group sums
    the statistics, so every rank takes the decision of the whole sequence (Note [Decisions
    agree across ranks]). The shards here decide otherwise on their own, so a rank that skipped
    the sum would disagree."""
    import torch.distributed as dist

    meta = PolicyMeta(4, 1, "x", 6, (8, 6), bins=4, hidden=8)
    for seed in range(20):
        torch.manual_seed(seed)
        h = torch.randn(2, 8, 6)
        h[:, 4:] += 3.0 * torch.randn(1, 1, 6)  # the two halves of the sequence differ
        policy = ada.Policy(meta, DecisionNet(6, 4, 8))
        whole = policy.decide(h, 0.5, 3, "cfg", sync=False).compute
        shards = (h[:, :4], h[:, 4:])
        alone = [policy.decide(s, 0.5, 3, "cfg", sync=False).compute for s in shards]
        if all(not torch.equal(a, whole) for a in alone):
            break
    else:
        raise AssertionError("no seed gives shards that decide unlike the whole sequence")
    for rank, shard in enumerate(shards):
        other = ada.pooled_stats(shards[1 - rank], "cfg")
        calls: list[object] = []

        def all_reduce(
            t: torch.Tensor, group: object = None, _o: torch.Tensor = other, _c: list = calls
        ) -> None:
            _c.append(group)
            t.add_(_o)

        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
        monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
        monkeypatch.setattr(dist, "all_reduce", all_reduce)
        got = policy.decide(shard, 0.5, 3, "cfg", sync=True, group="cp-group").compute
        assert torch.equal(got, whole)
        assert calls == ["cp-group"]


# -- fallbacks and set_schedule -------------------------------------------------------------------


def test_policy_for_another_model_falls_back_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    case = zoo.build("zoo_dit")
    path = bias_policy(tmp_path, case, [False] * BINS, blocks=12)
    model = _compile(case, policy=path)
    counters.clear()
    with caplog.at_level(logging.WARNING, logger="bd_compile"):
        got = zoo.run_loop(case, model, STEPS, cfg="batched", batch=2)
        zoo.run_loop(case, model, STEPS, cfg="batched", batch=2)
    warnings = [r for r in caplog.records if "trained for another model" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    ts = bd_testing.model_timesteps(case, STEPS)
    static = reference.progress_plan(ts)
    assert bd_compile.stats(model).last.pattern == bd_testing.pattern(static)
    assert counters["blockdance"]["ada_decisions"] == 0
    want, _ = reference.run_reference_loop(
        case, bd_testing.cache_block(case), static, STEPS, "batched", batch=2
    )
    torch.testing.assert_close(got.latents, want.latents, **bd_testing.TOL)


def test_policy_for_another_model_raises_under_strict(tmp_path: Path) -> None:
    case = zoo.build("zoo_dit")
    path = bias_policy(tmp_path, case, [False] * BINS, cache_block=1)
    model = _compile(case, policy=path, strict=True)
    with pytest.raises(Exception, match="trained for another model"):
        model(**case.example_inputs(batch=2))


def test_set_schedule_policy_does_not_recompile(tmp_path: Path) -> None:
    case = zoo.build("zoo_dit")
    compute_bins = [True, False] * (BINS // 2)
    path = bias_policy(tmp_path, case, compute_bins)
    model = _compile(case)
    counters.clear()
    zoo.run_loop(case, model, STEPS, cfg="batched", batch=2)
    bd_compile.set_schedule(model, policy=path)
    zoo.run_loop(case, model, STEPS, cfg="batched", batch=2)
    ts = bd_testing.model_timesteps(case, STEPS)
    assert bd_compile.stats(model).last.pattern == bd_testing.pattern(policy_plan(ts, compute_bins))
    bd_compile.set_schedule(model, policy=None)
    zoo.run_loop(case, model, STEPS, cfg="batched", batch=2)
    assert bd_compile.stats(model).last.samples == ()
    assert counters["blockdance"]["graphs_rewritten"] == 1
    assert counters["stats"]["unique_graphs"] == 1
    with pytest.raises(ValueError, match="does not exist"):
        bd_compile.set_schedule(model, policy=str(tmp_path / "missing.safetensors"))


# -- the training/evaluation engine agrees with the backend ---------------------------------------


def test_rollout_engine_matches_backend(tmp_path: Path) -> None:
    """benchmarks.ada.rollout (eager hooks, rows that reuse are not computed) gives the backend's
    result for the same policy on the reference DiT: what training optimises is what ships."""
    from bd_compile.sampling import denoise, load_reference, make_scheduler
    from benchmarks.ada.rollout import Sampler

    model, train_sched = load_reference()
    blocks = len(model.transformer_blocks)
    cb = bd_compile.default_cache_block(blocks)
    steps, n = 20, 3
    torch.manual_seed(5)
    net = DecisionNet(128, 16, 8)
    with torch.no_grad():
        net.fc2.weight.mul_(40.0)  # decisions that differ between samples and bins
    meta = PolicyMeta(blocks, cb, f"transformer_blocks.{cb} output", 128, (49, 128), 0.4, 16, 8)
    path = tmp_path / "ref.safetensors"
    save_policy(path, net, meta)
    noise = torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([1, 4, 7])

    sampler = Sampler(model, make_scheduler(train_sched.config, "ddim"), cb, steps, 3.0, 0.4)
    pre = sampler.prefix(noise, labels)
    policy = load_policy(path)
    compute = policy.logits(pre.stats, pre.progress) > 0
    k = sampler.decision_step
    bins = sampler.bins(16)
    want, _ = sampler.finish(pre, labels, lambda i: compute[:, bins[i - k - 1]])

    compiled = torch.compile(
        model, backend="blockdance", options={**bd_testing.AOT, "policy": str(path)}
    )
    y = torch.cat([labels, torch.full_like(labels, 10)])
    counters.clear()
    got = denoise(
        compiled,
        make_scheduler(train_sched.config, "ddim"),
        lambda x, t: {"hidden_states": x, "timestep": t, "class_labels": y},
        noise,
        steps,
        guidance_scale=3.0,
    )
    samples = bd_compile.stats(compiled).last.samples
    assert len(set(samples)) > 1 and counters["blockdance"]["ada_mixed_calls"] > 0, samples
    for s, pattern in enumerate(samples):
        expect = "C" * (k + 1) + "".join("C" if compute[s, b] else "R" for b in bins)
        assert pattern == expect
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


REFERENCE = Path(__file__).parents[1] / "benchmarks/reference"


@pytest.mark.parametrize(
    ("model_dir", "policies", "image", "null"),
    [
        (None, REFERENCE / "ada", (1, 28, 28), 10),
        (REFERENCE / "colour/model", REFERENCE / "colour/ada", (3, 32, 32), 9),
    ],
    ids=["mnist", "colour"],
)
def test_shipped_policies_fit_the_reference_model(
    model_dir: Path | None, policies: Path, image: tuple[int, ...], null: int
) -> None:
    from bd_compile.sampling import load_reference

    model, _ = load_reference() if model_dir is None else load_reference(model_dir)
    shipped = sorted(policies.glob("*.safetensors"))
    assert shipped
    compiled = torch.compile(
        model, backend="blockdance", options={**bd_testing.AOT, "strict": True}
    )
    x = torch.randn(2, *image)
    compiled(x, timestep=torch.tensor([999, 999]), class_labels=torch.tensor([1, null]))
    for path in shipped:
        bd_compile.set_schedule(compiled, policy=str(path))  # strict: raises on a mismatch
        assert bd_compile.runtimes_of(compiled)[0].state.ada is not None, path


def test_rows_only_saving_counts_the_region_work_of_mixed_steps() -> None:
    """benchmarks.ada.evaluate's estimate of what computing only the computing rows would save."""
    from benchmarks.ada.evaluate import rows_only_saving

    assert rows_only_saving(["CCR", "CRR"], 2) == 0.25  # step 1 mixed: 1 of 4 sample-steps idle
    assert rows_only_saving(["CR", "CR"], 2) == 0.0  # one pattern: no mixed step
    assert rows_only_saving(["CR", "RC"], 1) == 0.0  # batch 1: never mixed
    assert rows_only_saving(["CR", "RC", "RR"], 2) == 0.5  # the last batch has one sample


def test_policy_sync_uses_the_context_parallel_group() -> None:
    """``policy_sync="auto"`` sums over diffusers' context-parallel group only when the model
    has one (data parallelism across processes must not mix samples of different ranks)."""
    from types import SimpleNamespace

    from bd_compile.loop import LoopState

    model = torch.nn.Linear(1, 1)
    assert LoopState(bd_compile.Settings(), model).policy_sync() == (False, None)
    assert LoopState(bd_compile.Settings(policy_sync="always"), model).policy_sync()[0]
    mesh = SimpleNamespace(get_group=lambda: "cp-group")
    cp = SimpleNamespace(_flattened_mesh=mesh)
    model._parallel_config = SimpleNamespace(context_parallel_config=cp)  # type: ignore[assignment]
    assert LoopState(bd_compile.Settings(), model).policy_sync() == (True, "cp-group")
    never = LoopState(bd_compile.Settings(policy_sync="never"), model).policy_sync()
    assert never[0] is False
