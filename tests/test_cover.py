"""Stage 2b, the per-row guarantee: every sampled row keeps alpha of its own exact mass."""

import itertools

import pytest
import torch

from flexsample import SampleConfig, SampleLayout, WindowColumns, select_columns
from flexsample.cover import cover_row_chunk, cover_rows
from flexsample.plan import plan_prefill
from flexsample.sampling import (
    sample_column_scores_reference,
    sample_column_scores_torch,
    sampled_row_probabilities,
    triton_available,
)
from flexsample.synthetic import planted_qkv
from flexsample.tuning import KEY_FLOOR_DIVISOR

# (B, Hq, Hkv, S, D, block_size, segments, sample_ratio): lengths off the block grid, GQA,
# batch > 1.
SHAPES = [
    pytest.param(2, 4, 2, 1000, 32, 64, 3, 0.1, id="B2-H4/2-S1000-bs64"),
    pytest.param(1, 6, 2, 777, 24, 32, 5, 0.08, id="B1-H6/2-S777-bs32"),
    pytest.param(1, 3, 3, 1300, 16, 128, 4, 0.05, id="B1-H3/3-S1300-bs128"),
]
#: The row kernels also on Gemma 3's global layers: 4 query heads on one kv head, D=256 (the
#: wide-head key tile). (No row is short there: the repair tests above need SHAPES.)
KERNEL_SHAPES = [
    *SHAPES,
    pytest.param(1, 4, 1, 900, 256, 128, 3, 0.1, id="B1-H4/1-S900-D256-bs128"),
]


def _case(B, Hq, Hkv, S, D, bs, segments, ratio, dtype, **config):
    q, k, _ = planted_qkv(B, Hq, Hkv, S, D, stripes=(2, 6), dtype=dtype)
    # Rows whose heavy keys differ from their segment's: random extra logits per row make
    # the segment mean a poor cover for some rows.
    q = (q.float() + 0.6 * torch.randn_like(q.float())).to(dtype)
    cfg = SampleConfig(block_size=bs, num_segments=segments, sample_ratio=ratio).replace(**config)
    return q, k, SampleLayout.create(S, cfg), cfg


def _row_starts(pattern, layout):
    """Each sampled row's window start, ``(B, Hq, G, r)``, as the row kernels take it."""
    starts, _ = pattern.row_tables(layout.sampled_rows().flatten())
    return starts.view(*starts.shape[:2], layout.num_segments, layout.rows_per_segment)


def _probs_and_keep(q, k, layout, window_blocks, columns):
    """float64 probabilities of the sampled rows and the mask's keys, each (B, Hq, G*r, S)."""
    p = sampled_row_probabilities(q, k, layout, q.shape[-1] ** -0.5)
    rows = layout.sampled_rows().flatten()
    return p, WindowColumns(window_blocks, columns, layout).keep(rows)


def _exact_row_mass(q, k, layout, window_blocks, columns):
    """float64: each sampled row's kept share of its causal attention mass, (B, Hq, G*r)."""
    p, keep = _probs_and_keep(q, k, layout, window_blocks, columns)
    return (p * keep).sum(dim=-1)


def _heaviest_missing(q, k, layout, window_blocks, columns):
    """float64: each sampled row's heaviest probability outside its mask, (B, Hq, G*r)."""
    p, keep = _probs_and_keep(q, k, layout, window_blocks, columns)
    return p.masked_fill(keep, 0).amax(dim=-1)


