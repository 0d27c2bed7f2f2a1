"""Dense oracle for stage 1: materialises the full attention matrix in float64.

Small inputs only (``B * Hq * S * S`` doubles). Obviously correct by construction; the torch
and Triton samplers are tested against it.
"""

from __future__ import annotations

import torch

from ..layout import SampleLayout


def sample_column_scores_reference(
    q: torch.Tensor, k: torch.Tensor, layout: SampleLayout, scale: float
) -> torch.Tensor:
    """Per-segment sampled attention mass of each key, the slow way.

    Args:
        q: ``(B, Hq, S, D)`` queries.
        k: ``(B, Hkv, S, D)`` keys, ``Hq % Hkv == 0``.
        layout: geometry of the prefill (``layout.seq_len == S``).
        scale: softmax scale applied to ``q @ k^T``.

    Returns:
        ``(B, Hq, num_segments, S)`` float32: for each segment, the mean over its sampled
        rows of the causal softmax probability of each key (zero after the row).
    """
    _, Hq, S, _ = q.shape
    kk = k.double().repeat_interleave(Hq // k.shape[1], dim=1)
    logits = (q.double() @ kk.transpose(-1, -2)) * scale
    causal = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    probs = logits.masked_fill(~causal, float("-inf")).softmax(dim=-1)
    rows = layout.sampled_rows(q.device)  # (G, r)
    return probs[:, :, rows].mean(dim=3).float()
