"""Dense oracle for stage 1 and the row cover: the sampled rows' attention in float64.

Small inputs only (``B * Hq * sampled rows * S`` doubles). Obviously correct by
construction; the torch and Triton samplers and row measurements are tested against it.
"""

from __future__ import annotations

import torch

from ..layout import SampleLayout


def sampled_row_probabilities(
    q: torch.Tensor, k: torch.Tensor, layout: SampleLayout, scale: float
) -> torch.Tensor:
    """Exact causal softmax of every sampled row, in float64: the oracle of stage 1 and of
    the row cover.

    Args:
        q: ``(B, Hq, L, D)`` queries, positions ``layout.query_start ..`` (``L = S`` for a
            whole prompt).
        k: ``(B, Hkv, S, D)`` keys, ``Hq % Hkv == 0``.
        layout: geometry of the prefill (``layout.seq_len == S``).
        scale: softmax scale applied to ``q @ k^T``.

    Returns:
        ``(B, Hq, num_segments * rows_per_segment, S)`` float64, rows in
        ``layout.sampled_rows().flatten()`` order (zero after each row).
    """
    Hq, S = q.shape[1], k.shape[2]
    kk = k.double().repeat_interleave(Hq // k.shape[1], dim=1)
    rows = layout.sampled_rows(q.device).flatten()
    logits = (q.double()[:, :, rows - layout.query_start] @ kk.transpose(-1, -2)) * scale
    causal = torch.arange(S, device=q.device) <= rows[:, None]
    return logits.masked_fill(~causal, float("-inf")).softmax(dim=-1)


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
    B, Hq, S = q.shape[0], q.shape[1], k.shape[2]
    probs = sampled_row_probabilities(q, k, layout, scale)
    G, r = layout.num_segments, layout.rows_per_segment
    return probs.view(B, Hq, G, r, S).mean(dim=3).float()
