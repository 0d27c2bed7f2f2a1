"""FlexAttention ``BlockMask`` helpers that no mask shape owns: block maps to indices, the
dense causal mask, padding to a static shape. Each pattern (:mod:`flexsample.patterns`)
builds its own mask from these."""

from __future__ import annotations

import functools
import inspect

import torch
from torch.nn.attention.flex_attention import BlockMask

__all__ = [
    "block_map_indices",
    "causal_block_mask",
    "check_padded",
    "from_kv_blocks",
    "pad_sequence",
]

# compute_q_blocks (skip the transposed indices that only the backward pass reads) arrived
# after torch 2.6; pass it only where it exists.
_FROM_KV_BLOCKS_HAS_Q_FLAG = (
    "compute_q_blocks" in inspect.signature(BlockMask.from_kv_blocks).parameters
)


@functools.lru_cache(maxsize=256)
def int32_scalar(x: int, device: torch.device) -> torch.Tensor:
    """``x`` as a 0-d int32 tensor on ``device``, one per value and device: how a
    ``mask_mod`` for inductor's CPU template captures a number (a captured Python int
    becomes a symbol under ``dynamic=True``). Shared by the masks that capture it (read
    only): a new one per mask is a copy from the host, which on a GPU waits for the work
    queued before it."""
    return torch.tensor(x, dtype=torch.int32, device=device)


def from_kv_blocks(
    part_num: torch.Tensor,
    part_idx: torch.Tensor,
    full_num: torch.Tensor,
    full_idx: torch.Tensor,
    *,
    block_size: int,
    mask_mod,
    seq_lengths: tuple[int, int],
) -> BlockMask:
    """``BlockMask.from_kv_blocks`` for the forward pass: without the transposed indices
    that only the backward pass reads, where the torch version allows skipping them."""
    extra = {"compute_q_blocks": False} if _FROM_KV_BLOCKS_HAS_Q_FLAG else {}
    return BlockMask.from_kv_blocks(
        part_num,
        part_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=block_size,
        mask_mod=mask_mod,
        seq_lengths=seq_lengths,
        **extra,
    )


def block_map_indices(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(num, idx)`` for ``BlockMask.from_kv_blocks`` from a ``(B, H, Nq, Nkv)`` bool map.

    Kept block j of row i goes to slot (number of kept blocks before j): ascending indices
    without a sort. Unkept blocks are sent to a spare last slot, dropped afterwards.
    """
    B, H, nq, nkv = keep.shape
    num = keep.sum(dim=-1, dtype=torch.int32)
    slot = torch.where(keep, keep.cumsum(dim=-1) - 1, nkv)
    idx = torch.zeros(B, H, nq, nkv + 1, dtype=torch.int32, device=keep.device)
    cols = torch.arange(nkv, dtype=torch.int32, device=keep.device)
    idx.scatter_(-1, slot, cols.expand(B, H, nq, nkv))
    return num, idx[..., :nkv].contiguous()


@functools.lru_cache(maxsize=32)
def causal_block_mask(
    seq_len: int, padded: int, block_size: int, device: torch.device
) -> BlockMask:
    """The dense causal ``BlockMask`` of a ``seq_len``-token prompt over ``(padded, padded)``
    (broadcast over batch and heads): every tile below the diagonal whole, the diagonal
    partial, and no tile for the query blocks past ``seq_len`` (padding costs no work).

    Cached per shape: every layer of a prefill, and every prompt of one bucket
    (:func:`~flexsample.bucket_length`), shares one mask.
    """
    rows, _ = check_padded((padded, padded), seq_len, seq_len, block_size)
    blocks, n = -(-seq_len // block_size), rows // block_size
    qb = torch.arange(n, device=device)[:, None]
    kb = torch.arange(n, device=device)[None, :]
    real = qb < blocks
    full_num, full_idx = block_map_indices(((kb < qb) & real)[None, None])
    part_num, part_idx = block_map_indices(((kb == qb) & real)[None, None])
    return from_kv_blocks(
        part_num,
        part_idx,
        full_num,
        full_idx,
        block_size=block_size,
        mask_mod=_causal,
        seq_lengths=(padded, padded),
    )


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def check_padded(padded: tuple[int, int], rows: int, keys: int, block: int) -> tuple[int, int]:
    """``padded`` if it is a ``(query rows, keys)`` shape of whole blocks holding ``(rows,
    keys)``; else ``ValueError``."""
    padded_rows, padded_keys = padded
    if padded_rows < rows or padded_keys < keys or padded_rows % block or padded_keys % block:
        raise ValueError(
            f"padded shape {padded} must be multiples of the block size {block} at least "
            f"(query rows, keys) = {(rows, keys)}"
        )
    return padded_rows, padded_keys


def pad_sequence(x: torch.Tensor, length: int) -> torch.Tensor:
    """``x (B, H, n, D)`` with zero rows appended along the sequence to ``length``."""
    extra = length - x.shape[-2]
    return x if extra == 0 else torch.nn.functional.pad(x, (0, 0, 0, extra))
