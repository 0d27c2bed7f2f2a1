"""Stage 1 as Triton kernels: the sampled rows' log-sum-exp, then their mass per key column.

Imported lazily (only when the Triton sampler runs), so the package works without triton.

* ``_row_lse_kernel`` takes a tile of sampled rows of one segment, for all query heads that
  share one kv head (so K is read once per GQA group), streams the causal key prefix and
  keeps each row's running max and sum of ``exp2``, as FlashAttention does: the row's
  log-sum-exp.
* ``_column_mass_kernel`` takes one tile of keys and one segment: it loads the keys once,
  then, per query head of the group, streams the segment's sampled rows, turns their logits
  into normalised probabilities with the log-sum-exp, and sums them over the rows (into a
  tile-shaped accumulator, reduced once).
* ``_row_missing_kernel`` (the per-row cover's measurement, stage 2b) takes the same tiles of
  rows as the first kernel and, with their log-sum-exp known, sums the probability of the
  keys each row's mask misses (between the sink and its window, not among its columns).

Every output element is written by exactly one program in a fixed order: results are
deterministic (no atomics).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ..layout import SampleLayout

LOG2E = 1.4426950408889634

#: Launch configuration ``(block_m, block_n, num_warps)`` per GPU compute capability: the
#: fastest of ten measured (``docs/tuning.md``).
LAUNCH_CONFIGS: dict[tuple[int, int], tuple[int, int, int]] = {(9, 0): (64, 128, 4)}
#: For devices not in the table (and the interpreter).
DEFAULT_LAUNCH_CONFIG = (64, 64, 4)


@functools.lru_cache(maxsize=16)
def launch_config(device: torch.device) -> tuple[int, int, int]:
    """``(block_m, block_n, num_warps)`` for the sampler on ``device`` (looked up once per
    device: every launch asks)."""
    if device.type != "cuda":
        return DEFAULT_LAUNCH_CONFIG
    capability = torch.cuda.get_device_capability(device)
    return LAUNCH_CONFIGS.get(capability, DEFAULT_LAUNCH_CONFIG)


@triton.jit
def _accumulate(s, m_i, l_i, qk_scale):
    # One key tile of the online softmax sum: running max ``m_i`` (scaled logits, log2
    # units) and sum ``l_i`` of exp2.
    m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
    p = tl.exp2(tl.fma(s, qk_scale, -m_new[:, None]))
    l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(p, axis=1)
    return m_new, l_i


@triton.jit
def _row_tile(
    Q,
    ROWS,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    num_kv_heads,
    rows_per_segment,
    tiles_per_segment,
    num_segments,
    query_start,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    UPCAST: tl.constexpr,
):
    # A row kernel's program: one kv head, one segment, and a tile of BLOCK_M (row, query
    # head) pairs: BLOCK_M // GROUP consecutive sampled rows for each of the GROUP query
    # heads that share this kv head, so every K tile is loaded once for the whole GQA group.
    # Returns its coordinates, rows and their queries, and each pair's offset in the
    # (B, Hkv, G, r, group) row tables.
    pid_tile = tl.program_id(0)
    pid_bh = tl.program_id(1)
    seg = pid_tile // tiles_per_segment
    tile = pid_tile % tiles_per_segment
    # 64-bit: batch and head offsets of long inputs pass 2**31 elements.
    b = (pid_bh // num_kv_heads).to(tl.int64)
    h_kv = (pid_bh % num_kv_heads).to(tl.int64)
    ROWS_PER_TILE: tl.constexpr = BLOCK_M // GROUP
    slot = tl.arange(0, BLOCK_M)
    head_in_group = slot % GROUP
    local = tile * ROWS_PER_TILE + slot // GROUP
    row_valid = (slot < ROWS_PER_TILE * GROUP) & (local < rows_per_segment)
    pos = tl.load(ROWS + seg * rows_per_segment + local, mask=row_valid, other=0)
    d = tl.arange(0, HEAD_DIM_PAD)
    d_valid = d < HEAD_DIM
    q_head = h_kv * GROUP + head_in_group
    q = tl.load(
        Q
        + b * stride_qb
        + q_head[:, None] * stride_qh
        + (pos - query_start)[:, None] * stride_qm
        + d[None, :] * stride_qd,
        mask=row_valid[:, None] & d_valid[None, :],
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    out_offs = ((pid_bh * num_segments + seg) * rows_per_segment + local) * GROUP + head_in_group
    return pid_bh, b, h_kv, q_head, row_valid, pos, q, d, d_valid, out_offs


@triton.jit
def key_scores(
    q, k_base, n, key_end, d, d_valid, stride_kn, stride_kd,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    # The rows' raw logits against the keys at positions n (keys at or past key_end read 0).
    k = tl.load(
        k_base + n[:, None] * stride_kn + d[None, :] * stride_kd,
        mask=(n[:, None] < key_end) & d_valid[None, :],
        other=0.0,
    )
    if UPCAST:
        k = k.to(tl.float32)
    return tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)


@triton.jit
def _row_lse_kernel(
    Q,
    K,
    ROWS,
    LSE,
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
    num_segments,
    qk_scale,
    query_start,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    _, b, h_kv, _, row_valid, pos, q, d, d_valid, out_offs = _row_tile(
        Q, ROWS, stride_qb, stride_qh, stride_qm, stride_qd, num_kv_heads, rows_per_segment,
        tiles_per_segment, num_segments, query_start, GROUP, BLOCK_M, HEAD_DIM, HEAD_DIM_PAD,
        UPCAST,
    )  # fmt: skip
    k_base = K + b * stride_kb + h_kv * stride_kh
    offs_n = tl.arange(0, BLOCK_N)

    # Running max and sum of exp2 over each row's causal prefix. The kernel is bound by
    # elementwise work, not the dots, so per element it does only: max of the raw logit (the
    # scale is positive), one FMA (scale and subtract), exp2, add. Key tiles entirely before
    # the tile's first row need no causal mask; only the last one or two do.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # scaled, log2 units
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    prefix_end = tl.max(pos, axis=0) + 1
    first_row = tl.min(tl.where(row_valid, pos, prefix_end), axis=0)
    unmasked_end = ((first_row + 1) // BLOCK_N) * BLOCK_N
    for start in range(0, unmasked_end, BLOCK_N):
        n = start + offs_n
        # Not key_scores: these keys lie before every row, so the load needs no key bound.
        k = tl.load(
            k_base + n[:, None] * stride_kn + d[None, :] * stride_kd,
            mask=d_valid[None, :],
            other=0.0,
        )
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        m_i, l_i = _accumulate(s, m_i, l_i, qk_scale)
    for start in range(unmasked_end, prefix_end, BLOCK_N):
        n = start + offs_n
        s = key_scores(
            q, k_base, n, prefix_end, d, d_valid, stride_kn, stride_kd, UPCAST, DOT_PRECISION
        )
        s = tl.where(n[None, :] <= pos[:, None], s, float("-inf"))
        m_i, l_i = _accumulate(s, m_i, l_i, qk_scale)

    # lse[b, h_kv, seg, local, head_in_group], in log2 units of the scaled logits.
    tl.store(LSE + out_offs, m_i + tl.log2(l_i), mask=row_valid)


@triton.jit
def _column_mass_kernel(
    Q,
    K,
    ROWS,
    LSE,
    OUT,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    seq_len,
    query_start,
    num_kv_heads,
    rows_per_segment,
    num_segments,
    qk_scale,
    inv_rows,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # One program: BLOCK_N keys of one kv head and one segment. The keys are loaded once;
    # for each query head of the group, the segment's sampled rows stream past them.
    pid_n = tl.program_id(0)
    seg = tl.program_id(1)
    pid_bh = tl.program_id(2)
    # 64-bit: batch and head offsets of long inputs pass 2**31 elements.
    b = (pid_bh // num_kv_heads).to(tl.int64)
    h_kv = (pid_bh % num_kv_heads).to(tl.int64)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = n < seq_len
    rows_base = ROWS + seg * rows_per_segment
    last_row = tl.load(rows_base + rows_per_segment - 1)
    if pid_n * BLOCK_N > last_row:  # every key here is after every sampled row: mass 0
        return
    d = tl.arange(0, HEAD_DIM_PAD)
    d_valid = d < HEAD_DIM
    k = tl.load(
        K + b * stride_kb + h_kv * stride_kh + n[:, None] * stride_kn + d[None, :] * stride_kd,
        mask=n_valid[:, None] & d_valid[None, :],
        other=0.0,
    )
    if UPCAST:
        k = k.to(tl.float32)
    offs_m = tl.arange(0, BLOCK_M)
    lse_base = LSE + (pid_bh * num_segments + seg) * rows_per_segment * GROUP
    out_base = OUT + ((pid_bh * GROUP) * num_segments + seg) * seq_len
    last_key = pid_n * BLOCK_N + BLOCK_N - 1
    for g in tl.static_range(GROUP):
        q_base = Q + b * stride_qb + (h_kv * GROUP + g) * stride_qh
        # Summed over the rows once, at the end: a reduction across the rows per step would
        # cost more than the exp2 it sums.
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for start in range(0, rows_per_segment, BLOCK_M):
            local = start + offs_m
            row_valid = local < rows_per_segment
            pos = tl.load(rows_base + local, mask=row_valid, other=0)
            q = tl.load(
                q_base + (pos - query_start)[:, None] * stride_qm + d[None, :] * stride_qd,
                mask=row_valid[:, None] & d_valid[None, :],
                other=0.0,
            )
            if UPCAST:
                q = q.to(tl.float32)
            # An invalid row's log-sum-exp is +inf: its probabilities are 0.
            lse = tl.load(lse_base + local * GROUP + g, mask=row_valid, other=float("inf"))
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
            p = tl.exp2(tl.fma(s, qk_scale, -lse[:, None]))
            # The rows ascend: where the first one is at or after the tile's last key, every
            # key here is causal for every row.
            if tl.load(rows_base + start) >= last_key:
                acc += p
            else:
                acc += tl.where(n[None, :] <= pos[:, None], p, 0.0)
        # out[b, h_kv, g, seg, n]
        column = tl.sum(acc, axis=0) * inv_rows
        tl.store(out_base + g * num_segments * seq_len + n, column, mask=n_valid)


@triton.jit
def _row_missing_kernel(
    Q,
    K,
    ROWS,
    LSE,
    WIN_START,
    COLS,
    TILE_COLS,
    MISSED_MASS,
    HEAVIEST_MISS,
    ONLY,
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
    num_segments,
    qk_scale,
    seq_len,
    query_start,
    sink_tokens,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HAS_ONLY: tl.constexpr,
):
    # The cover's measurement, with each row's log-sum-exp known (the sampler's first pass):
    # the mass its mask misses and its heaviest missed key. Same tiling as _row_lse_kernel.
    # Only keys between the sink and the row's window can be missed, so the loop stops at the
    # tile's latest window start (keys from there on are in the window, or after the row:
    # the window test excludes both), and each element costs one FMA, one exp2 and two
    # masked reductions: no running max, no rescaling. With HAS_ONLY, a tile none of whose
    # rows ONLY flags skips the loop (its rows store nothing missed).
    pid_bh, b, h_kv, q_head, row_valid, _, q, d, d_valid, out_offs = _row_tile(
        Q, ROWS, stride_qb, stride_qh, stride_qm, stride_qd, num_kv_heads, rows_per_segment,
        tiles_per_segment, num_segments, query_start, GROUP, BLOCK_M, HEAD_DIM, HEAD_DIM_PAD,
        UPCAST,
    )  # fmt: skip
    lse = tl.load(LSE + out_offs, mask=row_valid, other=0.0)  # log2 units, scaled logits
    num_q_heads = num_kv_heads * GROUP
    # The first key of each row's window, as the pattern gives it (an invalid slot's window
    # starts at 0: it misses nothing).
    win_start = tl.load(WIN_START + out_offs, mask=row_valid, other=0)
    cols_rows = COLS + (b * num_q_heads + q_head).to(tl.int64) * seq_len
    tile_cols = TILE_COLS + pid_bh.to(tl.int64) * tl.cdiv(seq_len, BLOCK_N)
    k_base = K + b * stride_kb + h_kv * stride_kh
    offs_n = tl.arange(0, BLOCK_N)
    missed = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_miss = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # raw logits
    # Key tiles past the sink, before every valid row's window and holding no column: every
    # key there is missed by every row, and the tile needs no mask (masking every tile
    # measured 1.6x slower).
    lo = tl.cdiv(sink_tokens, BLOCK_N) * BLOCK_N
    first_window = tl.min(tl.where(row_valid, win_start, seq_len), axis=0)
    open_end = tl.maximum(lo, (first_window // BLOCK_N) * BLOCK_N)
    end = tl.max(win_start, axis=0)
    if HAS_ONLY:
        flagged = tl.load(ONLY + out_offs, mask=row_valid, other=0)
        end = tl.where(tl.max(flagged, axis=0) != 0, end, 0)
    for start in range((sink_tokens // BLOCK_N) * BLOCK_N, end, BLOCK_N):
        n = start + offs_n
        s = key_scores(
            q, k_base, n, seq_len, d, d_valid, stride_kn, stride_kd, UPCAST, DOT_PRECISION
        )
        p = tl.exp2(tl.fma(s, qk_scale, -lse[:, None]))
        tile_flag = tl.load(tile_cols + start // BLOCK_N)  # any column of the group here
        if (start >= lo) & (start + BLOCK_N <= open_end) & (tile_flag == 0):
            missed += tl.sum(p, axis=1)
            m_miss = tl.maximum(m_miss, tl.max(s, axis=1))
        else:
            miss = (n[None, :] < win_start[:, None]) & (n[None, :] >= sink_tokens)
            if tile_flag != 0:
                col = tl.load(cols_rows[:, None] + n[None, :], mask=n[None, :] < seq_len, other=0)
                miss = miss & (col == 0)
            missed += tl.sum(tl.where(miss, p, 0.0), axis=1)
            m_miss = tl.maximum(m_miss, tl.max(tl.where(miss, s, float("-inf")), axis=1))
    tl.store(MISSED_MASS + out_offs, missed, mask=row_valid)
    tl.store(HEAVIEST_MISS + out_offs, tl.exp2(m_miss * qk_scale - lse), mask=row_valid)


@triton.jit
def key_probabilities(
    q, k_base, n, d, d_valid, lse, seq_len, stride_kn, stride_kd, qk_scale,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    # The rows' probabilities of the keys at positions n (any order; n >= seq_len reads 0),
    # given their log-sum-exp (log2 units of the scaled logits).
    s = key_scores(q, k_base, n, seq_len, d, d_valid, stride_kn, stride_kd, UPCAST, DOT_PRECISION)
    return tl.exp2(tl.fma(s, qk_scale, -lse[:, None]))


@triton.jit
def _row_kept_kernel(
    Q,
    K,
    ROWS,
    LSE,
    WIN_START,
    COLS,
    COL_POS,
    KEPT,
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
    num_segments,
    qk_scale,
    seq_len,
    query_start,
    sink_tokens,
    num_col_pos,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # The mass each row's mask keeps, summed over what it keeps: the sink, the window, and
    # the kv group's columns before the window (gathered from COL_POS, a list per kv head).
    # Where masks are sparse that is a few tiles per row instead of _row_missing_kernel's
    # pass over every key before the window. Same tiling as _row_lse_kernel.
    pid_bh, b, h_kv, q_head, row_valid, pos, q, d, d_valid, out_offs = _row_tile(
        Q, ROWS, stride_qb, stride_qh, stride_qm, stride_qd, num_kv_heads, rows_per_segment,
        tiles_per_segment, num_segments, query_start, GROUP, BLOCK_M, HEAD_DIM, HEAD_DIM_PAD,
        UPCAST,
    )  # fmt: skip
    lse = tl.load(LSE + out_offs, mask=row_valid, other=0.0)  # log2 units, scaled logits
    num_q_heads = num_kv_heads * GROUP
    win_start = tl.load(WIN_START + out_offs, mask=row_valid, other=0)  # the pattern's
    # Window keys from the sink on (the sink's own keys are counted once, below).
    lo = tl.where(row_valid, tl.maximum(win_start, sink_tokens), seq_len)
    hi = tl.where(row_valid, pos, -1)  # inclusive
    k_base = K + b * stride_kb + h_kv * stride_kh
    offs_n = tl.arange(0, BLOCK_N)
    kept = tl.zeros([BLOCK_M], dtype=tl.float32)
    # The sink, then the window: contiguous keys.
    for start in range(0, sink_tokens, BLOCK_N):
        n = start + offs_n
        p = key_probabilities(
            q, k_base, n, d, d_valid, lse, seq_len, stride_kn, stride_kd, qk_scale, UPCAST,
            DOT_PRECISION,
        )  # fmt: skip
        keep = (n[None, :] < sink_tokens) & (n[None, :] <= hi[:, None])
        kept += tl.sum(tl.where(keep, p, 0.0), axis=1)
    first = (tl.min(lo, axis=0) // BLOCK_N) * BLOCK_N
    for start in range(first, tl.max(hi, axis=0) + 1, BLOCK_N):
        n = start + offs_n
        p = key_probabilities(
            q, k_base, n, d, d_valid, lse, seq_len, stride_kn, stride_kd, qk_scale, UPCAST,
            DOT_PRECISION,
        )  # fmt: skip
        keep = (n[None, :] >= lo[:, None]) & (n[None, :] <= hi[:, None])
        kept += tl.sum(tl.where(keep, p, 0.0), axis=1)
    # The group's columns before each row's window and past the sink, where the row's own
    # head selects them.
    col_list = COL_POS + pid_bh.to(tl.int64) * num_col_pos
    cols_rows = COLS + (b * num_q_heads + q_head).to(tl.int64) * seq_len
    for start in range(0, num_col_pos, BLOCK_N):
        c = start + offs_n
        n = tl.load(col_list + c, mask=c < num_col_pos, other=seq_len)
        p = key_probabilities(
            q, k_base, n, d, d_valid, lse, seq_len, stride_kn, stride_kd, qk_scale, UPCAST,
            DOT_PRECISION,
        )  # fmt: skip
        keep = (n[None, :] < win_start[:, None]) & (n[None, :] >= sink_tokens)
        keep = keep & row_valid[:, None] & (n[None, :] <= pos[:, None])
        own = tl.load(cols_rows[:, None] + n[None, :], mask=keep & (n[None, :] < seq_len), other=0)
        kept += tl.sum(tl.where(keep & (own != 0), p, 0.0), axis=1)
    tl.store(KEPT + out_offs, kept, mask=row_valid)


def launch_settings(
    q: torch.Tensor, block_m: int | None, block_n: int | None, num_warps: int | None
) -> dict:
    """Launch settings shared by the kernels: tile sizes and compile-time constants."""
    tuned = launch_config(q.device)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    D = q.shape[-1]
    head_dim_pad = max(16, triton.next_power_of_2(D))
    if block_n is None:
        # The tuned tiles hold keys of up to 128 dims; wider heads get proportionally fewer
        # keys per tile (Hopper's (64, 128) asks 256 KiB of shared memory at D=256, over
        # its 227 KiB: Gemma 3's heads).
        block_n = tuned[1] * 128 // head_dim_pad if head_dim_pad > 128 else tuned[1]
    return {
        "block_m": tuned[0] if block_m is None else block_m,
        "block_n": max(16, block_n),
        "common": {
            "HEAD_DIM": D,
            "HEAD_DIM_PAD": head_dim_pad,
            # The interpreter computes bf16/fp16 tl.dot wrongly (triton 3.9): upcast there.
            "UPCAST": interpreted,
            # float32 operands get full-precision dots, not TF32: scores must match the
            # oracle. (The setting is ignored for bf16/fp16 operands.)
            "DOT_PRECISION": "ieee" if q.dtype == torch.float32 or interpreted else "tf32",
            "num_warps": tuned[2] if num_warps is None else num_warps,
        },
    }


def _tiles_with_columns(columns: torch.Tensor, num_kv_heads: int, block_n: int) -> torch.Tensor:
    """``(B, Hkv, ceil(S / block_n))`` uint8: 1 where a query head of the kv head's group
    selects a column in that key tile (the row kernel loads the column table only there)."""
    B, Hq, S = columns.shape
    tiles = -(-S // block_n)
    grouped = columns.view(B, num_kv_heads, Hq // num_kv_heads, S).any(dim=2)
    padded = torch.nn.functional.pad(grouped, (0, tiles * block_n - S))
    return padded.view(B, num_kv_heads, tiles, block_n).any(dim=-1).to(torch.uint8).contiguous()


def _row_table(
    layout: SampleLayout, device: torch.device, rows: torch.Tensor | None
) -> torch.Tensor:
    """The row kernels' ``(G, r)`` int32 table of query positions: the layout's sampled rows,
    or ``rows`` (any positions of the layout's queries, ascending within each of the ``G``
    groups, which take the place of segments)."""
    table = layout.sampled_rows(device) if rows is None else rows
    return table.to(device=device, dtype=torch.int32).contiguous()


def _row_pass(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: SampleLayout,
    scale: float,
    settings: dict,
    rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Run ``_row_lse_kernel``: ``(lse (B, Hkv, G, r, group), rows, block_m, tiles)``."""
    B = q.shape[0]
    Hkv = k.shape[1]
    group = q.shape[1] // Hkv
    rows = _row_table(layout, q.device, rows)
    G, r = rows.shape
    block_m, tiles = _row_tiling(settings, group, r)
    lse = torch.empty(B, Hkv, G, r, group, dtype=torch.float32, device=q.device)
    _row_lse_kernel[(G * tiles, B * Hkv)](
        q,
        k,
        rows,
        lse,
        *q.stride(),
        *k.stride(),
        Hkv,
        r,
        tiles,
        G,
        scale * LOG2E,
        layout.query_start,
        GROUP=group,
        BLOCK_M=block_m,
        BLOCK_N=settings["block_n"],
        **settings["common"],
    )
    return lse, rows, block_m, tiles


