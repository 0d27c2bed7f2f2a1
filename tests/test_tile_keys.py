"""The query-aware pattern: every form of its rule agrees with the element mask."""

import pytest
import torch

from flexsample import SampleConfig, plan_prefill, run_plan
from flexsample.attention import sparse_attention, sparse_attention_reference
from flexsample.layout import SampleLayout
from flexsample.patterns import TileKeys, WindowColumns
from flexsample.synthetic import planted_qkv
from flexsample.testing import random_qkv, random_selection, rel_rmse
from flexsample.tiles import choose_tile_keys, short_tiles_triton, tile_rows


def _tile_keys(B, Hq, Hkv, S, L, bs, shared, per_tile=12, seed=0):
    """Random window + columns and up to ``per_tile`` random keys per query tile."""
    gen = torch.Generator().manual_seed(seed)
    drawn = random_selection(B, Hq, Hkv, S, bs, shared=shared, generator=gen)
    layout = SampleLayout.create(S, SampleConfig(block_size=bs), query_len=L)
    base = WindowColumns(drawn.window_blocks, drawn.columns, layout, drawn.shared_by)
    tiles = layout.num_blocks - layout.first_query_block
    keys = torch.randint(0, S + per_tile, (B, Hq, tiles, per_tile), generator=gen)
    return TileKeys.create(base, keys)


CASES = [
    pytest.param(2, 4, 2, 1000, 1000, 64, False, id="B2-H4/2-S1000-bs64"),
    pytest.param(1, 4, 2, 1024, 1024, 128, True, id="H4/2-S1024-bs128-group-union"),
    pytest.param(1, 4, 2, 1300, 333, 128, False, id="chunk-333-of-1300-bs128"),
]


