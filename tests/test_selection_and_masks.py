"""Stage 2 (window and columns per head, CRA) and the BlockMask built from it."""

import itertools

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask

from flexsample import (
    SampleConfig,
    SampleLayout,
    WindowColumns,
    sample_column_scores_reference,
    select_columns,
)
from flexsample.layout import window_pairs
from flexsample.masks import block_map_indices
from flexsample.patterns.window_columns import (
    block_maps,
    build_block_mask,
    key_codes,
    kv_block_indices,
    pair_density,
    tile_coverage,
)
from flexsample.synthetic import planted_qkv


def _scores(B, Hq, Hkv, S, cfg, seed=0, **planted):
    q, k, _ = planted_qkv(B, Hq, Hkv, S, 32, seed=seed, **planted)
    layout = SampleLayout.create(S, cfg)
    return sample_column_scores_reference(q, k, layout, 32**-0.5), layout


CONFIGS = [
    pytest.param(SampleConfig(block_size=64), id="adaptive-tokens"),
    pytest.param(SampleConfig(block_size=32).replace(column_unit="block"), id="adaptive-blocks"),
    pytest.param(
        SampleConfig(block_size=64).replace(window_ratio=0.1, sink_blocks=1), id="fixed-sink"
    ),
    pytest.param(SampleConfig(block_size=16, min_window=0, num_segments=3), id="floor0-bs16"),
]


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("alpha", [0.5, 0.9, 0.95, 0.99])
def test_selection_reaches_alpha_for_every_segment(cfg, alpha):
    scores, layout = _scores(2, 4, 2, 1000, cfg, stripes=(2, 5), stripe_width=3)
    sel = select_columns(scores, layout, alpha)
    assert sel.window_blocks.shape == (2, 4) and sel.columns.shape == (2, 4, 1000)
    kept = WindowColumns(sel.window_blocks, sel.columns, layout).kept_sampled_mass(scores)
    assert (kept >= alpha - 1e-5).all()
    assert sel.columns[..., : layout.sink_tokens].all()  # the sink is always kept


@pytest.mark.parametrize("cfg", CONFIGS)
def test_weighing_only_the_heaviest_units_keeps_alpha_and_costs_no_fewer_pairs(cfg):
    # Random scores: many small columns, so a short list of heavy units leaves some window
    # candidates without enough mass and the search must skip them.
    layout = SampleLayout.create(1000, cfg)
    scores = torch.rand(2, 3, layout.num_segments, 1000) ** 8
    rows = layout.sampled_rows().amax(dim=-1)
    scores = scores.masked_fill(torch.arange(1000) > rows[:, None], 0)
    scores = scores / scores.sum(dim=-1, keepdim=True)
    whole = select_columns(scores, layout, 0.9, top_units=1000)
    whole_pairs = pair_density(whole.window_blocks, whole.columns, layout)
    for top in (1, 7, 64, 300):
        sel = select_columns(scores, layout, 0.9, top_units=top)
        kept = WindowColumns(sel.window_blocks, sel.columns, layout).kept_sampled_mass(scores)
        assert (kept >= 0.9 - 1e-5).all(), top
        density = pair_density(sel.window_blocks, sel.columns, layout)
        assert (density >= whole_pairs - 1e-12).all(), top
    # With every unit weighed (the default bound exceeds S here), the same selection.
    default = select_columns(scores, layout, 0.9)
    assert torch.equal(default.columns, whole.columns)
    assert torch.equal(default.window_blocks, whole.window_blocks)


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("structure", ["diffuse", "stripes", "chunk"])
def test_a_short_first_list_gives_the_same_selection(cfg, structure, monkeypatch):
    """Weighing the heaviest FIRST_UNITS first, then all ``top_units`` for the heads not yet
    decided, selects what weighing ``top_units`` at once selects; on sharp attention no head
    is weighed twice."""
    from flexsample import selection

    if structure in ("diffuse", "chunk"):  # a chunk: the last 400 queries of 1000 keys
        layout = SampleLayout.create(1000, cfg, query_len=400 if structure == "chunk" else None)
        scores = torch.rand(2, 3, layout.num_segments, 1000) ** 8
        rows = layout.sampled_rows().amax(dim=-1)
        scores = scores.masked_fill(torch.arange(1000) > rows[:, None], 0)
        scores = scores / scores.sum(dim=-1, keepdim=True)
    else:
        scores, layout = _scores(2, 4, 2, 1000, cfg, stripes=(2, 5), stripe_width=1)
    weighed = []
    search = selection._cheapest_candidates

    def spy(mass, *args):
        weighed.append(mass.shape[0] * mass.shape[1])
        return search(mass, *args)

    monkeypatch.setattr(selection, "_cheapest_candidates", spy)
    for top in (64, 300, 1000):
        monkeypatch.setattr(selection, "FIRST_UNITS", top)
        once = select_columns(scores, layout, 0.9, top_units=top)
        monkeypatch.setattr(selection, "FIRST_UNITS", 12)
        weighed.clear()
        tiered = select_columns(scores, layout, 0.9, top_units=top)
        assert torch.equal(tiered.window_blocks, once.window_blocks), top
        assert torch.equal(tiered.columns, once.columns), top
        assert weighed[0] == scores.shape[0] * scores.shape[1]  # every head once
    if structure == "stripes" and layout.fixed_window_blocks is None:
        monkeypatch.setattr(selection, "FIRST_UNITS", 64)
        weighed.clear()
        select_columns(scores, layout, 0.9, top_units=1000)
        assert weighed == [scores.shape[0] * scores.shape[1]]  # none weighed again