def _row_tiling(settings: dict, group: int, rows_per_segment: int) -> tuple[int, int]:
    """``(block_m, tiles per segment)`` of the row kernels: block_m (row, query head) pairs
    per program, at least the GQA group."""
    # Not more pairs than a segment has (few rows per group: the tile rows of flexsample.tiles).
    block_m = min(settings["block_m"], triton.next_power_of_2(group * rows_per_segment))
    block_m = max(block_m, 16, triton.next_power_of_2(group))
    return block_m, triton.cdiv(rows_per_segment, block_m // group)


def sample_column_scores_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: SampleLayout,
    scale: float,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Per-segment sampled attention mass of each key, in two Triton launches.

    Same contract as :func:`~flexsample.sampling.reference.sample_column_scores_reference`:
    q ``(B, Hq, S, D)``, k ``(B, Hkv, S, D)`` on a CUDA device (or on CPU with
    ``TRITON_INTERPRET=1``); returns ``(B, Hq, num_segments, S)`` float32.

    ``block_m`` (a power of two) is the number of (row, query head) pairs per program of the
    log-sum-exp kernel (raised to the GQA group size when smaller) and of rows per step of the
    column kernel; ``block_n`` is the key tile width (a power of two). Each left at None comes
    from :func:`launch_config`.
    """
    return sample_scores_and_lse_triton(
        q, k, layout, scale, block_m=block_m, block_n=block_n, num_warps=num_warps
    )[0]


def sample_scores_and_lse_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: SampleLayout,
    scale: float,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sample_column_scores_triton` and the sampled rows' log-sum-exp it computed on
    the way, ``(B, Hkv, num_segments, rows_per_segment, group)`` float32 in log2 units of the
    scaled logits: what :func:`row_kept_mass_triton` needs, so the cover skips that pass."""
    settings = launch_settings(q, block_m, block_n, num_warps)
    B, Hq = q.shape[:2]
    S = k.shape[2]
    Hkv = k.shape[1]
    group = Hq // Hkv
    G, r = layout.num_segments, layout.rows_per_segment
    lse, rows, block_m, _ = _row_pass(q, k, layout, scale, settings)
    out = torch.zeros(B, Hkv, group, G, S, dtype=torch.float32, device=q.device)
    block_n = settings["block_n"]
    _column_mass_kernel[(triton.cdiv(S, block_n), G, B * Hkv)](
        q,
        k,
        rows,
        lse,
        out,
        *q.stride(),
        *k.stride(),
        S,
        layout.query_start,
        Hkv,
        r,
        G,
        scale * LOG2E,
        1.0 / r,
        GROUP=group,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        **settings["common"],
    )
    return out.view(B, Hq, G, S), lse


def _measure_setup(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: SampleLayout,
    scale: float,
    lse: torch.Tensor | None,
    rows: torch.Tensor | None = None,
) -> tuple[dict, torch.Tensor, torch.Tensor, int, int]:
    """What the cover's row kernels share: ``(settings, lse, rows, block_m, tiles)``, the
    log-sum-exp pass run here where ``lse`` is None."""
    settings = launch_settings(q, None, None, None)
    if lse is None:
        lse, rows, _, _ = _row_pass(q, k, layout, scale, settings, rows)
    else:
        rows = _row_table(layout, q.device, rows)
    group = q.shape[1] // k.shape[1]
    block_m, tiles = _row_tiling(settings, group, rows.shape[1])
    return settings, lse, rows, block_m, tiles


def _kernel_row_order(rows: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``(B, Hq, G, r)`` per-row values as the row kernels index them, ``(B, Hkv, G, r,
    group)`` int32 (what :func:`_per_query_head` undoes)."""
    B, Hq, G, r = rows.shape
    grouped = rows.view(B, num_kv_heads, Hq // num_kv_heads, G, r).permute(0, 1, 3, 4, 2)
    return grouped.to(torch.int32).contiguous()


def _per_query_head(rows: torch.Tensor) -> torch.Tensor:
    """A row kernel's ``(B, Hkv, G, r, group)`` output as ``(B, Hq, G, r)``."""
    B, Hkv, G, r, group = rows.shape
    return rows.permute(0, 1, 4, 2, 3).reshape(B, Hkv * group, G, r)


def row_kept_mass_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: SampleLayout,
    scale: float,
    window_start: torch.Tensor,
    columns: torch.Tensor,
    lse: torch.Tensor | None = None,
    only: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Share of each sampled row's exact attention mass that its head's mask keeps, and the
    probability of the heaviest key it misses.

    One pass over the keys between the sink and each row's window, per GQA group
    (``_row_missing_kernel``), given the rows' log-sum-exp; without ``lse``, the log-sum-exp
    pass runs first. The twin of the torch measurement in :func:`flexsample.cover.cover_rows`.

    Args:
        q: ``(B, Hq, S, D)`` queries on CUDA (or CPU under ``TRITON_INTERPRET=1``).
        k: ``(B, Hkv, S, D)`` keys.
        layout: the geometry (sampled rows, block size, sink).
        scale: softmax scale.
        window_start: ``(B, Hq, num_segments, rows_per_segment)`` int, the first key of
            each sampled row's window (:meth:`~flexsample.patterns.Pattern.row_tables`).
        columns: ``(B, Hq, S)`` bool, the columns each query head reads.
        lse: the sampled rows' log-sum-exp from :func:`sample_scores_and_lse_triton` on the
            same q, k, layout and scale (None: computed here).
        only: ``(B, Hq, num_segments, rows_per_segment)`` bool, the rows to measure (None:
            all). Programs whose tile of rows holds none of them skip the pass over the keys:
            the cover measures only the rows it found short.

    Returns:
        ``(kept, heaviest_missing)``, each ``(B, Hq, num_segments, rows_per_segment)``
        float32; with ``only``, NaN and 0 for the rows not measured.
    """
    B, Hq, _, _ = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    G, r = layout.num_segments, layout.rows_per_segment
    settings, lse, rows, block_m, tiles = _measure_setup(q, k, layout, scale, lse)
    missed, miss = torch.empty_like(lse), torch.empty_like(lse)
    flags = missed  # any tensor: not read without HAS_ONLY
    if only is not None:
        if only.shape != (B, Hq, G, r):
            raise ValueError(f"only must have shape {(B, Hq, G, r)}, got {tuple(only.shape)}")
        flags = _kernel_row_order(only, Hkv).to(torch.uint8)
    _row_missing_kernel[(G * tiles, B * Hkv)](
        q,
        k,
        rows,
        lse,
        _kernel_row_order(window_start, Hkv),
        columns.contiguous().view(torch.uint8),
        _tiles_with_columns(columns, Hkv, settings["block_n"]),
        missed,
        miss,
        flags,
        *q.stride(),
        *k.stride(),
        Hkv,
        r,
        tiles,
        G,
        scale * LOG2E,
        layout.seq_len,
        layout.query_start,
        layout.sink_tokens,
        GROUP=group,
        BLOCK_M=block_m,
        BLOCK_N=settings["block_n"],
        HAS_ONLY=only is not None,
        **settings["common"],
    )
    missed, miss = _per_query_head(missed), _per_query_head(miss)
    kept = (1.0 - missed).clamp_(min=0.0)
    if only is not None:
        kept.masked_fill_(~only, float("nan"))
        miss.masked_fill_(~only, 0.0)
    return kept, miss


def group_column_positions(columns: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``(B, Hkv, C)`` int32: the keys any query head of each kv group selects as a column,
    ascending, padded with ``S`` to the longest group's count ``C`` (at least 1). Reads that
    count on the host."""
    B, Hq, S = columns.shape
    grouped = columns.view(B, num_kv_heads, Hq // num_kv_heads, S).any(dim=2)
    count = max(1, int(grouped.sum(dim=-1).max()))
    keys = torch.arange(S, device=columns.device, dtype=torch.int32)
    listed = torch.where(grouped, keys, S).to(torch.int32)
    return listed.topk(count, dim=-1, largest=False, sorted=True).values.contiguous()


def row_kept_mass_sparse_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: SampleLayout,
    scale: float,
    window_start: torch.Tensor,
    columns: torch.Tensor,
    lse: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Share of each sampled row's exact attention mass that its head's mask keeps, summed
    over the keys the mask keeps (``_row_kept_kernel``: the sink, the window and the kv
    group's columns): a few key tiles per row where masks are sparse, against
    :func:`row_kept_mass_triton`'s pass over every key before the window. Same arguments;
    returns ``kept`` alone, ``(B, Hq, num_segments, rows_per_segment)`` float32.

    ``rows``: ``(G, r)`` query positions measured instead of the sampled rows (ascending
    within each group; the shapes above then read ``G`` and ``r``), with ``lse`` from
    :func:`row_lse_triton` on the same rows."""
    B, Hkv = q.shape[0], k.shape[1]
    group = q.shape[1] // Hkv
    settings, lse, rows, block_m, tiles = _measure_setup(q, k, layout, scale, lse, rows)
    G, r = rows.shape
    positions = group_column_positions(columns, Hkv)
    kept = torch.empty_like(lse)
    _row_kept_kernel[(G * tiles, B * Hkv)](
        q,
        k,
        rows,
        lse,
        _kernel_row_order(window_start, Hkv),
        columns.contiguous().view(torch.uint8),
        positions,
        kept,
        *q.stride(),
        *k.stride(),
        Hkv,
        r,
        tiles,
        G,
        scale * LOG2E,
        layout.seq_len,
        layout.query_start,
        layout.sink_tokens,
        positions.shape[-1],
        GROUP=group,
        BLOCK_M=block_m,
        BLOCK_N=settings["block_n"],
        **settings["common"],
    )
    return _per_query_head(kept).clamp_(max=1.0)


def row_lse_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: SampleLayout,
    scale: float,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """The sampled rows' log-sum-exp, ``(B, Hkv, num_segments, rows_per_segment, group)``
    float32 in log2 units of the scaled logits (``_row_lse_kernel``): the ``lse`` of
    :func:`row_kept_mass_triton` and :func:`row_kept_mass_sparse_triton`. ``rows``: a
    ``(G, r)`` table of query positions instead of the sampled rows (ascending within each
    group)."""
    return _row_pass(q, k, layout, scale, launch_settings(q, None, None, None), rows)[0]