@pytest.mark.parametrize("B, Hq, Hkv, S, L, bs, shared", CASES)
def test_tile_keys_obey_the_rule_and_every_form_agrees(B, Hq, Hkv, S, L, bs, shared):
    pattern = _tile_keys(B, Hq, Hkv, S, L, bs, shared)
    layout = pattern.layout
    assert pattern.counts().sum() > 0  # some keys survived create()
    assert (pattern.keys[..., 1:] > pattern.keys[..., :-1])[pattern.keys[..., 1:] < S].all()
    rows = torch.arange(layout.query_start, S)
    keep = pattern.keep(rows)  # (B, H, L, S)
    base = pattern.base.keep(rows)
    extra = keep & ~base
    # A tile's keys: before its window, neither columns nor sink, so causal for its rows.
    assert not (extra & (torch.arange(S)[None, :] > rows[:, None])).any()
    assert int(extra.sum()) == int(
        (pattern.counts()[..., (rows // bs - layout.first_query_block)]).sum()
    )
    assert layout.causal_pairs == int((rows + 1).sum())
    assert float(pattern.density().sum()) * layout.causal_pairs == pytest.approx(keep.sum())
    heads = torch.arange(B * Hq).repeat_interleave(len(rows))
    flat = pattern.keep_heads(heads, rows.repeat(B * Hq))
    assert torch.equal(flat.view(B, Hq, len(rows), S), keep)


@pytest.mark.parametrize("B, Hq, Hkv, S, L, bs, shared", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_tile_keys_products_match_the_element_mask(B, Hq, Hkv, S, L, bs, shared, dtype):
    q, k, v = random_qkv(B, Hq, Hkv, S, 64, dtype)
    q = q[:, :, S - L :]
    pattern = _tile_keys(B, Hq, Hkv, S, L, bs, shared, seed=1)
    got = pattern.attend(q, k, v, 64**-0.5)
    ref = sparse_attention_reference(q.double(), k.double(), v.double(), pattern, 64**-0.5)
    base = sparse_attention_reference(q.double(), k.double(), v.double(), pattern.base, 64**-0.5)
    assert rel_rmse(base, ref) > 1e-3  # the tiles' keys matter here
    if dtype == torch.float32:
        assert float((got.double() - ref).abs().max()) < 1e-4
    else:
        assert rel_rmse(got, ref) < 4e-3


@pytest.mark.parametrize("B, Hq, Hkv, S, L, bs, shared", CASES)
def test_tile_keys_flex_call_matches_the_element_mask(B, Hq, Hkv, S, L, bs, shared):
    """Slots in front of the base's keys + BlockMask + compiled FlexAttention == the rule."""
    q, k, v = random_qkv(B, Hq, Hkv, S, 64)
    q = q[:, :, S - L :]
    pattern = _tile_keys(B, Hq, Hkv, S, L, bs, shared, seed=2)
    call = pattern.compile(Hq // Hkv)
    out = sparse_attention(
        call.queries(q), call.arrange(k), call.arrange(v), call.block_mask, 64**-0.5
    )
    got = call.outputs(out, L)
    ref = sparse_attention_reference(q.double(), k.double(), v.double(), pattern, 64**-0.5)
    assert float((got.double() - ref).abs().max()) < 1e-4


def test_the_cover_and_static_kernels_say_what_they_do_not_take():
    pattern = _tile_keys(1, 2, 1, 512, 512, 64, False)
    with pytest.raises(TypeError, match="row cover"):
        pattern.row_tables(torch.arange(4))
    with pytest.raises(NotImplementedError, match="static-shape"):
        pattern.compile(2, static=True)


def test_tile_rows_end_each_tile_and_stay_in_it():
    layout = SampleLayout.create(1000, SampleConfig(block_size=128), query_len=700)
    rows = tile_rows(layout, 4)
    qb = torch.arange(layout.first_query_block, layout.num_blocks)
    assert rows.shape == (len(qb), 4)
    assert torch.equal(rows[:, -1], ((qb + 1) * 128).clamp(max=1000) - 1)
    assert (rows >= 300).all() and (rows // 128 == qb[:, None]).all()
    assert (rows.diff(dim=-1) > 0).all()


def test_query_aware_selection_gives_each_sampled_row_of_a_tile_alpha():
    """Regional stripes: window + columns leave tiles far short; their own keys bring every
    sampled row to alpha (or the tile to its most keys) and cut the error tenfold."""
    S, alpha, most = 4096, 0.95, 256
    q, k, v = planted_qkv(1, 4, 2, S, 64, stripes=(16, 32), stripe_width=1, stripe_scope=256,
                          locality=3.0, local_span=512, seed=5)  # fmt: skip
    config = SampleConfig.always_sparse(
        alpha=alpha, backend="gather", row_guarantee=False, min_window=128
    )
    plain = plan_prefill(q, k, config)
    aware = plan_prefill(q, k, config.replace(tile_keys=most))
    assert isinstance(aware.pattern, TileKeys) and torch.equal(
        aware.pattern.base.columns, plain.pattern.columns
    )
    rows = tile_rows(aware.layout, 4)  # (T, 4)
    logits = (q[0] @ k[0].repeat_interleave(2, dim=0).transpose(-1, -2))[:, rows.flatten()] / 8
    future = torch.arange(S)[None, :] > rows.flatten()[:, None]
    probs = torch.softmax(logits.masked_fill(future, -torch.inf), dim=-1)  # (H, T * 4, S)
    kept = [(probs * p.pattern.keep(rows.flatten())[0]).sum(dim=-1) for p in (plain, aware)]
    assert float(kept[0].min()) < 0.5  # the base misses what some regions read
    full = aware.pattern.counts()[0].repeat_interleave(4, dim=-1) == most  # (H, T * 4)
    assert bool((kept[1] >= alpha - 1e-4)[~full].all()) and full.float().mean() < 0.2
    exact = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), is_causal=True, enable_gqa=True
    )
    errors = [rel_rmse(run_plan(p, q, k, v), exact) for p in (plain, aware)]
    assert errors[1] < 0.1 * errors[0] and errors[1] < 0.05
    assert float(aware.density.mean()) < 1.1 * float(plain.density.mean())


def test_tile_keys_settings_are_checked():
    with pytest.raises(ValueError, match="tile_keys"):
        SampleConfig().replace(tile_keys=-1)
    with pytest.raises(ValueError, match="tile_rows"):
        SampleConfig().replace(tile_rows=0)


def test_tile_keys_run_the_same_on_flex_attention_and_as_gathered_products():
    q, k, v = planted_qkv(1, 4, 2, 4096, 64, stripes=(16, 32), stripe_width=1, stripe_scope=256,
                          locality=3.0, local_span=512, seed=5)  # fmt: skip
    config = SampleConfig.always_sparse(min_window=128, tile_keys=128, row_guarantee=False)
    outs = []
    for backend in ("gather", "triton"):
        plan = plan_prefill(q, k, config.replace(backend=backend))
        assert isinstance(plan.pattern, TileKeys) and int(plan.pattern.counts().sum()) > 0
        outs.append(run_plan(plan, q, k, v))
    assert float((outs[0] - outs[1]).abs().max()) < 1e-4


def _regional_base(B, S, L):
    """Regional stripes, and the window + columns the plan chooses for them."""
    q, k, _ = planted_qkv(B, 4, 2, S, 64, stripes=(16, 32), stripe_width=1, stripe_scope=256,
                          locality=3.0, local_span=512, seed=5)  # fmt: skip
    q = q[:, :, S - L :]
    config = SampleConfig.always_sparse(min_window=128, row_guarantee=False, backend="gather")
    base = plan_prefill(q, k, config).pattern
    return q, k, base, tile_rows(base.layout, 4)


@pytest.mark.parametrize(
    "B, S, L",
    [(1, 4096, 4096), (2, 3000, 3000), (1, 4000, 1500)],
    ids=["S4096", "B2-S3000", "chunk-1500-of-4000"],
)
def test_tile_choice_is_the_same_in_chunks_and_in_float64(B, S, L):
    """Chunks over the tiles of every head (some holding two kv heads' tiles) and float64
    choose the keys one chunk in float32 does."""
    q, k, base, rows = _regional_base(B, S, L)
    every = torch.ones(B, 4, rows.shape[0], dtype=torch.bool)
    args = (q, k, base, 0.95, 64**-0.5, rows)
    whole = choose_tile_keys(*args, every, 64)
    taking = (whole < S).any(dim=-1)
    assert 0 < taking.float().mean() < 1  # some tiles take keys, some do not
    assert torch.equal(choose_tile_keys(*args, every, 64, chunk_elements=7 * 4 * S), whole)
    exact = choose_tile_keys(*args, every, 64, dtype=torch.float64)
    assert (exact == whole).float().mean() > 0.99


def test_tiles_the_triton_filter_skips_take_no_keys():
    """The Triton row kernels' short tiles (under the interpreter here) hold every tile that
    takes keys, and choosing over them alone gives the keys choosing over all tiles does."""
    q, k, base, rows = _regional_base(1, 4000, 1500)
    args = (q, k, base, 0.95, 64**-0.5, rows)
    whole = choose_tile_keys(*args, torch.ones(1, 4, rows.shape[0], dtype=torch.bool), 64)
    short = short_tiles_triton(*args)
    taking = (whole < 4000).any(dim=-1)
    assert bool((short | ~taking).all()) and not bool(short.all()) and bool(taking.any())
    assert torch.equal(choose_tile_keys(*args, short, 64), whole)


def test_column_alpha_leaves_to_the_tiles_what_only_some_tiles_need():
    """With column_alpha below alpha, the window + columns keep less (fewer columns that
    every later query reads) and the tiles' own keys bring each tile's sampled rows to
    alpha: on regional stripes, fewer pairs and less error than one alpha for both."""
    S = 4096
    q, k, v = planted_qkv(1, 4, 2, S, 64, stripes=(16, 32), stripe_width=1, stripe_scope=256,
                          locality=3.0, local_span=512, seed=5)  # fmt: skip
    config = SampleConfig.always_sparse(backend="gather", min_window=128).replace(tile_keys=512)
    one = plan_prefill(q, k, config.replace(alpha=0.97))
    split = plan_prefill(q, k, config.replace(alpha=0.98, column_alpha=0.9))
    lower = plan_prefill(q, k, config.replace(alpha=0.9, tile_keys=0))
    assert torch.equal(split.pattern.base.columns, lower.pattern.columns)
    assert split.pattern.base.columns.sum() < one.pattern.base.columns.sum()
    rows = tile_rows(split.layout, 4).flatten()
    logits = (q[0] @ k[0].repeat_interleave(2, dim=0).transpose(-1, -2))[:, rows] / 8
    future = torch.arange(S)[None, :] > rows[:, None]
    probs = torch.softmax(logits.masked_fill(future, -torch.inf), dim=-1)
    kept = (probs * split.pattern.keep(rows)[0]).sum(dim=-1)
    full = split.pattern.counts()[0].repeat_interleave(4, dim=-1) == 512
    assert bool((kept >= 0.98 - 1e-4)[~full].all())
    exact = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), is_causal=True, enable_gqa=True
    )
    errors = [rel_rmse(run_plan(p, q, k, v), exact) for p in (one, split)]
    assert float(split.density.mean()) < 0.9 * float(one.density.mean())
    assert errors[1] < errors[0]


def test_column_alpha_is_checked():
    with pytest.raises(ValueError, match="column_alpha needs tile_keys"):
        SampleConfig().replace(column_alpha=0.9)
    with pytest.raises(ValueError, match="must not exceed alpha"):
        SampleConfig(alpha=0.9).replace(tile_keys=64, column_alpha=0.95)
    with pytest.raises(ValueError, match="column_alpha"):
        SampleConfig().replace(tile_keys=64, column_alpha=0.0)
    config = SampleConfig(alpha=0.97).replace(tile_keys=64, column_alpha=0.9)
    assert (config.column_alpha, SampleConfig().column_alpha) == (0.9, 0.95)


def test_auto_runs_tile_keys_on_triton_where_it_would_pick_a_static_shape_kernel(monkeypatch):
    """Where "auto" resolves to FlashAttention-4 (static shapes, no call for tile keys yet),
    a query-aware plan runs FlexAttention's Triton kernel instead; naming it is an error."""
    import flexsample.plan as plan_module

    monkeypatch.setattr(plan_module, "resolve_backend", lambda *args: "flash")
    q, k, _ = random_qkv(1, 4, 2, 1024, 64)
    config = SampleConfig.always_sparse().replace(tile_keys=64)
    assert plan_prefill(q, k, config).backend == "triton"
    with pytest.raises(ValueError, match="no call for backend 'flash'"):
        plan_prefill(q, k, config.replace(backend="flash"))
