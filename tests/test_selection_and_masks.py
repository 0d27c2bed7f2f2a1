"""Stage 2 (CRA selection) and the BlockMask built from it."""

import itertools

import pytest
import torch

from flexsample import (
    SampleConfig,
    SampleLayout,
    block_layout,
    block_mask_from_layout,
    build_block_mask,
    kept_sampled_mass,
    select_blocks,
)


def _random_scores(B, H, G, N, covered=0.3):
    raw = torch.rand(B, H, G, N) ** 4  # skewed, like attention
    raw[..., torch.rand(N) < 0.2] = 0.0  # some blocks get nothing (future, window)
    return raw / raw.sum(-1, keepdim=True).clamp_min(1e-9) * (1 - covered)


@pytest.mark.parametrize("alpha", [0.5, 0.8, 0.95, 0.999, 1.0])
def test_selection_reaches_alpha_for_every_segment(alpha):
    scores = _random_scores(2, 3, 4, 37)
    stripes = select_blocks(scores, alpha)
    assert stripes.shape == (2, 3, 37) and stripes.dtype == torch.bool
    assert (kept_sampled_mass(scores, stripes) >= alpha - 1e-6).all()


def test_selection_is_the_smallest_cover_per_segment():
    """Brute force over all subsets: no smaller block set reaches alpha for a segment."""
    scores = _random_scores(1, 1, 1, 10, covered=0.2)
    alpha = 0.9
    chosen = int(select_blocks(scores, alpha).sum())
    s = scores[0, 0, 0]
    need = alpha - (1 - float(s.sum()))
    for size in range(chosen):
        for subset in itertools.combinations(range(10), size):
            assert float(s[list(subset)].sum()) < need - 1e-7


def test_selection_unions_segments():
    scores = torch.zeros(1, 1, 2, 6)
    scores[0, 0, 0, 1] = 0.5  # segment 0 needs block 1
    scores[0, 0, 1, 4] = 0.5  # segment 1 needs block 4
    assert select_blocks(scores, 0.9)[0, 0].nonzero().flatten().tolist() == [1, 4]


def test_selection_keeps_nothing_when_window_suffices():
    scores = torch.full((1, 1, 1, 8), 0.01)  # window + sink hold 92%
    assert not select_blocks(scores, 0.9).any()


def test_alpha_one_keeps_every_block_with_mass():
    scores = _random_scores(1, 2, 3, 20)
    assert torch.equal(select_blocks(scores, 1.0), (scores > 0).any(dim=-2))


@pytest.mark.parametrize("alpha", [0.0, 1.1, float("nan")])
def test_selection_rejects_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        select_blocks(torch.rand(1, 1, 1, 4), alpha)


def test_selection_rejects_bad_scores():
    with pytest.raises(ValueError, match=r"\(B, H, num_segments, num_blocks\)"):
        select_blocks(torch.rand(4, 4), 0.9)
    with pytest.raises(TypeError, match="floating"):
        select_blocks(torch.ones(1, 1, 1, 4, dtype=torch.int64), 0.9)


def _layout_oracle(stripes, lay):
    """Tile (i, j) kept iff j <= i and (stripe j, or i - j <= window, or sink j); by loops."""
    B, H, n = stripes.shape
    keep = torch.zeros(B, H, n, n, dtype=torch.bool)
    for b, h, i, j in itertools.product(range(B), range(H), range(n), range(n)):
        if j <= i and (stripes[b, h, j] or i - j <= lay.window_blocks or j < lay.sink_blocks):
            keep[b, h, i, j] = True
    return keep


@pytest.mark.parametrize("S, bs", [(1000, 64), (300, 16), (513, 128)])
def test_block_layout_matches_loop_oracle(S, bs):
    lay = SampleLayout.create(S, SampleConfig(block_size=bs, min_window=bs, window_ratio=0.1))
    stripes = torch.rand(2, 3, lay.num_blocks) < 0.3
    assert torch.equal(block_layout(stripes, lay), _layout_oracle(stripes, lay))


@pytest.mark.parametrize("S, bs", [(1000, 64), (300, 16), (513, 128), (256, 128)])
def test_block_mask_matches_layout(S, bs):
    """The BlockMask's dense view is the tile layout; full tiles are exactly the sub-diagonal."""
    lay = SampleLayout.create(S, SampleConfig(block_size=bs, min_window=bs, window_ratio=0.1))
    stripes = torch.rand(2, 3, lay.num_blocks) < 0.3
    keep = block_layout(stripes, lay)
    bm = block_mask_from_layout(keep, S, bs)
    assert bm.shape == (2, 3, S, S)
    n = lay.num_blocks

    def tiles(num, idx):  # unused index slots may repeat, so count rather than overwrite
        valid = (torch.arange(idx.shape[-1]) < num[..., None]).int()
        return torch.zeros(2, 3, n, n, dtype=torch.int32).scatter_add_(-1, idx.long(), valid) > 0

    partial = tiles(bm.kv_num_blocks, bm.kv_indices)
    full = tiles(bm.full_kv_num_blocks, bm.full_kv_indices)
    assert torch.equal(partial | full, keep)
    assert torch.equal(full, keep & ~torch.eye(n, dtype=torch.bool))
    assert (bm.kv_num_blocks == 1).all()  # only the diagonal tile needs the causal mask_mod


def test_build_block_mask_rejects_wrong_stripes():
    with pytest.raises(ValueError, match=r"stripes must be \(B, H, 8\)"):
        build_block_mask(torch.zeros(1, 1, 5, dtype=torch.bool), 1000, SampleConfig())


def test_block_mask_from_layout_rejects_bad_layouts():
    with pytest.raises(ValueError, match=r"bool \(B, H, 8, 8\) tile layout"):
        block_mask_from_layout(torch.ones(1, 1, 7, 7, dtype=torch.bool), 1000, 128)
    with pytest.raises(ValueError, match="bool"):
        block_mask_from_layout(torch.ones(1, 1, 8, 8), 1000, 128)
    with pytest.raises(ValueError, match="diagonal"):
        block_mask_from_layout(torch.zeros(1, 1, 8, 8, dtype=torch.bool), 1000, 128)