def test_block_columns_are_whole_blocks():
    cfg = SampleConfig(block_size=32).replace(column_unit="block")
    scores, layout = _scores(1, 2, 1, 700, cfg, stripes=3, stripe_width=1)
    cols = select_columns(scores, layout, 0.95).columns
    padded = torch.nn.functional.pad(cols, (0, layout.num_blocks * 32 - 700))
    per_block = padded.view(1, 2, layout.num_blocks, 32)
    full, empty = per_block.all(-1), ~per_block.any(-1)
    assert (full | empty)[..., :-1].all()  # the last block may be partial


def _pairs(window: int, columns: torch.Tensor, layout: SampleLayout) -> int:
    """(query, key) pairs of one head, by the element mask."""
    rows = torch.arange(layout.seq_len)
    w = torch.tensor([[window]])
    return int(WindowColumns(w, columns[None, None], layout).keep(rows).sum())


def test_window_choice_computes_the_fewest_pairs():
    """Brute force: for every candidate window, the fewest columns that reach alpha for every
    segment (each segment's greedy cover), then the pairs; selection takes the cheapest."""
    cfg = SampleConfig(block_size=32, min_window=32)
    scores, layout = _scores(1, 1, 1, 640, cfg, stripes=2, stripe_width=1, local_span=200)
    sel = select_columns(scores, layout, 0.9)
    costs = {}
    for w in layout.window_candidates():
        fixed = SampleLayout.create(640, cfg.replace(window_ratio=w * 32 / 640, min_window=0))
        assert fixed.window_candidates() == [w]
        cols = select_columns(scores, fixed, 0.9).columns[0, 0]
        costs[w] = _pairs(w, cols, layout)
        # the cost model: window pairs plus, per column, the queries after its block + w
        readers = sum(max(0, 640 - (int(j) // 32 + w + 1) * 32) for j in cols.nonzero())
        assert costs[w] == window_pairs(layout, w) + readers
    best = min(costs, key=costs.get)
    assert int(sel.window_blocks[0, 0]) == best
    assert _pairs(best, sel.columns[0, 0], layout) == costs[best]


def test_each_segment_cover_is_its_smallest():
    """Brute force over column subsets for one segment and a fixed window."""
    cfg = SampleConfig(block_size=16, min_window=0, num_segments=1).replace(window_ratio=0.1)
    layout = SampleLayout.create(200, cfg)  # window: 2 blocks, from key 160 for the last row
    scores = torch.zeros(1, 1, 1, 200)
    scores[0, 0, 0, [3, 50, 70, 90, 120]] = torch.tensor([0.3, 0.2, 0.15, 0.1, 0.05])
    scores[0, 0, 0, 180:200] = 0.2 / 20  # the window's mass
    chosen = select_columns(scores, layout, 0.8).columns[0, 0].nonzero().flatten().tolist()
    assert chosen == [3, 50, 70]  # 0.2 + 0.3 + 0.2 + 0.15 = 0.85 >= 0.8; two would not do
    heavy = [3, 50, 70, 90, 120]
    for subset in itertools.combinations(heavy, 2):
        assert 0.2 + float(scores[0, 0, 0, list(subset)].sum()) < 0.8


def test_selection_unions_segments():
    cfg = SampleConfig(block_size=16, min_window=0, num_segments=2).replace(window_ratio=0.0)
    layout = SampleLayout.create(400, cfg)
    scores = torch.zeros(1, 1, 2, 400)
    scores[0, 0, 0, [10, 199]] = torch.tensor([0.9, 0.1])  # segment 0 needs column 10
    scores[0, 0, 1, [20, 399]] = torch.tensor([0.9, 0.1])  # segment 1 needs column 20
    chosen = select_columns(scores, layout, 0.9).columns[0, 0].nonzero().flatten().tolist()
    assert chosen == [10, 20]


def test_selection_keeps_no_columns_when_the_window_suffices():
    layout = SampleLayout.create(400, SampleConfig(block_size=16).replace(window_ratio=0.2))
    scores = torch.zeros(1, 1, layout.num_segments, 400)
    for g, end in enumerate(layout.segment_ends()):
        scores[0, 0, g, end - 10 : end] = 0.1  # all mass right behind the row
    assert not select_columns(scores, layout, 0.99).columns.any()


@pytest.mark.parametrize("alpha", [0.0, 1.1, float("nan")])
def test_selection_rejects_bad_alpha(alpha):
    layout = SampleLayout.create(64, SampleConfig(block_size=16, num_segments=1))
    with pytest.raises(ValueError, match="alpha"):
        select_columns(torch.rand(1, 1, 1, 64), layout, alpha)


def test_selection_rejects_bad_scores():
    layout = SampleLayout.create(64, SampleConfig(block_size=16, num_segments=1))
    with pytest.raises(ValueError, match=r"\(B, H, 1, 64\) for this layout"):
        select_columns(torch.rand(1, 1, 1, 60), layout, 0.9)
    with pytest.raises(TypeError, match="floating"):
        select_columns(torch.ones(1, 1, 1, 64, dtype=torch.int64), layout, 0.9)


def test_gathered_lists_each_query_heads_own_columns_in_order():
    layout = SampleLayout.create(100, SampleConfig(block_size=16))
    cols = torch.zeros(1, 4, 100, dtype=torch.bool)
    cols[0, 0, [5, 40]] = True
    cols[0, 1, [40, 7, 90]] = True  # same kv head as head 0
    cols[0, 3, 60] = True
    sel = WindowColumns(torch.zeros(1, 4, dtype=torch.int64), cols, layout)
    gathered = sel.gathered(group=2)
    positions = gathered.positions
    # one slice per query head, 3 columns at most, rounded up to a block of 16
    assert (gathered.slices, gathered.width) == (2, 16) and positions.shape == (1, 2, 32)
    assert positions[0, 0, :3].tolist() == [5, 40, 100]  # head 0
    assert positions[0, 0, 16:20].tolist() == [7, 40, 90, 100]  # head 1
    assert positions[0, 1, :2].tolist() == [100, 100]  # head 2: nothing
    assert positions[0, 1, 16:18].tolist() == [60, 100]  # head 3
    assert int((positions < 100).sum()) == int(cols.sum())
    codes = key_codes(gathered, 100)
    assert codes.shape == (1, 4, 132)
    # a head's own slice codes its columns, the other head's slice is never attended
    assert codes[0, 1, :16].eq(-101).all() and codes[0, 1, 16:19].tolist() == [-8, -41, -91]
    assert codes[0, 0, :2].tolist() == [-6, -41] and codes[0, 0, 16:32].eq(-101).all()
    assert codes[0, 2, 32:].tolist() == list(range(100))
    empty = WindowColumns(sel.window_blocks, torch.zeros_like(cols), layout)
    assert empty.gathered(group=2).positions.shape == (1, 2, 0)


def test_group_union_is_gathered_once_per_kv_head():
    layout = SampleLayout.create(100, SampleConfig(block_size=16))
    cols = torch.zeros(1, 4, 100, dtype=torch.bool)
    cols[0, 0, [5, 40]] = True
    cols[0, 1, [40, 7, 90]] = True
    cols[0, 3, 60] = True
    shared = WindowColumns(torch.zeros(1, 4, dtype=torch.int64), cols, layout).shared_by_group(2)
    assert shared.columns[0, 0].nonzero().flatten().tolist() == [5, 7, 40, 90]
    assert torch.equal(shared.columns[0, 0], shared.columns[0, 1])
    assert shared.columns[0, 2].nonzero().flatten().tolist() == [60]
    gathered = shared.gathered(group=2)
    # one slice per kv head, which both of its query heads read
    assert (gathered.slices, gathered.width) == (1, 16) and gathered.positions.shape == (1, 2, 16)
    assert gathered.positions[0, 0, :5].tolist() == [5, 7, 40, 90, 100]
    assert gathered.positions[0, 1, :2].tolist() == [60, 100]
    per_head = gathered.per_query_head()
    assert torch.equal(per_head[0, 0], per_head[0, 1])
    assert torch.equal(per_head[0, 3], per_head[0, 2])
    codes = key_codes(gathered, 100)
    assert codes.shape == (1, 4, 116)
    assert codes[0, 0, :4].tolist() == codes[0, 1, :4].tolist() == [-6, -8, -41, -91]
    # the same selection without the promise gathers one slice per query head
    plain = WindowColumns(shared.window_blocks, shared.columns, layout).gathered(group=2)
    assert plain.slices == 2 and plain.positions.shape == (1, 2, 32)


def _random_selection(B, Hq, Hkv, S, bs, seed, shared=False):
    gen = torch.Generator().manual_seed(seed)
    layout = SampleLayout.create(S, SampleConfig(block_size=bs))
    windows = torch.randint(0, layout.num_blocks + 1, (B, Hq), generator=gen)
    cols = torch.rand(B, Hq, S, generator=gen) < 0.08
    sel = WindowColumns(windows, cols, layout)
    if shared:
        sel = sel.shared_by_group(Hq // Hkv)
    return sel, layout, Hq // Hkv


@pytest.mark.parametrize(
    "B, Hq, Hkv, S, L, bs, density",
    [
        (1, 2, 1, 300, 300, 16, 0.08),
        (2, 4, 2, 1000, 1000, 64, 0.08),
        (1, 3, 3, 513, 513, 128, 0.3),
        (2, 6, 2, 257, 257, 32, 0.0),  # no column: no gathered block
        (2, 4, 2, 1000, 333, 64, 0.08),  # a chunk: its query blocks start mid-prompt
        (1, 2, 2, 40, 40, 64, 0.1),  # one block
    ],
)
@pytest.mark.parametrize("shared", [False, True], ids=["per-head", "group-union"])
def test_block_indices_are_the_block_maps_indices(B, Hq, Hkv, S, L, bs, density, shared):
    """The fast twin: indices written from counts equal those of the dense block maps."""
    gen = torch.Generator().manual_seed(S + L)
    layout = SampleLayout.create(S, SampleConfig(block_size=bs), query_len=L)
    windows = torch.randint(0, layout.num_blocks + 2, (B, Hq), generator=gen)
    sel = WindowColumns(windows, torch.rand(B, Hq, S, generator=gen) < density, layout)
    if shared:
        sel = sel.shared_by_group(Hq // Hkv)
    gathered = sel.gathered(Hq // Hkv)
    full, partial = block_maps(sel.window_blocks, gathered, layout)
    expect = (*block_map_indices(full), *block_map_indices(partial))
    got = kv_block_indices(sel.window_blocks, gathered, layout)
    names = ("full num", "full idx", "partial num", "partial idx")
    for name, g, e in zip(names, got, expect, strict=True):
        assert g.dtype == e.dtype and torch.equal(g, e), name


@pytest.mark.parametrize(
    "B, Hq, Hkv, S, bs",
    [(1, 2, 1, 300, 16), (2, 4, 2, 1000, 64), (1, 3, 3, 513, 128), (2, 6, 2, 257, 32)],
    ids=["B1-H2/1-S300-bs16", "B2-H4/2-S1000-bs64", "B1-H3/3-S513-bs128", "B2-H6/2-S257-bs32"],
)
@pytest.mark.parametrize("shared", [False, True], ids=["per-head", "group-union"])
def test_block_mask_means_the_element_mask(B, Hq, Hkv, S, bs, shared):
    """Over [gathered | keys], the BlockMask's kept elements (full blocks whole, partial
    blocks through the mask_mod) map back to exactly keep_mask's original keys, and the
    mask_mod is True on every full block; with per-head slices and with one shared slice
    per kv head (group_union)."""
    sel, layout, group = _random_selection(B, Hq, Hkv, S, bs, seed=S, shared=shared)
    gathered = sel.gathered(group)
    assert gathered.slices == (1 if shared else group)
    bm = build_block_mask(sel.window_blocks, gathered, layout)
    C = gathered.positions.shape[-1]
    L = C + S
    assert bm.shape == (B, Hq, S, L)
    mod = create_mask(bm.mask_mod, B, Hq, S, L, device="cpu")
    nq, nkv = -(-S // bs), -(-L // bs)

    def blocks(num, idx):
        valid = (torch.arange(idx.shape[-1]) < num[..., None]).int()
        hit = torch.zeros(B, Hq, nq, nkv, dtype=torch.int32).scatter_add_(-1, idx.long(), valid)
        return (hit > 0).repeat_interleave(bs, -2).repeat_interleave(bs, -1)[..., :S, :L]

    full, partial = (
        blocks(bm.full_kv_num_blocks, bm.full_kv_indices),
        blocks(bm.kv_num_blocks, bm.kv_indices),
    )
    assert not (full & partial).any()
    assert mod[full].all()
    kept = full | (partial & mod)
    assert not (mod & ~(full | partial)).any()  # no kept element outside the listed blocks
    # map [gathered | keys] back to original positions
    codes = key_codes(gathered, S).long()
    original = torch.where(codes < 0, -codes - 1, codes)  # (B, Hq, L); other heads' slices: S
    dense = torch.zeros(B, Hq, S, S + 1, dtype=torch.int32)
    dense.scatter_add_(-1, original[:, :, None, :].expand(B, Hq, S, L), kept.int())
    expect = WindowColumns(sel.window_blocks, sel.columns, layout).keep(torch.arange(S))
    assert dense[..., :S].max() <= 1  # no key read twice
    assert torch.equal(dense[..., :S] > 0, expect)
    assert not dense[..., S].any()  # padding is never read


def test_pair_density_and_tile_coverage_count_the_element_mask():
    sel, layout, _ = _random_selection(2, 4, 2, 1000, 64, seed=3)
    cols = sel.columns
    mask = WindowColumns(sel.window_blocks, cols, layout).keep(torch.arange(1000))
    expect = mask.sum(dim=(-1, -2)).double() / (1000 * 1001 / 2)
    assert torch.allclose(pair_density(sel.window_blocks, cols, layout), expect)
    # With a sink and windows past the last block (seed 4), on a length off the block grid.
    gen = torch.Generator().manual_seed(4)
    sunk = SampleLayout.create(777, SampleConfig(block_size=32).replace(sink_blocks=2))
    windows = torch.randint(0, sunk.num_blocks + 5, (1, 3), generator=gen)
    picked = torch.rand(1, 3, 777, generator=gen) < 0.1
    kept = WindowColumns(windows, picked, sunk).keep(torch.arange(777)).sum(dim=(-1, -2)).double()
    assert torch.allclose(pair_density(windows, picked, sunk), kept / (777 * 778 / 2))
    cover = tile_coverage(sel.window_blocks, cols, layout)
    assert cover.shape == (2, 4, 16, 16)
    assert ((cover >= 0) & (cover <= 1)).all() and (cover.diagonal(dim1=-2, dim2=-1) == 1).all()
    assert (cover.triu(diagonal=1) == 0).all()


def test_window_candidates():
    lay = SampleLayout.create(8192, SampleConfig())  # the default floor: 512 tokens
    assert lay.window_candidates() == [4, 8, 16, 32, 64]
    lay = SampleLayout.create(8192, SampleConfig(min_window=128))
    assert lay.window_candidates() == [1, 2, 4, 8, 16, 32, 64]
    lay = SampleLayout.create(1000, SampleConfig(block_size=64, min_window=0))
    assert lay.window_candidates() == [0, 1, 2, 4, 8, 16]
    fixed = SampleLayout.create(
        1000, SampleConfig(block_size=64, min_window=128).replace(window_ratio=0.2)
    )
    assert fixed.window_candidates() == [4]


@pytest.mark.parametrize(
    "S, bs, sink, query_len",
    [(1000, 64, 0, 1000), (1300, 128, 1, 1300), (517, 16, 3, 517), (128, 128, 0, 128),
     (1000, 64, 1, 333)],
)  # fmt: skip
def test_window_pairs_count_the_definition(S, bs, sink, query_len):
    """The closed form per query block against counting, query by query, the keys ``j <= q``
    in q's block's window or in the sink (a chunk's last queries too)."""
    from flexsample.layout import local_pairs

    cfg = SampleConfig(block_size=bs, min_window=bs).replace(sink_blocks=sink)
    layout = SampleLayout.create(S, cfg, query_len=query_len)
    q = torch.arange(S - query_len, S)[:, None]
    j = torch.arange(S)[None, :]
    windows = list(range(layout.num_blocks + 2))
    for w in windows:
        start = ((q // bs) - w).clamp(min=0) * bs
        kept = (j <= q) & ((j >= start) | (j < layout.sink_tokens))
        assert window_pairs(layout, w) == int(kept.sum()), w
    batched = local_pairs(torch.tensor([windows, windows[::-1]]), layout)  # any shape
    expect = [window_pairs(layout, w) for w in windows]
    assert batched.tolist() == [expect, expect[::-1]]


@pytest.mark.parametrize("unit", ["token", "block"])
def test_window_candidates_in_batches_choose_as_one_at_a_time(unit, monkeypatch):
    """Weighing candidates a batch at a time (few launches) or singly (bounded memory) picks
    the same window and columns, ties to the smallest window included."""
    from flexsample import tuning

    q, k, _ = planted_qkv(2, 4, 2, 1300, 32, stripes=(2, 6))
    cfg = SampleConfig(block_size=64, num_segments=3, sample_ratio=0.1).replace(column_unit=unit)
    layout = SampleLayout.create(1300, cfg)
    scores = sample_column_scores_reference(q, k, layout, 32**-0.5)
    single = select_columns(scores, layout, 0.95)  # on CPU: one candidate at a time
    monkeypatch.setitem(tuning.SELECT_BUDGET_BYTES, "cpu", 1 << 28)  # all at once
    batched = select_columns(scores, layout, 0.95)
    assert torch.equal(batched.window_blocks, single.window_blocks)
    assert torch.equal(batched.columns, single.columns)
