"""The gathered path's building blocks: attention with its log-sum-exp on the fused CPU
kernel against its matrix-product twin, and merging parts over disjoint keys."""

import math

import pytest
import torch

from flexsample.products import attend_with_lse, attend_with_lse_reference, merge


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_fused_kernel_matches_its_twin_on_views_and_masks(causal):
    q = torch.randn(3, 1, 100, 64)
    keys = torch.randn(600, 64)
    # Overlapping windows of one key tensor (a strided view, as the gathered path reads them).
    k = keys.as_strided((3, 1, 100, 64), (150 * 64, 150 * 64, 64, 1))
    v = (keys * 2).as_strided((3, 1, 100, 64), (150 * 64, 150 * 64, 64, 1))
    mask = None if causal else torch.where(torch.rand(100, 100) < 0.3, -math.inf, 0.0)
    mask = None if mask is None else mask.masked_fill_(torch.eye(100, dtype=torch.bool), 0.0)
    out, lse = attend_with_lse(q, k, v, 0.125, causal=causal, mask=mask)
    ref_out, ref_lse = attend_with_lse_reference(q, k, v, 0.125, causal=causal, mask=mask)
    assert float((out - ref_out).abs().max()) < 1e-4
    assert float((lse - ref_lse).abs().max()) < 1e-4


def test_merge_of_disjoint_parts_is_attention_over_their_union():
    q, k, v = torch.randn(50, 32), torch.randn(90, 32), torch.randn(90, 32)
    whole, _ = attend_with_lse_reference(q, k, v, 0.2)
    parts = [attend_with_lse_reference(q, k[s], v[s], 0.2) for s in (slice(0, 30), slice(30, 90))]
    assert float((merge(parts) - whole).abs().max()) < 1e-5
    # A part some rows read nothing of (lse -inf) leaves those rows to the others.
    o, lse = attend_with_lse_reference(q, k[:30], v[:30], 0.2)
    empty = torch.full_like(lse, -math.inf)
    assert float((merge([(o, lse), (torch.zeros_like(o), empty)]) - o).abs().max()) < 1e-6
