"""Mask building: column stripes plus local window and sink -> FlexAttention ``BlockMask``."""

from __future__ import annotations

import copy
import inspect

import torch
from torch.nn.attention.flex_attention import BlockMask

from .config import SampleConfig
from .layout import SampleLayout


def causal_mask_mod(b, h, q_idx, kv_idx):
    """Plain causal ``mask_mod``: what compiled kernels evaluate on diagonal tiles."""
    return q_idx >= kv_idx


def tile_mask_mod(keep: torch.Tensor, block_size: int):
    """FlexAttention ``mask_mod`` equal to the tile layout ``keep`` intersected with causality.

    Compiled kernels evaluate a ``mask_mod`` only on partial tiles; anything that evaluates it
    everywhere (eager ``flex_attention``, ``BlockMask.to_dense``, ``create_mask``) sees the
    whole layout here, so the BlockMask means the same sparse attention under every
    implementation instead of silently meaning dense causal attention.

    Args:
        keep: ``(B, H, N, N)`` bool tile layout; its diagonal must be kept.
        block_size: tile side in tokens.
    """
    _, H, n, _ = keep.shape
    flat = keep.reshape(-1)

    def sample_attention_mask(b, h, q_idx, kv_idx):
        tile = ((b * H + h) * n + q_idx // block_size) * n + kv_idx // block_size
        return flat[tile] & (q_idx >= kv_idx)

    sample_attention_mask.diagonal_equivalent = causal_mask_mod  # see kernel_block_mask
    return sample_attention_mask


def kernel_block_mask(block_mask: BlockMask) -> BlockMask:
    """The same BlockMask with the cheap ``mask_mod`` a compiled kernel needs.

    A flexsample BlockMask's only partial tiles are diagonal tiles, which every layout keeps,
    so on them the exact tile lookup equals plain causality. Compiled kernels get the plain
    causal ``mask_mod``: cheaper, and it avoids tracing a tensor lookup, which inductor's CPU
    template in torch 2.13 miscompiles (undeclared-variable C++ errors). Other masks are
    returned unchanged.
    """
    simple = getattr(block_mask.mask_mod, "diagonal_equivalent", None)
    if simple is None:
        return block_mask
    kernel_mask = copy.copy(block_mask)
    kernel_mask.mask_mod = simple
    return kernel_mask


def block_layout(stripes: torch.Tensor, layout: SampleLayout) -> torch.Tensor:
    """Which ``(query block, key block)`` tiles each head computes.

    Tile ``(i, j)`` is kept iff ``j <= i`` and (``j`` is a selected stripe, or ``i - j`` is
    within the window, or ``j`` is a sink block).

    Args:
        stripes: ``(B, H, num_blocks)`` bool from :func:`~flexsample.selection.select_blocks`.
        layout: geometry of the prefill.

    Returns:
        ``(B, H, num_blocks, num_blocks)`` bool, lower-triangular.

    Raises:
        ValueError: ``stripes`` has the wrong shape for ``layout``.
    """
    if stripes.dim() != 3 or stripes.shape[-1] != layout.num_blocks:
        raise ValueError(
            f"stripes must be (B, H, {layout.num_blocks}) for seq_len {layout.seq_len}, "
            f"got shape {tuple(stripes.shape)}"
        )
    causal = layout.causal_blocks(stripes.device)
    local = layout.local_blocks(stripes.device)
    return (stripes.bool()[..., None, :] & causal) | local


def density(keep: torch.Tensor) -> torch.Tensor:
    """Fraction of causal tiles kept, per ``(B, H)``, from a ``(B, H, N, N)`` tile layout."""
    n = keep.shape[-1]
    return keep.sum(dim=(-1, -2)).float() / (n * (n + 1) // 2)


# compute_q_blocks (skip the transposed indices that only the backward pass reads) arrived
# after torch 2.6; pass it only where it exists.
_FROM_KV_BLOCKS_HAS_Q_FLAG = (
    "compute_q_blocks" in inspect.signature(BlockMask.from_kv_blocks).parameters
)


def block_mask_from_layout(
    keep: torch.Tensor, seq_len: int, block_size: int, *, check: bool = True
) -> BlockMask:
    """Turn a tile layout into a causal FlexAttention ``BlockMask``.

    Tiles strictly below the diagonal are *full* (computed without a ``mask_mod`` call); the
    diagonal tile is *partial* and masked causally. Built with vectorised ops on ``keep``'s
    device.

    Args:
        keep: ``(B, H, N, N)`` bool tile layout, ``N = ceil(seq_len / block_size)``; the
            diagonal must be kept (every query attends to itself).
        seq_len: tokens ``S`` (the last block may be partial).
        block_size: tile side in tokens.
        check: validate ``keep`` first. The diagonal check reads the tensor on the host (a
            device stall on CUDA); layouts made by :func:`block_layout` are valid by
            construction (the window always holds the diagonal), so the pipeline passes
            False.

    Returns:
        A ``BlockMask`` for ``flex_attention`` on ``(B, H, S, D)`` inputs. It carries no
        transposed indices where the torch version allows skipping them, so it serves the
        forward pass only.

    Raises:
        ValueError: ``keep`` is not a bool ``(B, H, N, N)`` tensor with
            ``N = ceil(seq_len / block_size)``, or its diagonal is not kept.
    """
    if check:
        _check_layout(keep, seq_len, block_size)
    B, H, n, _ = keep.shape
    rows = torch.arange(n, device=keep.device)
    full = keep & (rows[None, :] < rows[:, None])
    full_num = full.sum(dim=-1, dtype=torch.int32)
    # Kept tile j of row i goes to slot (number of kept tiles before j): ascending indices
    # without a sort. Unkept tiles are sent to a spare last slot, dropped afterwards.
    slot = torch.where(full, full.cumsum(dim=-1) - 1, n)
    full_idx = torch.zeros(B, H, n, n + 1, dtype=torch.int32, device=keep.device)
    full_idx.scatter_(-1, slot, rows.to(torch.int32).expand(B, H, n, n))
    full_idx = full_idx[..., :n].contiguous()
    diag_num = torch.ones(B, H, n, dtype=torch.int32, device=keep.device)
    # Only column 0 is read (one partial block per row), but the CPU lowering takes the KV
    # extent from the index tensor's last dimension, so it must be N wide.
    diag_idx = torch.zeros(n, n, dtype=torch.int32, device=keep.device)
    diag_idx[:, 0] = rows
    diag_idx = diag_idx.expand(B, H, n, n).contiguous()
    extra = {"compute_q_blocks": False} if _FROM_KV_BLOCKS_HAS_Q_FLAG else {}
    return BlockMask.from_kv_blocks(
        diag_num,
        diag_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=block_size,
        mask_mod=tile_mask_mod(keep, block_size),
        seq_lengths=(seq_len, seq_len),
        **extra,
    )


def _check_layout(keep: torch.Tensor, seq_len: int, block_size: int) -> None:
    n_expected = -(-seq_len // block_size)
    if keep.dtype != torch.bool or keep.dim() != 4 or keep.shape[-2:] != (n_expected,) * 2:
        raise ValueError(
            f"keep must be a bool (B, H, {n_expected}, {n_expected}) tile layout for seq_len "
            f"{seq_len} and block_size {block_size}, got {keep.dtype} {tuple(keep.shape)}"
        )
    if not bool(keep.diagonal(dim1=-2, dim2=-1).all()):
        raise ValueError("keep must keep every diagonal tile (each query attends to itself)")


def build_block_mask(
    stripes: torch.Tensor, seq_len: int, config: SampleConfig | None = None
) -> BlockMask:
    """The SampleAttention ``BlockMask``: selected stripes, local window, sink, causal.

    Args:
        stripes: ``(B, H, num_blocks)`` bool from :func:`~flexsample.selection.select_blocks`.
        seq_len: tokens ``S``.
        config: the settings used for sampling (window, sink, block size).

    Returns:
        A causal ``BlockMask`` over ``(B, H, S, S)``.
    """
    layout = SampleLayout.create(seq_len, config or SampleConfig())
    keep = block_layout(stripes, layout)
    return block_mask_from_layout(keep, seq_len, layout.block_size, check=False)
