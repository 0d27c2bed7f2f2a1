"""The probe (stage 0): the per-row oracle on a few rows, fast path against its twins."""

import pytest
import torch

import flexsample as fs
from flexsample.layout import SampleLayout
from flexsample.probe import estimate_from_needs, fewest_keys, probe_density, probe_rows
from flexsample.sampling import triton_available
from flexsample.synthetic import planted_qkv


def brute_fewest(row: list[float], alpha: float) -> int:
    """Heaviest keys first, until they hold alpha: the definition, one row at a time."""
    held, count = 0.0, 0
    for p in sorted(row, reverse=True):
        if held >= alpha or p <= 0:
            break
        held, count = held + p, count + 1
    return max(count, 1)


@pytest.mark.parametrize("numpy_sort", [True, False], ids=["numpy", "torch"])
@pytest.mark.parametrize("alpha", [0.5, 0.9, 0.95, 0.99])
def test_fewest_keys_is_the_definition(numpy_sort, alpha):
    # Peaked rows of an awkward width, some with a zero tail (keys after a causal row).
    p = torch.rand(7, 301, dtype=torch.float64) ** 6
    p[2:, 250:] = 0
    p[4, 1:] = 0  # one key holds everything
    p = p / p.sum(dim=-1, keepdim=True)
    got = fewest_keys(p, alpha, numpy_sort=numpy_sort)
    assert got.tolist() == [brute_fewest(row, alpha) for row in p.tolist()]
    assert got[4] == 1


