"""Stage 1 as a Triton kernel: two passes over K per tile of sampled query rows.

Imported lazily (only when the Triton sampler runs), so the package works without triton.

Each program takes a tile of sampled rows of one segment, for all query heads that share one
kv head (so K is read once per GQA group):

* pass 1 streams the causal key prefix and keeps the running row max and the row sum of
  ``exp2`` (the log-sum-exp of each row), as FlashAttention does;
* pass 2 streams the key blocks that lie before the rows' local window (and after the sink),
  turns logits into normalised probabilities with those statistics, and sums them per key
  block and over the tile's rows.

It writes one partial sum per (tile, key block); the launcher adds the tiles of a segment in
a fixed order, so results are deterministic (no atomics).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..layout import SampleLayout

_LOG2E = 1.4426950408889634

#: Launch configuration ``(block_m, block_n, num_warps)`` per GPU compute capability, the
#: fastest measured by ``bench/gpu_run.py --tune-sampler``. H100 (9, 0), S=64K, 32/8 heads,
#: D=128, bf16: (64, 128, 4) 5.81 ms; (64, 64, 4) 6.57; (64, 128, 8) 6.97; (128, 64, 8) 7.42;
#: (128, 128, 8) 7.48; (32, 64, 4) 12.4 (bench/results/gpu_NVIDIA_H100_80GB_HBM3.json).
LAUNCH_CONFIGS: dict[tuple[int, int], tuple[int, int, int]] = {(9, 0): (64, 128, 4)}
#: For devices not in the table (and the interpreter): the H100's choice.
DEFAULT_LAUNCH_CONFIG = (64, 128, 4)


def launch_config(device: torch.device) -> tuple[int, int, int]:
    """``(block_m, block_n, num_warps)`` for the sampler on ``device``."""
    if device.type != "cuda":
        return DEFAULT_LAUNCH_CONFIG
    capability = torch.cuda.get_device_capability(device)
    return LAUNCH_CONFIGS.get(capability, DEFAULT_LAUNCH_CONFIG)


@triton.jit
def _sample_block_mass_kernel(
    Q,
    K,
    ROWS,
    OUT,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    num_kv_heads,
    rows_per_segment,
    tiles_per_segment,
    num_blocks,
    num_segments,
    window_blocks,
    sink_blocks,
    qk_scale,
    GROUP: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # One program: one kv head, one segment, and a tile of BLOCK_M (row, query head) pairs:
    # BLOCK_M // GROUP consecutive sampled rows for each of the GROUP query heads that share
    # this kv head, so every K tile is loaded once for the whole GQA group.
    pid_tile = tl.program_id(0)
    pid_bh = tl.program_id(1)
    seg = pid_tile // tiles_per_segment
    tile = pid_tile % tiles_per_segment
    b = pid_bh // num_kv_heads
    h_kv = pid_bh % num_kv_heads
    ROWS_PER_TILE: tl.constexpr = BLOCK_M // GROUP

    slot = tl.arange(0, BLOCK_M)
    head_in_group = slot % GROUP
    local = tile * ROWS_PER_TILE + slot // GROUP
    row_valid = (slot < ROWS_PER_TILE * GROUP) & (local < rows_per_segment)
    pos = tl.load(ROWS + seg * rows_per_segment + local, mask=row_valid, other=0)
    d = tl.arange(0, HEAD_DIM_PAD)
    d_valid = d < HEAD_DIM

    q_head = h_kv * GROUP + head_in_group
    q_ptrs = (
        Q
        + b * stride_qb
        + q_head[:, None] * stride_qh
        + pos[:, None] * stride_qm
        + d[None, :] * stride_qd
    )
    q = tl.load(q_ptrs, mask=row_valid[:, None] & d_valid[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + h_kv * stride_kh
    offs_n = tl.arange(0, BLOCK_N)

    # Pass 1: running max and sum of exp2 over each row's causal prefix. The kernel is bound
    # by elementwise work, not the dots, so per element it does only: max of the raw logit
    # (the scale is positive), one FMA (scale and subtract), exp2, add. Key tiles entirely
    # before the tile's first row need no causal mask; only the last one or two do.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # scaled, log2 units
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    prefix_end = tl.max(pos, axis=0) + 1
    first_row = tl.min(tl.where(row_valid, pos, prefix_end), axis=0)
    unmasked_end = ((first_row + 1) // BLOCK_N) * BLOCK_N
    for start in range(0, unmasked_end, BLOCK_N):
        k = tl.load(
            k_base + (start + offs_n)[:, None] * stride_kn + d[None, :] * stride_kd,
            mask=d_valid[None, :],
            other=0.0,
        )
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
        p = tl.exp2(tl.fma(s, qk_scale, -m_new[:, None]))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(p, axis=1)
        m_i = m_new
    for start in range(unmasked_end, prefix_end, BLOCK_N):
        n = start + offs_n
        k = tl.load(
            k_base + n[:, None] * stride_kn + d[None, :] * stride_kd,
            mask=(n[:, None] < prefix_end) & d_valid[None, :],
            other=0.0,
        )
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        s = tl.where(n[None, :] <= pos[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
        p = tl.exp2(tl.fma(s, qk_scale, -m_new[:, None]))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(p, axis=1)
        m_i = m_new

    # Pass 2: normalised mass per key block, for blocks before each row's window. Such a
    # block ends before the row, so no causal mask is needed here.
    row_qb = pos // BLOCK_SIZE
    first_covered = row_qb - window_blocks  # blocks >= this are in the row's window
    inv_l = 1.0 / l_i
    # partial[b, h_kv, seg, tile, head_in_group, kb]
    out_base = OUT + ((pid_bh * num_segments + seg) * tiles_per_segment + tile) * (
        GROUP * num_blocks
    )
    block_end = tl.max(tl.where(row_valid, first_covered, 0), axis=0)
    for kb in range(sink_blocks, block_end):
        acc = tl.zeros([BLOCK_M], dtype=tl.float32)
        for sub in tl.static_range(0, BLOCK_SIZE, BLOCK_N):
            n = kb * BLOCK_SIZE + sub + offs_n
            k = tl.load(
                k_base + n[:, None] * stride_kn + d[None, :] * stride_kd,
                mask=d_valid[None, :],
                other=0.0,
            )
            if UPCAST:
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
            acc += tl.sum(tl.exp2(tl.fma(s, qk_scale, -m_i[:, None])), axis=1)
        mass = tl.where(row_valid & (kb < first_covered), acc * inv_l, 0.0)
        for g in tl.static_range(GROUP):
            tl.store(
                out_base + g * num_blocks + kb,
                tl.sum(tl.where(head_in_group == g, mass, 0.0), axis=0),
            )


def sample_block_scores_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: SampleLayout,
    scale: float,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Per-segment sampled attention mass of each uncovered key block, in one Triton launch.

    Same contract as :func:`~flexsample.sampling.reference.sample_block_scores_reference`:
    q ``(B, Hq, S, D)``, k ``(B, Hkv, S, D)`` on a CUDA device (or on CPU with
    ``TRITON_INTERPRET=1``); returns ``(B, Hq, num_segments, num_blocks)`` float32.

    ``block_m`` (a power of two) is the number of (row, query head) pairs per program; it is
    raised to the GQA group size when smaller. ``block_n`` is the key tile width (a power of
    two, capped at the block size). Each left at None comes from :func:`launch_config`.
    """
    tuned = launch_config(q.device)
    block_m = tuned[0] if block_m is None else block_m
    block_n = tuned[1] if block_n is None else block_n
    num_warps = tuned[2] if num_warps is None else num_warps
    B, Hq, _, D = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    G, r, nb = layout.num_segments, layout.rows_per_segment, layout.num_blocks
    block_m = max(block_m, 16, triton.next_power_of_2(group))
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    tiles = triton.cdiv(r, block_m // group)
    rows = layout.sampled_rows(q.device).to(torch.int32).contiguous()
    partial = torch.zeros(B, Hkv, G, tiles, group, nb, dtype=torch.float32, device=q.device)
    _sample_block_mass_kernel[(G * tiles, B * Hkv)](
        q,
        k,
        rows,
        partial,
        *q.stride(),
        *k.stride(),
        Hkv,
        r,
        tiles,
        nb,
        G,
        layout.window_blocks,
        layout.sink_blocks,
        scale * _LOG2E,
        GROUP=group,
        BLOCK_SIZE=layout.block_size,
        BLOCK_M=block_m,
        BLOCK_N=min(block_n, layout.block_size),
        HEAD_DIM=D,
        HEAD_DIM_PAD=max(16, triton.next_power_of_2(D)),
        # The interpreter computes bf16/fp16 tl.dot wrongly (triton 3.9): upcast there.
        UPCAST=interpreted,
        # float32 operands get full-precision dots, not TF32: scores must match the oracle.
        # (The setting is ignored for bf16/fp16 operands.)
        DOT_PRECISION="ieee" if q.dtype == torch.float32 or interpreted else "tf32",
        num_warps=num_warps,
    )
    # (B, Hkv, G, tiles, group, nb) -> sum tiles -> (B, Hkv, group, G, nb) = (B, Hq, G, nb)
    scores = partial.sum(dim=3).div_(r).transpose(2, 3)
    return scores.reshape(B, Hq, G, nb)