@pytest.mark.parametrize("B, Hq, Hkv, S, D, bs, segments, ratio", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("sampler", ["reference", "torch"])
@pytest.mark.parametrize("unit", ["token", "block"])
def test_every_sampled_row_keeps_alpha(B, Hq, Hkv, S, D, bs, segments, ratio, dtype, sampler, unit):
    q, k, layout, cfg = _case(B, Hq, Hkv, S, D, bs, segments, ratio, dtype, column_unit=unit)
    alpha = cfg.alpha
    scores = sample_column_scores_reference(q, k, layout, D**-0.5)
    segment_cover = select_columns(scores, layout, alpha)
    before = _exact_row_mass(q, k, layout, segment_cover.window_blocks, segment_cover.columns)
    assert float(before.min()) < alpha  # the case needs the repair

    cover = cover_rows(q, k, segment_cover, alpha, D**-0.5, sampler, max_chunk_elems=5 * S)
    sel = cover.selection
    after = _exact_row_mass(q, k, layout, sel.window_blocks, sel.columns)
    tol = 1e-6 if sampler == "reference" else 1e-4
    # Short rows are left only where no missing key reaches the floor.
    still_short = after < alpha - tol
    heaviest_missing = _heaviest_missing(q, k, layout, sel.window_blocks, sel.columns)
    floor = (1 - alpha) / KEY_FLOOR_DIVISOR
    assert bool((heaviest_missing[still_short] <= floor + tol).all())
    # The repair only adds: the segments' columns stay, the windows do not move.
    assert bool((sel.columns >= segment_cover.columns).all())
    assert torch.equal(sel.window_blocks, segment_cover.window_blocks)
    # The reported row mass is a lower bound of the final one, and exact where not repaired.
    reported = cover.row_mass.flatten(2)
    assert bool((reported <= after + tol).all())
    untouched = (before >= alpha).float()
    assert float(((reported - before).abs() * untouched).max()) < tol
    floor = (1 - alpha) / KEY_FLOOR_DIVISOR
    heavy_before = _heaviest_missing(
        q, k, layout, segment_cover.window_blocks, segment_cover.columns
    )
    expected = (before < alpha) & (heavy_before > floor)
    assert abs(int(cover.repaired.sum()) - int(expected.sum())) <= 1  # fp32 vs float64 edges


@pytest.mark.triton
@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("B, Hq, Hkv, S, D, bs, segments, ratio", KERNEL_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_row_kernel_matches_exact_kept_mass(
    B, Hq, Hkv, S, D, bs, segments, ratio, dtype, device
):
    from flexsample.sampling.triton_kernel import (
        row_kept_mass_sparse_triton,
        row_kept_mass_triton,
        sample_scores_and_lse_triton,
    )

    q, k, layout, cfg = _case(B, Hq, Hkv, S, D, bs, segments, ratio, dtype, sink_blocks=1)
    scores = sample_column_scores_torch(q, k, layout, D**-0.5)
    sel = select_columns(scores, layout, cfg.alpha)
    cols = sel.columns
    expect = _exact_row_mass(q, k, layout, sel.window_blocks, cols)
    q, k = q.to(device), k.to(device)
    starts, cols_d = _row_starts(sel, layout).to(device), cols.to(device)
    heaviest = _heaviest_missing(q.cpu(), k.cpu(), layout, sel.window_blocks, cols)
    # Its own log-sum-exp pass, and the one the sampler computed on the way (the plan's path).
    _, lse = sample_scores_and_lse_triton(q, k, layout, D**-0.5)
    for given in (None, lse):
        got, missing = row_kept_mass_triton(q, k, layout, D**-0.5, starts, cols_d, lse=given)
        assert got.shape == (B, Hq, layout.num_segments, layout.rows_per_segment)
        assert float((got.cpu().flatten(2) - expect).abs().max()) < 1e-4
        assert float((missing.cpu().flatten(2) - heaviest).abs().max()) < 1e-4
        # The kernel over the kept keys alone (sink, window, the group's columns).
        kept = row_kept_mass_sparse_triton(q, k, layout, D**-0.5, starts, cols_d, lse=given)
        assert float((kept.cpu().flatten(2) - expect).abs().max()) < 1e-4


@pytest.mark.triton
@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("sink_blocks", [0, 2])
def test_triton_row_kernel_on_random_windows_and_columns(sink_blocks, device):
    """Windows from none to past the first key (a negative start), columns anywhere: the
    kernel that skips the window's and the sink's keys against float64."""
    from flexsample.sampling.triton_kernel import row_kept_mass_sparse_triton, row_kept_mass_triton

    q, k, layout, _ = _case(2, 6, 2, 777, 32, 32, 4, 0.1, torch.float32, sink_blocks=sink_blocks)
    windows = torch.randint(0, layout.num_blocks + 2, (2, 6))
    columns = torch.rand(2, 6, 777) < 0.15
    columns[1, 3:] = False  # a kv group without columns: its list is all padding
    expect = _exact_row_mass(q, k, layout, windows, columns)
    heaviest = _heaviest_missing(q, k, layout, windows, columns)
    starts = _row_starts(WindowColumns(windows, columns, layout), layout)
    args = (q.to(device), k.to(device), layout, 32**-0.5, starts.to(device), columns.to(device))
    got, missing = row_kept_mass_triton(*args)
    assert float((got.cpu().flatten(2) - expect).abs().max()) < 1e-4
    assert float((missing.cpu().flatten(2) - heaviest).abs().max()) < 1e-4
    kept = row_kept_mass_sparse_triton(*args)
    assert float((kept.cpu().flatten(2) - expect).abs().max()) < 1e-4
    # Only some rows (the cover's short ones): those measured alike, the others not at all.
    only = torch.rand(got.shape, generator=torch.Generator().manual_seed(1)) < 0.1
    only[0] = False  # a batch row with none: every one of its programs skips the keys
    some, some_missing = row_kept_mass_triton(*args, only=only.to(device))
    some, some_missing = some.cpu(), some_missing.cpu()
    assert torch.equal(some[only], got.cpu()[only])
    assert torch.equal(some_missing[only], missing.cpu()[only])
    assert bool(some[~only].isnan().all()) and not bool(some_missing[~only].any())
    with pytest.raises(ValueError, match="only must have shape"):
        row_kept_mass_triton(*args, only=only[:1].to(device))


@pytest.mark.triton
@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_triton_cover_repairs_like_torch(device):
    """With the Triton measurement, the short rows (and only those) go to the torch repair."""
    q, k, layout, cfg = _case(2, 4, 2, 1000, 32, 64, 3, 0.1, torch.float32)
    scores = sample_column_scores_torch(q, k, layout, 32**-0.5)
    sel = select_columns(scores, layout, cfg.alpha)
    ref = cover_rows(q, k, sel, cfg.alpha, 32**-0.5, "torch")
    moved = type(sel)(sel.window_blocks.to(device), sel.columns.to(device), layout)
    got = cover_rows(q.to(device), k.to(device), moved, cfg.alpha, 32**-0.5, "triton")
    assert torch.equal(got.repaired.cpu(), ref.repaired)
    assert torch.equal(got.selection.columns.cpu(), ref.selection.columns)
    assert float((got.row_mass.cpu() - ref.row_mass).abs().max()) < 1e-4


@pytest.mark.triton
@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_triton_cover_skips_the_full_pass_where_no_row_is_short(device, monkeypatch):
    """Rows that all keep alpha over the kept keys alone need no pass over the missed ones;
    a short row brings it back (and the torch cover agrees either way)."""
    from flexsample.sampling import triton_kernel

    calls = []
    full = triton_kernel.row_kept_mass_triton

    def spy(*args, **kwargs):
        calls.append(1)
        return full(*args, **kwargs)

    monkeypatch.setattr(triton_kernel, "row_kept_mass_triton", spy)
    q, k, layout, cfg = _case(1, 4, 2, 1000, 32, 64, 3, 0.1, torch.float32)
    scores = sample_column_scores_torch(q, k, layout, 32**-0.5)
    sel = select_columns(scores, layout, cfg.alpha)
    moved = type(sel)(sel.window_blocks.to(device), sel.columns.to(device), layout)
    for alpha, passes in ((0.05, 0), (0.999999, 1)):
        calls.clear()
        got = cover_rows(q.to(device), k.to(device), moved, alpha, 32**-0.5, "triton")
        ref = cover_rows(q, k, sel, alpha, 32**-0.5, "torch")
        assert len(calls) == passes
        assert torch.equal(got.selection.columns.cpu(), ref.selection.columns)
        assert float((got.row_mass.cpu() - ref.row_mass).abs().max()) < 1e-4


@pytest.mark.parametrize("alpha", [0.5, 0.9, 0.95, 1.0])
def test_cover_row_chunk_adds_the_fewest_keys(alpha):
    """Brute force on tiny rows: the repair adds a smallest set of keys above the floor that
    reaches alpha, or every such key when they cannot."""
    W = 9
    p = torch.rand(6, W).pow(3)  # some rows reach alpha with few keys, some need many
    p = p / p.sum(dim=-1, keepdim=True)
    keep = torch.rand(6, W) < 0.3
    kept = (p * keep).sum(dim=-1)
    gained, add = cover_row_chunk(p, keep, kept, alpha)
    for row in range(6):
        base = float(kept[row])
        assert not bool((add[row] & keep[row]).any())
        assert abs(float(gained[row]) - float((p[row] * add[row]).sum())) < 1e-6
        floor = (1 - alpha) / KEY_FLOOR_DIVISOR
        free = [j for j in range(W) if not keep[row, j] and float(p[row, j]) > floor]
        if base + float(p[row, free].sum()) < alpha - 1e-6:  # cannot reach: takes them all
            assert sorted(add[row].nonzero().flatten().tolist()) == free
            continue
        assert base + float(gained[row]) >= alpha - 1e-6
        fewest = min(
            n
            for n in range(len(free) + 1)
            for subset in itertools.combinations(free, n)
            if base + float(p[row, list(subset)].sum()) >= alpha - 1e-6
        )
        assert int(add[row].sum()) == fewest


@pytest.mark.parametrize("alpha", [0.9, 0.99])
def test_cover_row_chunk_searches_more_keys_only_for_the_rows_that_need_them(alpha):
    """Rows needing a few keys, more than 64, and more than 256 in one chunk: the same keys
    as one full sort of every row (seed 0)."""
    g = torch.Generator().manual_seed(0)
    W = 1500
    sharp = torch.rand(4, W, generator=g).pow(40)  # a few heavy keys
    flat = torch.rand(4, W, generator=g) * 1e-3
    flat[:, :400] += torch.rand(4, 400, generator=g) + 0.5  # hundreds of keys to reach alpha
    p = torch.cat([sharp, flat, sharp.pow(0.1)])
    p = p / p.sum(dim=-1, keepdim=True)
    keep = torch.rand(p.shape, generator=g) < 0.2
    kept = (p * keep).sum(dim=-1)
    gained, add = cover_row_chunk(p, keep, kept, alpha)
    missing = p.masked_fill(keep, 0)
    top, index = missing.sort(dim=-1, descending=True)
    need = alpha - kept
    take = (top.cumsum(dim=-1) - top < need[:, None]) & (top > (1 - alpha) / KEY_FLOOR_DIVISOR)
    expected = torch.zeros_like(keep).scatter_(-1, index, take)
    assert int(add.sum(dim=-1).max()) > 256  # the case reaches the full sort
    assert torch.equal(add, expected)
    assert torch.allclose(gained, (p * expected).sum(dim=-1), atol=1e-6)


def test_plan_reports_row_mass_and_cover_can_be_turned_off():
    q, k, _, cfg = _case(
        1, 4, 2, 1000, 32, 64, 3, 0.1, torch.float32, min_seq_len=0, max_density=1.0
    )
    plan = plan_prefill(q, k, cfg)
    assert plan.row_mass is not None
    assert plan.row_mass.shape == (1, 4, 3, plan.layout.rows_per_segment)
    assert float(plan.row_mass.quantile(0.05)) >= cfg.alpha - 1e-4
    plain = plan_prefill(q, k, cfg.replace(row_guarantee=False))
    assert plain.row_mass is None
    # The cover only adds columns to what the segments chose.
    assert bool((plan.pattern.columns >= plain.pattern.columns).all())


def test_row_guarantee_must_be_a_bool():
    with pytest.raises(TypeError, match="row_guarantee"):
        SampleConfig().replace(row_guarantee=1)