def test_probe_rows_are_the_last_sampled_rows_of_each_segment():
    layout = SampleLayout.create(1000, fs.SampleConfig(), query_len=777)
    rows = probe_rows(layout)
    sampled = layout.sampled_rows()
    assert rows.tolist() == sampled[:, -1:].flatten().tolist()
    assert int(rows.min()) >= layout.query_start and int(rows.max()) == 999


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "B, Hq, Hkv, S, L, D",
    [(1, 4, 2, 777, 777, 32), (2, 6, 2, 1000, 1000, 64), (2, 4, 4, 1300, 517, 32)],
    ids=["gqa-777", "b2-1000", "chunk-517-of-1300"],
)
def test_fast_probe_matches_its_float64_twin(B, Hq, Hkv, S, L, D, dtype):
    q, k, _ = planted_qkv(B, Hq, Hkv, S, D, stripes=(3, 9), stripe_width=1, dtype=dtype)
    q = q[:, :, S - L :]
    layout = SampleLayout.create(S, fs.SampleConfig(), query_len=L)
    exact = probe_density(q, k, layout, 0.95, D**-0.5, reference=True)
    assert exact.shape == (B, Hq) and bool((exact > 0).all()) and bool((exact <= 1).all())
    rows = probe_rows(layout).numel()
    lengths = float((probe_rows(layout) + 1).sum())
    # Whole kv heads a step (one kv head, or all of them), and a bound of a few rows that
    # splits every kv head's rows over several steps.
    for bound in (Hq // Hkv * rows * S, 10**9, 3 * S):
        fast = probe_density(q, k, layout, 0.95, D**-0.5, max_chunk_elems=bound)
        # float32 probabilities may order two near-equal keys differently: a key or so a row.
        assert (fast - exact).abs().max() <= 2 * rows / lengths, bound


# (B, Hq, Hkv, S, L, D, input, dtype): GQA, batch 2, a chunk (L < S), off the block grid;
# planted single-token stripes and random q/k (diffuse rows: many keys in one bin).
TRITON_PROBE_CASES = [
    pytest.param(1, 4, 2, 777, 777, 32, "stripes", torch.float32, id="gqa-777-stripes-fp32"),
    pytest.param(2, 6, 2, 600, 600, 64, "random", torch.bfloat16, id="b2-600-random-bf16"),
    pytest.param(1, 4, 4, 1000, 517, 32, "stripes", torch.bfloat16, id="chunk-517-of-1000-bf16"),
]


@pytest.mark.triton
@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("B, Hq, Hkv, S, L, D, inputs, dtype", TRITON_PROBE_CASES)
@pytest.mark.parametrize("alpha", [0.5, 0.95])
def test_triton_probe_matches_the_sorted_count(B, Hq, Hkv, S, L, D, inputs, dtype, alpha, device):
    from flexsample.sampling.triton_probe import probe_needs_triton

    torch.manual_seed(11)
    q, k, _ = planted_qkv(B, Hq, Hkv, S, D, stripes=(3, 9), stripe_width=1, dtype=dtype)
    if inputs == "random":
        q, k = torch.randn_like(q), torch.randn_like(k)
    q = q[:, :, S - L :]
    layout = SampleLayout.create(
        S, fs.SampleConfig(block_size=64).replace(sink_blocks=1), query_len=L
    )
    pos = probe_rows(layout)
    counts, reach = probe_needs_triton(
        q.to(device), k.to(device), layout, pos.to(device), alpha, D**-0.5
    )
    # The definition in float64: every probed row's probabilities, sorted.
    group = Hq // Hkv
    probed = probe_rows(layout) - layout.query_start
    logits = q.double()[:, ::group, probed] @ k.double().transpose(-1, -2) * D**-0.5
    p = logits.masked_fill(torch.arange(S) > pos[:, None], float("-inf")).softmax(dim=-1)
    exact = fewest_keys(p, alpha).view(B * Hkv, -1)
    # Exact up to the keys of the bin where the mass reaches alpha (interpolated by mass).
    assert bool(((counts.cpu() - exact).abs() <= 1 + 0.02 * exact).all())
    # Reach: where some row needs a key, how far its block lies after the key's block.
    lightest = p.sort(dim=-1, descending=True).values.gather(-1, exact.view(B, Hkv, -1, 1) - 1)
    needed = (p >= lightest) & (torch.arange(S) >= layout.sink_tokens)
    blocks = (pos // 64)[:, None] - torch.arange(S) // 64
    expect = torch.where(needed, blocks, -1).amax(dim=2).view(B * Hkv, S)
    assert float((reach.cpu() != expect).float().mean()) < 0.01


@pytest.mark.triton
@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_triton_probe_estimate_matches_its_float64_twin(device):
    # The plan's probe on the Triton sampler, alpha 1 included (every nonzero key).
    from flexsample.sampling.triton_probe import probe_needs_triton

    B, Hq, Hkv, S, D = 2, 4, 2, 700, 32
    q, k, _ = planted_qkv(B, Hq, Hkv, S, D, stripes=(3, 9), stripe_width=1)
    layout = SampleLayout.create(S, fs.SampleConfig())
    q, k = q.to(device), k.to(device)
    rows = probe_rows(layout, device)
    lengths = float((probe_rows(layout) + 1).sum())
    for alpha in (0.95, 1.0):
        exact = probe_density(q.cpu(), k.cpu(), layout, alpha, D**-0.5, reference=True)
        got = probe_density(q, k, layout, alpha, D**-0.5, triton=True)
        assert float((got.cpu() - exact).abs().max()) < 0.01, alpha
        # The fused estimate (column pairs summed in the kernels) is the torch one's on the
        # same counts and reach.
        counts, reach = probe_needs_triton(q, k, layout, rows, alpha, D**-0.5)
        unfused = estimate_from_needs(counts, reach, layout, lengths)
        assert torch.allclose(got[:, ::2].flatten().cpu(), unfused.cpu(), rtol=1e-6), alpha
    q, k = q.cpu(), k.cpu()
    # Past the rows one program holds, the torch probe runs.
    many = SampleLayout.create(S, fs.SampleConfig(num_segments=100, sample_ratio=0.2))
    exact = probe_density(q, k, many, 0.95, D**-0.5, reference=True)
    got = probe_density(q, k, many, 0.95, D**-0.5, triton=True)
    assert float((got - exact).abs().max()) < 0.01


def test_every_covered_row_keeps_at_least_the_probes_count():
    # The probe's claim: a mask that keeps alpha of a probed row's mass keeps at least
    # fewest_keys of its keys. The plan's row cover makes every sampled row keep alpha.
    S, D = 1000, 32
    q, k, _ = planted_qkv(1, 4, 2, S, D, stripes=(4, 12), stripe_width=1, signal=4.0)
    config = fs.SampleConfig.always_sparse()
    plan = fs.plan_prefill(q, k, config)
    layout = plan.layout
    pos = probe_rows(layout)
    kk = k.double().repeat_interleave(2, dim=1)
    logits = (q.double()[:, :, pos] @ kk.transpose(-1, -2)) * D**-0.5
    causal = torch.arange(S) <= pos[:, None]
    p = logits.masked_fill(~causal, float("-inf")).softmax(dim=-1)
    needed = fewest_keys(p, config.alpha)  # (1, Hq, R)
    keep = plan.pattern.keep(pos)  # (1, Hq, R, S)
    kept_mass = (p * keep).sum(dim=-1)
    kept_keys = keep.sum(dim=-1)
    covered = kept_mass >= config.alpha
    assert bool(covered.any())
    assert bool((kept_keys[covered] >= needed[covered]).all())


def test_probe_estimate_tracks_the_selection_and_sees_diffuse_inputs():
    """On stripes the estimate is within 2x of the density the selection reaches; on random q/k
    (every row needs different keys) it is about 1 (0.99 from one head of each kv group),
    where the per-row oracle's share alone says about 0.75 (the probe's first version let
    such calls plan, and run dense after it)."""
    S, D = 2048, 32
    # A 128-token floor: at 2K the default 512 is a quarter of the keys, in every estimate.
    config = fs.SampleConfig.always_sparse(min_window=128)
    layout = SampleLayout.create(S, config)
    q, k, _ = planted_qkv(1, 4, 2, S, D, stripes=(4, 12), stripe_width=1)
    estimate = probe_density(q, k, layout, 0.95, D**-0.5)
    selected = fs.plan_prefill(q, k, config).density
    assert bool((estimate <= 2 * selected).all()) and float(estimate.max()) < 0.4
    q, k = torch.randn(1, 4, S, D), torch.randn(1, 2, S, D)
    diffuse = probe_density(q, k, layout, 0.95, D**-0.5)
    assert float(diffuse.min()) > 0.95
    assert diffuse[0, 0] == diffuse[0, 1] and diffuse[0, 2] == diffuse[0, 3]  # one per group
    pos = probe_rows(layout)
    kk = k.double().repeat_interleave(2, dim=1)
    logits = (q.double()[:, :, pos] @ kk.transpose(-1, -2)) * D**-0.5
    p = logits.masked_fill(torch.arange(S) > pos[:, None], float("-inf")).softmax(dim=-1)
    per_row = fewest_keys(p, 0.95).sum(dim=-1) / float((pos + 1).sum())
    assert float(per_row.max()) < 0.9
