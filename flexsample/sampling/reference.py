"""Dense oracle for stage 1: materialises the full attention matrix in float64.

Small inputs only (``B * Hq * S * S`` doubles). Obviously correct by construction; the torch
and Triton samplers are tested against it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layout import SampleLayout


def sample_block_scores_reference(
    q: torch.Tensor, k: torch.Tensor, layout: SampleLayout, scale: float
) -> torch.Tensor:
    """Per-segment sampled attention mass of each uncovered key block, the slow way.

    Args:
        q: ``(B, Hq, S, D)`` queries.
        k: ``(B, Hkv, S, D)`` keys, ``Hq % Hkv == 0``.
        layout: geometry of the prefill (``layout.seq_len == S``).
        scale: softmax scale applied to ``q @ k^T``.

    Returns:
        ``(B, Hq, num_segments, num_blocks)`` float32: for each segment, the mean over its
        sampled rows of the causal softmax mass in each key block that the row's window and
        sink do not already keep (zero elsewhere).
    """
    B, Hq, S, _ = q.shape
    kk = k.double().repeat_interleave(Hq // k.shape[1], dim=1)
    logits = (q.double() @ kk.transpose(-1, -2)) * scale
    causal = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    probs = logits.masked_fill(~causal, float("-inf")).softmax(dim=-1)

    rows = layout.sampled_rows(q.device).flatten()
    padded = layout.num_blocks * layout.block_size
    p = F.pad(probs[:, :, rows], (0, padded - S))
    mass = p.view(B, Hq, rows.numel(), layout.num_blocks, layout.block_size).sum(-1)
    mass = mass * layout.uncovered_blocks(rows)
    G, r = layout.num_segments, layout.rows_per_segment
    return mass.view(B, Hq, G, r, layout.num_blocks).mean(dim=3).float()
