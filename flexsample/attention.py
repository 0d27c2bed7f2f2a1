"""Stage 3 — attention: compiled FlexAttention with the block mask, and its dense twins."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention


@functools.cache
def compiled_flex_attention():
    """``flex_attention`` compiled once with dynamic shapes.

    Dynamic shapes make one compiled kernel serve every sequence length (and batch sizes
    above one), instead of a recompilation per new prompt length.
    """
    return torch.compile(flex_attention, dynamic=True)


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockMask,
    scale: float,
) -> torch.Tensor:
    """Block-sparse causal attention through compiled FlexAttention.

    Args:
        q: ``(B, Hq, S, D)``; k, v: ``(B, Hkv, S, D)`` with ``Hq % Hkv == 0``.
        block_mask: a causal ``BlockMask`` over ``(B, Hq, S, S)``.
        scale: softmax scale.

    Returns:
        ``(B, Hq, S, D)`` in q's dtype.
    """
    flex = flex_attention if torch.compiler.is_compiling() else compiled_flex_attention()
    return flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def dense_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """Dense causal attention (PyTorch SDPA): the fallback path. Shapes as above."""
    return F.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


def sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """Eager float64 oracle of :func:`sparse_attention`: materialises the element mask.

    Args:
        q, k, v: as for :func:`sparse_attention`.
        keep: ``(B, Hq, N, N)`` bool tile layout (see :func:`flexsample.masks.block_layout`).
        block_size: tile side in tokens.
        scale: softmax scale.

    Returns:
        ``(B, Hq, S, D)`` in q's dtype. Small inputs only (``B * Hq * S * S`` elements).
    """
    _, Hq, S, _ = q.shape
    group = Hq // k.shape[1]
    tile = torch.arange(S, device=q.device) // block_size
    allowed = keep[:, :, tile][:, :, :, tile]
    allowed &= torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    kk = k.double().repeat_interleave(group, dim=1)
    vv = v.double().repeat_interleave(group, dim=1)
    logits = (q.double() @ kk.transpose(-1, -2)) * scale
    probs = logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    return (probs @ vv).to(q.dtype)
