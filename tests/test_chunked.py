"""Chunked prefill: queries that are the last L of S positions (earlier context in k and v).

Every stage is held to a computation that never subtracts an offset: the whole prompt's
queries, indexed at the chunk's absolute positions.
"""

import pytest
import torch
import torch.nn.functional as F

import flexsample as fs
from flexsample.attention import sparse_attention_reference
from flexsample.layout import SampleLayout
from flexsample.patterns import WindowColumns
from flexsample.patterns.window_columns import pair_density
from flexsample.sampling import run_sampler
from flexsample.synthetic import planted_qkv
from flexsample.testing import rel_rmse

# (B, Hq, Hkv, S, L): chunks that start inside a block, on a block edge, and a one-row chunk.
CASES = [(1, 4, 2, 1000, 667), (2, 2, 2, 777, 265), (1, 4, 1, 1100, 1), (2, 4, 2, 900, 900)]
IDS = ["B1-S1000-L667", "B2-S777-L265", "B1-S1100-L1", "B2-S900-whole"]
CFG = fs.SampleConfig.always_sparse(block_size=64, min_window=64)


def _sampled_probabilities(q_full, k, layout, scale):
    """float64 probabilities of the sampled rows, read from the whole prompt's queries."""
    rows = layout.sampled_rows().flatten()
    kk = k.double().repeat_interleave(q_full.shape[1] // k.shape[1], dim=1)
    logits = (q_full.double()[:, :, rows] @ kk.transpose(-1, -2)) * scale
    causal = torch.arange(k.shape[2]) <= rows[:, None]
    return logits.masked_fill(~causal, float("-inf")).softmax(dim=-1)


def test_layout_splits_only_the_chunks_queries():
    layout = SampleLayout.create(1000, CFG, query_len=667)
    assert layout.query_start == 333 and layout.first_query_block == 5
    ends = layout.segment_ends()
    assert ends[-1] == 1000 and min(layout.sampled_rows().flatten().tolist()) >= 333
    assert layout.causal_pairs == sum(q + 1 for q in range(333, 1000))
    with pytest.raises(ValueError, match="query_len must lie in"):
        SampleLayout.create(100, CFG, query_len=101)


@pytest.mark.parametrize("sampler", ["reference", "torch", "triton"])
@pytest.mark.parametrize("B, Hq, Hkv, S, L", CASES, ids=IDS)
def test_samplers_read_the_chunks_rows(sampler, B, Hq, Hkv, S, L):
    q_full, k, _ = planted_qkv(B, Hq, Hkv, S, 32, stripes=3, seed=11)
    layout = SampleLayout.create(S, CFG, query_len=L)
    scale = 32**-0.5
    scores = run_sampler(sampler, q_full[:, :, S - L :].contiguous(), k, layout, scale)
    probs = _sampled_probabilities(q_full, k, layout, scale)
    G, r = layout.num_segments, layout.rows_per_segment
    expected = probs.view(B, Hq, G, r, S).mean(dim=3).float()
    torch.testing.assert_close(scores, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B, Hq, Hkv, S, L", CASES, ids=IDS)
def test_sparse_chunk_equals_its_reference(B, Hq, Hkv, S, L, dtype):
    q_full, k, v = planted_qkv(B, Hq, Hkv, S, 32, stripes=3, seed=12, dtype=dtype)
    q = q_full[:, :, S - L :]
    plan = fs.plan_prefill(q, k, CFG)
    assert plan.path == "sparse" and plan.query_len == L and plan.seq_len == S
    out = fs.run_plan(plan, q, k, v)
    assert out.shape == q.shape and out.dtype == dtype
    ref = sparse_attention_reference(q, k, v, plan.pattern, plan.scale)
    # The same mask read off the whole prompt: rows S - L .. S - 1 of the full computation.
    whole = SampleLayout.create(S, CFG)
    as_whole = WindowColumns(plan.pattern.window_blocks, plan.pattern.columns, whole)
    full = sparse_attention_reference(q_full, k, v, as_whole, plan.scale)
    assert torch.equal(ref, full[:, :, S - L :])
    assert rel_rmse(out, ref) < (2e-6 if dtype == torch.float32 else 1e-2)
    # Density counts the chunk's own causal pairs.
    rows = torch.arange(S - L, S)
    kept = as_whole.keep(rows).sum(dim=(-1, -2)).double()
    causal = (rows + 1).sum().double()
    torch.testing.assert_close(plan.density, kept / causal)
    density = pair_density(plan.pattern.window_blocks, plan.pattern.columns, plan.layout)
    torch.testing.assert_close(density, kept / causal)


@pytest.mark.parametrize("B, Hq, Hkv, S, L", CASES[:2], ids=IDS[:2])
def test_every_sampled_row_of_a_chunk_keeps_alpha(B, Hq, Hkv, S, L):
    q_full, k, _ = planted_qkv(B, Hq, Hkv, S, 32, stripes=3, seed=13)
    cfg = CFG.replace(sampler="reference")
    plan = fs.plan_prefill(q_full[:, :, S - L :], k, cfg)
    layout = plan.layout
    probs = _sampled_probabilities(q_full, k, layout, plan.scale)
    rows = layout.sampled_rows().flatten()
    keep = plan.pattern.keep(rows)
    kept = (probs * keep).sum(dim=-1)
    # Each row keeps alpha, or misses only keys under the cover's floor.
    floor = fs.cover.key_floor(cfg.alpha)
    short = kept < cfg.alpha - 1e-9
    assert bool(((probs * ~keep).amax(dim=-1) <= floor)[short].all())
    # The reported mass is a lower bound (keys added for later rows also serve earlier ones).
    assert bool((plan.row_mass.flatten(2).double() <= kept + 1e-6).all())
    assert bool(((plan.row_mass.flatten(2).double() >= cfg.alpha - 1e-6) | short).all())


@pytest.mark.parametrize("B, Hq, Hkv, S, L", CASES, ids=IDS)
def test_dense_and_alpha_one_chunks_equal_the_whole_prompts_rows(B, Hq, Hkv, S, L):
    q_full, k, v = planted_qkv(B, Hq, Hkv, S, 32, stripes=3, seed=14)
    q = q_full[:, :, S - L :]
    whole = F.scaled_dot_product_attention(q_full, k, v, is_causal=True, enable_gqa=Hq != Hkv)
    dense = fs.flex_sample_attention(q, k, v, config=fs.SampleConfig(min_seq_len=10**9))
    torch.testing.assert_close(dense, whole[:, :, S - L :], atol=1e-5, rtol=1e-5)
    exact = fs.flex_sample_attention(q, k, v, config=fs.SampleConfig.dense_equivalent())
    torch.testing.assert_close(exact, whole[:, :, S - L :], atol=1e-5, rtol=1e-5)


def test_queries_longer_than_keys_are_refused():
    q, k, v = (torch.randn(1, 2, n, 16) for n in (300, 200, 200))
    with pytest.raises(ValueError, match="q must not be longer than k"):
        fs.flex_sample_attention(q, k, v)
