"""The plan API: plan_prefill + run_plan is flex_sample_attention, on the shipped stages."""

import pytest
import torch

import flexsample as fs
from flexsample.synthetic import planted_qkv


@pytest.mark.parametrize("backend", ["gather", "triton"])
@pytest.mark.parametrize("B, S", [(1, 1100), (2, 777)], ids=["B1-S1100", "B2-S777"])
def test_plan_then_run_equals_flex_sample_attention(B, S, backend):
    q, k, v = planted_qkv(B, 4, 2, S, 32, stripes=3, seed=7)
    cfg = fs.SampleConfig.always_sparse(block_size=64, min_window=64, backend=backend)
    plan = fs.plan_prefill(q, k, cfg)
    assert plan.path == "sparse" and plan.sampler == "torch" and plan.backend == backend
    assert plan.pattern.columns.shape == (B, 4, S) and plan.pattern.window_blocks.shape == (B, 4)
    # Only FlexAttention's kernel reads a BlockMask: the gathered products need none.
    assert (plan.call is None) == (backend == "gather")
    positions = plan.pattern.gathered(2).positions
    assert positions.shape[:2] == (B, 2) and positions.shape[2] % 64 == 0
    assert plan.density.shape == (B, 4) and float(plan.density.max()) < 1.0
    assert bool((plan.kept_sampled_mass() >= cfg.alpha - 1e-6).all())
    out = fs.run_plan(plan, q, k, v)
    assert torch.equal(out, fs.flex_sample_attention(q, k, v, config=cfg))


def test_plan_is_frozen_and_dense_plans_cost_nothing(project_costs):
    q, k, v = (torch.randn(1, h, 300, 16) for h in (2, 1, 1))
    plan = fs.plan_prefill(q, k)  # the project CPU's costs: at 300 tokens sparse cannot pay
    assert plan.path == "dense" and "seq_len 300" in plan.reason and "cost model" in plan.reason
    assert plan.scores is None and plan.block_mask is None and plan.density is None
    with pytest.raises(AttributeError):
        plan.path = "sparse"  # type: ignore[misc]
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.allclose(fs.run_plan(plan, q, k, v), ref, atol=1e-6)


def test_plan_records_stage_times_with_a_timer():
    q, k, _ = planted_qkv(1, 2, 1, 1100, 16, stripes=2, seed=1)
    timer = fs.StageTimer(q.device, enabled=True)
    config = fs.SampleConfig.always_sparse(backend="triton")
    fs.plan_prefill(q, k, config, timer=timer)
    assert set(timer.times) == {"sample", "select", "cover", "mask"}
    timer = fs.StageTimer(q.device, enabled=True)
    fs.plan_prefill(q, k, config.replace(row_guarantee=False), timer=timer)
    assert set(timer.times) == {"sample", "select", "mask"}
    timer = fs.StageTimer(q.device, enabled=True)  # no BlockMask to build
    fs.plan_prefill(q, k, config.replace(backend="gather"), timer=timer)
    assert set(timer.times) == {"sample", "select", "cover"}


def test_run_plan_rejects_inputs_it_was_not_made_for():
    q, k, v = planted_qkv(1, 2, 1, 1100, 16, stripes=2, seed=2)
    plan = fs.plan_prefill(q, k, fs.SampleConfig.always_sparse())
    with pytest.raises(ValueError, match=r"the plan is for \(B, Hq, L, S\) = \(1, 2, 1100, 1100\)"):
        fs.run_plan(plan, q[:, :, :1000], k[:, :, :1000], v[:, :, :1000])


def test_stats_tensors_live_on_the_inputs_device(device):
    q, k, v = planted_qkv(1, 4, 2, 1100, 16, stripes=2, seed=3, device=device)
    _, stats = fs.flex_sample_attention(
        q, k, v, config=fs.SampleConfig.always_sparse(), return_stats=True
    )
    for name in ("density", "window", "columns", "scores", "sampled_mass", "row_mass"):
        assert getattr(stats, name).device == q.device, name
    assert stats.tile_coverage().device == q.device


def test_calls_dense_by_length_skip_planning_but_not_the_checks(monkeypatch):
    """The second call of a shape that runs dense by its length goes straight to the kernel
    (no checks, no plan); any other signature (v's shape, grad, scale) is checked again, and a
    new cost model (``costs.clear_cache``) plans again."""
    from flexsample import api, costs
    from flexsample import plan as plan_module

    torch.manual_seed(11)
    q, k, v = torch.randn(1, 4, 300, 16), torch.randn(1, 2, 300, 16), torch.randn(1, 2, 300, 16)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    planned = []
    real = plan_module.plan_prefill_unchecked
    monkeypatch.setattr(api, "plan_prefill_unchecked", lambda *a: planned.append(a) or real(*a))
    with torch.no_grad():
        for _ in range(3):
            assert torch.allclose(fs.flex_sample_attention(q, k, v), ref, atol=1e-6)
        assert len(planned) == 1  # the first call planned; the others reused its plan
        with pytest.raises(ValueError, match="k and v must have the same shape"):
            fs.flex_sample_attention(q, k, v[:, :, :299])
        fs.flex_sample_attention(q, k, v, scale=0.25)  # another scale: planned again
        assert len(planned) == 2
        costs.clear_cache()
        fs.flex_sample_attention(q, k, v)
        assert len(planned) == 3
    with pytest.raises(NotImplementedError, match="requires grad"):
        fs.flex_sample_attention(q.requires_grad_(), k, v)
    # A sparse shape is planned on every call (its plan depends on q and k).
    q, k, v = planted_qkv(1, 2, 1, 1100, 16, stripes=2, seed=4)
    cfg = fs.SampleConfig.always_sparse()
    fs.flex_sample_attention(q, k, v, config=cfg)
    fs.flex_sample_attention(q, k, v, config=cfg)
    assert len(planned) == 5
