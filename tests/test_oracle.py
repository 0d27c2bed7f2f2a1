"""The mask-quality yardstick: exact on trivial masks, and the oracle is what it claims."""

import pytest
import torch

import flexsample as fs
from flexsample.oracle import evaluate_mask, evaluate_plan, oracle_frontier
from flexsample.synthetic import planted_qkv
from flexsample.testing import rel_rmse


def _inputs():
    return planted_qkv(2, 4, 2, 333, 16, stripes=3, stripe_width=1, seed=11)


def test_the_full_mask_is_exact():
    q, k, v = _inputs()
    quality = evaluate_mask(
        q, k, v, lambda b, h, rows: torch.ones(len(rows), 333, dtype=torch.bool), chunk=100
    )
    assert quality.density == pytest.approx(1.0)
    assert quality.output_error < 1e-12
    assert quality.kept_mass_min == pytest.approx(1.0)


@pytest.mark.parametrize("unit", ["token", "tile"])
def test_oracle_keeps_alpha_per_row_and_alpha_one_is_exact(unit):
    q, k, v = _inputs()
    frontier = oracle_frontier(q, k, v, [0.9, 1.0], unit=unit, block_size=64, chunk=100)
    assert frontier[0.9].kept_mass_min >= 0.9 - 1e-9
    assert frontier[0.9].density < frontier[1.0].density
    assert frontier[1.0].output_error < 1e-9


def test_tokens_need_fewer_pairs_than_tiles_and_the_plan_is_scored_the_same_way():
    q, k, v = _inputs()
    token = oracle_frontier(q, k, v, [0.95], unit="token", block_size=64)[0.95]
    tile = oracle_frontier(q, k, v, [0.95], unit="tile", block_size=64)[0.95]
    assert token.density < tile.density
    plan = fs.plan_prefill(q, k, fs.SampleConfig.always_sparse(block_size=64, min_window=64))
    quality = evaluate_plan(q, k, v, plan)
    assert quality.density == pytest.approx(float(plan.density.mean()))
    out = fs.run_plan(plan, q, k, v)
    exact = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), is_causal=True, enable_gqa=True
    )
    assert quality.output_error == pytest.approx(rel_rmse(out, exact), rel=1e-3)


def test_bad_arguments():
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="unit must be"):
        oracle_frontier(q, k, v, [0.9], unit="row")
    with pytest.raises(ValueError, match="alphas must lie in"):
        oracle_frontier(q, k, v, [1.5])


def test_scoring_a_subset_of_rows():
    q, k, v = _inputs()
    plan = fs.plan_prefill(q, k, fs.SampleConfig.always_sparse(block_size=64))
    every = evaluate_plan(q, k, v, plan, chunk=100)
    assert evaluate_plan(q, k, v, plan, chunk=100, rows=torch.arange(333)) == every
    rows = torch.tensor([5, 100, 217, 332])
    some = evaluate_plan(q, k, v, plan, chunk=3, rows=rows)
    # Their own pairs: the plan's mask on those rows, counted by hand.
    keep = plan.pattern.keep(rows)
    assert some.density == pytest.approx(float(keep.sum()) / (2 * 4 * float((rows + 1).sum())))
    oracle = oracle_frontier(q, k, v, [0.9], chunk=3, rows=rows)[0.9]
    assert oracle.kept_mass_min >= 0.9 - 1e-9 and oracle.density <= some.density
    with pytest.raises(ValueError, match="rows must be non-empty positions in"):
        oracle_frontier(q, k, v, [0.9], rows=torch.tensor([333]))
