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


@pytest.mark.parametrize("unit", ["token", "tile"])
def test_a_query_tile_of_one_row_is_the_per_row_oracle(unit):
    q, k, v = _inputs()
    rows = oracle_frontier(q, k, v, [0.9, 0.99], unit=unit, block_size=64)
    tiles = oracle_frontier(q, k, v, [0.9, 0.99], unit=unit, block_size=64, query_tile=1)
    for alpha in rows:
        assert tiles[alpha].density == pytest.approx(rows[alpha].density, rel=1e-12)
        assert tiles[alpha].output_error == pytest.approx(rows[alpha].output_error, rel=1e-9)


@pytest.mark.parametrize("unit", ["token", "tile"])
def test_the_query_tile_oracle_holds_every_row_and_computes_more_than_the_per_row_one(unit):
    q, k, v = _inputs()  # 333 rows: the last tile is partial
    rows = oracle_frontier(q, k, v, [0.95], unit=unit, block_size=64)[0.95]
    tiles = oracle_frontier(q, k, v, [0.95], unit=unit, block_size=64, query_tile=64)[0.95]
    assert tiles.kept_mass_min >= 0.95 - 1e-9
    assert rows.density < tiles.density <= 1.0


def test_a_query_tile_reads_the_union_of_what_its_rows_need():
    """Row 6 reads key 2 alone, row 7 key 3 alone: per row one key each, per tile both."""
    S = 8
    k = 100.0 * torch.eye(S)[None, None]  # key j: a spike in dimension j
    q = torch.zeros(1, 1, S, S)
    q[0, 0, 6, 2] = q[0, 0, 7, 3] = 1.0
    v = torch.randn(1, 1, S, 4, generator=torch.Generator().manual_seed(0))
    rows = torch.tensor([6, 7])
    kw = {"scale": 1.0, "rows": rows}
    per_row = oracle_frontier(q, k, v, [0.9], **kw)[0.9]
    tile = oracle_frontier(q, k, v, [0.9], query_tile=2, **kw)[0.9]
    causal = 7 + 8
    assert per_row.density == pytest.approx(2 / causal)
    assert tile.density == pytest.approx(4 / causal)
    assert tile.output_error < 1e-12 and per_row.output_error < 1e-12


def test_bad_arguments():
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="unit must be"):
        oracle_frontier(q, k, v, [0.9], unit="row")
    with pytest.raises(ValueError, match="alphas must lie in"):
        oracle_frontier(q, k, v, [1.5])
    with pytest.raises(ValueError, match="query_tile must be"):
        oracle_frontier(q, k, v, [0.9], query_tile=0)


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


def test_regional_stripes_are_read_by_one_query_region_each():
    """``stripe_scope``: each stripe draws its mass from the rows of one region after it."""
    S, scope = 1024, 128
    q, k, _ = planted_qkv(1, 2, 1, S, 64, stripes=6, stripe_width=1, stripe_scope=scope, seed=3)
    probs = torch.softmax(
        (q[0] @ k[0].transpose(-1, -2)) / 8 + torch.full((S, S), -torch.inf).triu(1), dim=-1
    )  # (Hq, S, S)
    stripes = (k[0, 0, 4:].norm(dim=-1) > 15).nonzero().flatten() + 4  # after the sinks
    assert 3 <= len(stripes) <= 6  # a stripe with no region after it is left out
    for s in stripes.tolist():
        after = -(-(s + 1) // scope)  # the regions wholly after it
        per_region = probs[:, after * scope :, s].mean(dim=0).view(-1, scope).mean(dim=-1)
        reader = int(per_region.argmax())
        assert per_region[reader] > 0.05  # its region reads it: 5% of each row's mass
        others = torch.cat([per_region[:reader], per_region[reader + 1 :]])
        assert others.numel() == 0 or float(others.max()) < 0.005
