"""Attention over chosen keys as dense products, with each row's log-sum-exp, so that parts
over disjoint sets of keys merge exactly: how a pattern runs on the CPU without a
``BlockMask`` (:meth:`~flexsample.patterns.Pattern.attend`, ``SampleConfig.backend="gather"``).

:func:`attend_with_lse` runs PyTorch's fused CPU attention kernel (the one causal SDPA runs
on the CPU, which also returns the log-sum-exp); :func:`attend_with_lse_reference` is its
twin in plain matrix products, used where that kernel is missing.
"""

from __future__ import annotations

import math

import torch

#: PyTorch's fused CPU attention kernel that returns ``(out, logsumexp)``; None where this
#: PyTorch has no such operator.
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def attend_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    *,
    causal: bool = False,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of ``q`` over ``k`` and ``v`` and each row's log-sum-exp.

    Args:
        q: ``(N, H, R, D)``.
        k: ``(N, H, K, D)``; its last dimension contiguous (overlapping views are fine).
        v: ``(N, H, K, D)``, likewise.
        scale: softmax scale.
        causal: row ``i`` reads keys ``0 .. i`` (top-left aligned).
        mask: additive, broadcast to ``(N, H, R, K)`` (``-inf`` where a row does not read a
            key), in q's dtype.

    Returns:
        ``(out (N, H, R, D), lse (N, H, R))`` in float32 for float32 inputs. A row that reads
        no key is undefined: callers drop it (its ``lse`` is not ``-inf``).
    """
    if _CPU_FLASH is None or q.device.type != "cpu":
        return attend_with_lse_reference(q, k, v, scale, causal=causal, mask=mask)
    return _CPU_FLASH(q, k, v, is_causal=causal, attn_mask=mask, scale=scale)


def attend_with_lse_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    *,
    causal: bool = False,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attend_with_lse` as matrix products and a softmax (the same arguments)."""
    logits = (q @ k.transpose(-1, -2)) * scale
    if causal:
        R, K = logits.shape[-2:]
        above = torch.ones(R, K, dtype=torch.bool, device=q.device).triu(1)
        logits = logits.masked_fill(above, -math.inf)
    if mask is not None:
        logits = logits + mask
    lse = logits.logsumexp(dim=-1)
    out = torch.exp(logits - lse[..., None]) @ v
    return out, lse


def merge(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The attention over the union of disjoint key sets from each set's ``(out (R, D),
    lse (R,))``: the outputs weighted by their share of the mass. A part's rows that read no
    key carry ``lse = -inf``; every row reads a key in at least one part."""
    if len(parts) == 1:
        return parts[0][0]
    lse = torch.stack([lse for _, lse in parts])
    weights = torch.exp(lse - lse.amax(dim=0))
    out = parts[0][0] * weights[0, :, None]
    for (o, _), w in zip(parts[1:], weights[1:], strict=True):
        out.addcmul_(o, w[:, None])
    return out.div_(weights.sum(dim=0)[:, None])


def attend_tile_keys(
    tiles: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of query tiles over their own keys, one call for all of them.

    Args:
        tiles: ``(N, 1, block_size, D)`` query tiles.
        keys: ``(num_keys, D)`` a head's keys, values likewise.
        values: likewise.
        positions: ``(N, C)`` each tile's keys, padded with ``num_keys`` or beyond.
        scale: softmax scale.

    Returns:
        ``(N, 1, block_size, D)`` and ``(N, 1, block_size)``; ``lse = -inf`` (output 0) in
        tiles that read no key.
    """
    N, C = positions.shape
    unused = positions >= keys.shape[0]
    index = positions.masked_fill(unused, 0)
    mask = torch.zeros(N, 1, 1, C, dtype=tiles.dtype).masked_fill_(unused[:, None, None], -math.inf)
    # A tile with no key gets one unmasked (its result is dropped) so no row is empty.
    empty = unused.all(dim=-1)
    mask[empty, :, :, 0] = 0.0
    out, lse = attend_with_lse(
        tiles, keys[index][:, None], values[index][:, None], scale, mask=mask
    )
    out[empty] = 0.0
    lse[empty] = -math.inf
    return out, lse
