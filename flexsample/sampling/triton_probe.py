"""The probe (stage 0) in four Triton launches: what each probed row needs, without a sort.

The torch probe (:func:`flexsample.probe.probe_density`) computes the probed rows'
probabilities, sorts each row and counts the heaviest keys that hold ``alpha`` of its mass:
about forty-five small operations, each a launch, mostly host time on a GPU: more than the
probe may cost (:data:`~flexsample.tuning.PROBE_SHARE`) at lengths where sparse pays. These
kernels take a fraction of it (``docs/tuning.md``).

Each probed row's mass is histogrammed instead of sorted. The rows are few (one per
segment, of one query head per kv group), so every program takes all of them against one
chunk of keys:

* ``_probe_lse_kernel``: each row's running max and sum of ``exp2`` over the chunk (a
  partial log-sum-exp, combined by the next kernels as split-K FlashAttention does).
* ``_probe_histogram_kernel``: the rows' probabilities in the chunk, summed (mass and key
  count) into :data:`LEVELS_PER_OCTAVE` bins per halving of the probability, heaviest first
  (only over the bins the tile's keys fall in).
* ``_probe_reach_kernel``: from the whole histogram, each row's threshold (the bin where
  the heavier keys' mass reaches ``alpha``, interpolated within it) and its count of
  needed keys; then, per key of the chunk, how many blocks before the furthest row's block
  it lies where some row needs it (the probe's ``reach``), and from that each window
  candidate's column pairs over the chunk.
* ``_probe_estimate_kernel``: per kv head, the cheapest candidate's window and column
  pairs against the rows' fewest-keys share: the estimate, written for every query head of
  the group.

The count and the threshold are exact up to the keys of one bin (probabilities within a
factor ``2 ** (1 / LEVELS_PER_OCTAVE)``), where the fewest-keys count is interpolated by
mass: the tests hold it to the torch probe within that. Keys lighter than ``(1 - alpha) /
S`` cannot hold ``alpha`` between them, so the bins stop there (the last one holds every
lighter key), and ``alpha = 1`` needs every nonzero key. Each output element is written by
one program in a fixed order: deterministic (no atomics).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..layout import SampleLayout, window_candidate_tables
from ..tuning import MAX_TRITON_PROBE_ROWS
from .triton_kernel import LOG2E, key_probabilities, key_scores, launch_settings

#: Bins per halving of the probability: a bin spans a factor of 2 ** (1/4), about 19%.
LEVELS_PER_OCTAVE = 4
#: Bins in all (compile-time): 32 halvings, to 2 ** -32.
LEVELS = 128
#: Chunks of keys per kv head: about this many (each program reads the whole histogram of
#: its rows over all chunks once).
TARGET_CHUNKS = 32


@triton.jit
def _probe_rows(
    Q, POS, pid_u, num_kv_heads, group, num_rows, query_start,
    stride_qb, stride_qh, stride_qm, stride_qd,
    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    # A probe program's rows: every probed row of the first query head of kv head pid_u's
    # group.
    # 64-bit: batch and head offsets of long inputs pass 2**31 elements.
    b = (pid_u // num_kv_heads).to(tl.int64)
    h_kv = (pid_u % num_kv_heads).to(tl.int64)
    r = tl.arange(0, BLOCK_M)
    valid = r < num_rows
    pos = tl.load(POS + r, mask=valid, other=0)
    d = tl.arange(0, HEAD_DIM_PAD)
    d_valid = d < HEAD_DIM
    q = tl.load(
        Q
        + b * stride_qb
        + (h_kv * group) * stride_qh
        + (pos - query_start)[:, None] * stride_qm
        + d[None, :] * stride_qd,
        mask=valid[:, None] & d_valid[None, :],
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    return b, h_kv, r, valid, pos, q, d, d_valid


@triton.jit
def _probe_lse_kernel(
    Q, K, POS, PART,
    stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
    num_kv_heads, group, num_rows, seq_len, query_start, num_chunks, chunk, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid_c = tl.program_id(0)
    pid_u = tl.program_id(1)
    b, h_kv, r, _, pos, q, d, d_valid = _probe_rows(
        Q, POS, pid_u, num_kv_heads, group, num_rows, query_start,
        stride_qb, stride_qh, stride_qm, stride_qd, BLOCK_M, HEAD_DIM, HEAD_DIM_PAD, UPCAST,
    )  # fmt: skip
    k_base = K + b * stride_kb + h_kv * stride_kh
    offs_n = tl.arange(0, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # scaled, log2 units
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    start0 = pid_c * chunk
    end = tl.minimum(start0 + chunk, tl.max(pos, axis=0) + 1)  # no row reads past its own
    for start in range(start0, end, BLOCK_N):
        n = start + offs_n
        s = key_scores(
            q, k_base, n, seq_len, d, d_valid, stride_kn, stride_kd, UPCAST, DOT_PRECISION
        )
        s = tl.where(n[None, :] <= pos[:, None], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row before every key of this tile stays at -inf: exponents from 0 there.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), axis=1)
        m_i = m_new
    out = (pid_u * num_chunks + pid_c) * BLOCK_M + r
    tl.store(PART + out, m_i)
    tl.store(PART + num_chunks * tl.num_programs(1) * BLOCK_M + out, l_i)


@triton.jit
def _probe_lse(PART, pid_u, num_units, num_chunks, r, BLOCK_M: tl.constexpr):
    # The rows' log-sum-exp (log2 units of the scaled logits) from every chunk's partial.
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    for c in range(0, num_chunks):
        at = (pid_u * num_chunks + c) * BLOCK_M + r
        m_c = tl.load(PART + at)
        l_c = tl.load(PART + num_chunks * num_units * BLOCK_M + at)
        m_new = tl.maximum(m, m_c)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        total = total * tl.exp2(m - m_safe) + l_c * tl.exp2(m_c - m_safe)
        m = m_new
    return m + tl.log2(total)


@triton.jit
def _probe_program(
    Q, K, POS, PART, stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh,
    num_kv_heads, group, num_rows, query_start, num_chunks,
    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    # The histogram's and the reach kernel's program: its chunk, kv head, rows and their
    # log-sum-exp, and its kv head's keys.
    pid_c = tl.program_id(0)
    pid_u = tl.program_id(1)
    num_units = tl.num_programs(1)
    b, h_kv, r, valid, pos, q, d, d_valid = _probe_rows(
        Q, POS, pid_u, num_kv_heads, group, num_rows, query_start,
        stride_qb, stride_qh, stride_qm, stride_qd, BLOCK_M, HEAD_DIM, HEAD_DIM_PAD, UPCAST,
    )  # fmt: skip
    lse = _probe_lse(PART, pid_u, num_units, num_chunks, r, BLOCK_M)
    k_base = K + b * stride_kb + h_kv * stride_kh
    return pid_c, pid_u, num_units, r, valid, pos, q, d, d_valid, lse, k_base


@triton.jit
def _chunk_probabilities(
    q, k_base, n, pos, valid, lse, seq_len, d, d_valid, stride_kn, stride_kd, qk_scale,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    # The rows' probabilities of the keys at n (0 past a row's own position).
    p = key_probabilities(
        q, k_base, n, d, d_valid, lse, seq_len, stride_kn, stride_kd, qk_scale, UPCAST,
        DOT_PRECISION,
    )  # fmt: skip
    return tl.where((n[None, :] <= pos[:, None]) & valid[:, None], p, 0.0)


@triton.jit
def _probe_histogram_kernel(
    Q, K, POS, PART, HIST,
    stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
    num_kv_heads, group, num_rows, seq_len, query_start, num_chunks, chunk, qk_scale,
    num_levels,
    LEVELS: tl.constexpr, PER_OCTAVE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid_c, pid_u, num_units, r, valid, pos, q, d, d_valid, lse, k_base = _probe_program(
        Q, K, POS, PART, stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh,
        num_kv_heads, group, num_rows, query_start, num_chunks,
        BLOCK_M, HEAD_DIM, HEAD_DIM_PAD, UPCAST,
    )  # fmt: skip
    offs_n = tl.arange(0, BLOCK_N)
    level = tl.arange(0, LEVELS)
    mass = tl.zeros([BLOCK_M, LEVELS], dtype=tl.float32)
    count = tl.zeros([BLOCK_M, LEVELS], dtype=tl.float32)
    start0 = pid_c * chunk
    end = tl.minimum(start0 + chunk, tl.max(pos, axis=0) + 1)
    for start in range(start0, end, BLOCK_N):
        n = start + offs_n
        p = _chunk_probabilities(
            q, k_base, n, pos, valid, lse, seq_len, d, d_valid, stride_kn, stride_kd,
            qk_scale, UPCAST, DOT_PRECISION,
        )  # fmt: skip
        # Bin i holds probabilities in (2^-(i+1)/PER_OCTAVE, 2^-i/PER_OCTAVE]; the last bin
        # every lighter nonzero one; zeros (masked keys) none.
        light = -tl.log2(tl.where(p > 0, p, 1.0)) * PER_OCTAVE
        bins = tl.minimum(tl.floor(light), num_levels - 1).to(tl.int32)
        # Only the bins this tile's keys fall in (a tile far from every row's heavy keys
        # spans a few octaves, not all of them).
        lo = tl.min(tl.min(tl.where(p > 0, bins, LEVELS), axis=1), axis=0)
        hi = tl.max(tl.max(tl.where(p > 0, bins, -1), axis=1), axis=0)
        bins = tl.where(p > 0, bins, LEVELS)
        for i in range(lo, hi + 1):
            here = bins == i
            m_i = tl.sum(tl.where(here, p, 0.0), axis=1)
            c_i = tl.sum(here.to(tl.float32), axis=1)
            mass = tl.where(level[None, :] == i, mass + m_i[:, None], mass)
            count = tl.where(level[None, :] == i, count + c_i[:, None], count)
    out = ((pid_u * num_chunks + pid_c) * BLOCK_M + r)[:, None] * LEVELS + level[None, :]
    tl.store(HIST + out, mass)
    tl.store(HIST + num_chunks * num_units * BLOCK_M * LEVELS + out, count)


@triton.jit
def _probe_reach_kernel(
    Q, K, POS, PART, HIST, COUNTS, REACH,
    stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
    num_kv_heads, group, num_rows, seq_len, query_start, num_chunks, chunk, qk_scale,
    num_levels, alpha, sink_tokens, block_size, CANDIDATES, num_candidates,
    LEVELS: tl.constexpr, PER_OCTAVE: tl.constexpr, ESTIMATE: tl.constexpr,
    CANDIDATES_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    # ESTIMATE: instead of each key's reach (REACH (units, S)), the column pairs each
    # window candidate would compute for this chunk's needed keys (REACH (units, chunks,
    # CANDIDATES_PAD) int64), as flexsample.probe weighs them.
    pid_c, pid_u, num_units, r, valid, pos, q, d, d_valid, lse, k_base = _probe_program(
        Q, K, POS, PART, stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh,
        num_kv_heads, group, num_rows, query_start, num_chunks,
        BLOCK_M, HEAD_DIM, HEAD_DIM_PAD, UPCAST,
    )  # fmt: skip
    level = tl.arange(0, LEVELS)
    mass = tl.zeros([BLOCK_M, LEVELS], dtype=tl.float32)
    count = tl.zeros([BLOCK_M, LEVELS], dtype=tl.float32)
    for c in range(0, num_chunks):
        at = ((pid_u * num_chunks + c) * BLOCK_M + r)[:, None] * LEVELS + level[None, :]
        mass += tl.load(HIST + at)
        count += tl.load(HIST + num_chunks * num_units * BLOCK_M * LEVELS + at)
    # The heavier bins' mass and keys, bin by bin from the heaviest.
    held = tl.cumsum(mass, axis=1)
    keys = tl.cumsum(count, axis=1)
    # The first bin where the mass reaches alpha (the last one where rounding leaves every
    # bin short of it, e.g. alpha = 1: every nonzero key).
    reached = (held >= alpha) & (level[None, :] < num_levels)
    first = tl.min(tl.where(reached, level[None, :], num_levels - 1), axis=1)
    at_first = level[None, :] == first[:, None]
    before = level[None, :] == (first - 1)[:, None]
    held_before = tl.sum(tl.where(before, held, 0.0), axis=1)
    keys_before = tl.sum(tl.where(before, keys, 0.0), axis=1)
    bin_mass = tl.sum(tl.where(at_first, mass, 0.0), axis=1)
    bin_keys = tl.sum(tl.where(at_first, count, 0.0), axis=1)
    # Within the bin, the share of its mass still needed (its keys taken heaviest first,
    # assumed alike): that share of its keys, and a threshold as far into the bin.
    share = tl.where(bin_mass > 0, (alpha - held_before) / tl.maximum(bin_mass, 1e-30), 1.0)
    share = tl.minimum(tl.maximum(share, 0.0), 1.0)
    needed = tl.maximum(keys_before + tl.ceil(share * bin_keys), 1.0)
    last = first == num_levels - 1
    threshold = tl.where(last, 0.0, tl.exp2(-(first.to(tl.float32) + share) / PER_OCTAVE))
    needed = tl.where(last, keys_before + bin_keys, needed)
    if pid_c == 0:
        tl.store(COUNTS + pid_u * num_rows + r, needed.to(tl.int64), mask=valid)
    # reach: per key, the most blocks a row needing it lies after it

    offs_n = tl.arange(0, BLOCK_N)
    row_block = pos // block_size
    cand = tl.arange(0, CANDIDATES_PAD)
    windows = tl.load(CANDIDATES + cand, mask=cand < num_candidates, other=0)
    pairs = tl.zeros([CANDIDATES_PAD], dtype=tl.int64)
    start0 = pid_c * chunk
    for start in range(start0, tl.minimum(start0 + chunk, seq_len), BLOCK_N):
        n = start + offs_n
        p = _chunk_probabilities(
            q, k_base, n, pos, valid, lse, seq_len, d, d_valid, stride_kn, stride_kd,
            qk_scale, UPCAST, DOT_PRECISION,
        )  # fmt: skip
        need = (p >= threshold[:, None]) & (p > 0) & (n[None, :] >= sink_tokens)
        reach = tl.max(tl.where(need, row_block[:, None] - n[None, :] // block_size, -1), axis=0)
        if ESTIMATE:
            # A key a row needs from further back than a window of w blocks is a column of
            # that window: every query past its block + w reads it (selection.column_readers).
            first_reader = (n[None, :] // block_size + windows[:, None] + 1) * block_size
            readers = tl.maximum(seq_len - tl.maximum(first_reader, query_start), 0)
            column = (reach[None, :] > windows[:, None]) & (n[None, :] < seq_len)
            pairs += tl.sum(tl.where(column, readers, 0).to(tl.int64), axis=1)
        else:
            tl.store(REACH + pid_u * seq_len + n, reach, mask=n < seq_len)
    if ESTIMATE:
        tl.store(REACH + (pid_u * num_chunks + pid_c) * CANDIDATES_PAD + cand, pairs)


@triton.jit
def _probe_estimate_kernel(
    COUNTS, PAIRS, WINDOW, OUT, num_rows, num_chunks, num_candidates, num_kv_heads, group,
    lengths, causal_pairs,
    CANDIDATES_PAD: tl.constexpr, ROWS_PAD: tl.constexpr, GROUP_PAD: tl.constexpr,
):  # fmt: skip
    # Per kv head (one program): the larger of the rows' fewest-keys share and the cheapest
    # candidate's window + column pairs over the causal pairs, for every head of its group.
    pid_u = tl.program_id(0)
    r = tl.arange(0, ROWS_PAD)
    counts = tl.load(COUNTS + pid_u * num_rows + r, mask=r < num_rows, other=0)
    least = tl.sum(counts, axis=0).to(tl.float32) / lengths
    cand = tl.arange(0, CANDIDATES_PAD)
    pairs = tl.load(WINDOW + cand, mask=cand < num_candidates, other=0)
    for c in range(0, num_chunks):
        pairs += tl.load(PAIRS + (pid_u * num_chunks + c) * CANDIDATES_PAD + cand)
    pairs = tl.where(cand < num_candidates, pairs, tl.cast(1, tl.int64) << 62)
    best = tl.min(pairs, axis=0).to(tl.float32) / causal_pairs
    density = tl.maximum(least, tl.minimum(best, 1.0))
    j = tl.arange(0, GROUP_PAD)
    b = pid_u // num_kv_heads
    h_kv = pid_u % num_kv_heads
    heads = num_kv_heads * group
    tl.store(OUT + b * heads + h_kv * group + j, tl.zeros([GROUP_PAD], tl.float32) + density,
             mask=j < group)  # fmt: skip


def probe_needs_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: SampleLayout,
    rows: torch.Tensor,
    alpha: float,
    scale: float,
    *,
    block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the probed rows need, as :func:`flexsample.probe.probe_density` weighs it (its
    torch path's ``counts`` and ``reach``; the plan's probe folds them into
    :func:`probe_density_triton`).

    Args:
        q: ``(B, Hq, L, D)``; the first query head of each kv group is probed.
        k: ``(B, Hkv, S, D)`` on a CUDA device (or on CPU with ``TRITON_INTERPRET=1``).
        layout: the geometry (sink, block size, the first query's position).
        rows: ``(R,)`` int64 positions of the probed rows on q's device, ``R <=``
            :data:`~flexsample.tuning.MAX_TRITON_PROBE_ROWS`.
        alpha: the share of each row's mass its needed keys hold.
        scale: softmax scale.
        block_n: key tile width (default: the sampler's).

    Returns:
        ``(counts (B * Hkv, R) int64, reach (B * Hkv, S) int32)``: each row's fewest keys
        holding ``alpha`` (up to a bin, see the module), and per key the most blocks any
        row's block lies after it where that row needs it (-1: no row needs it, or it is a
        sink key).
    """
    counts, reach, _ = _probe(q, k, layout, rows, alpha, scale, block_n, estimate=False)
    return counts, reach


def probe_density_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: SampleLayout,
    rows: torch.Tensor,
    alpha: float,
    scale: float,
    lengths: float,
    *,
    block_n: int | None = None,
) -> torch.Tensor:
    """:func:`flexsample.probe.probe_density`'s estimate in four launches: the three kernels
    with the window candidates' column pairs summed per chunk in the last, then one program
    per kv head for the cheapest candidate (no torch operation between them: on a GPU each
    costs the host about as much as the probe's work).

    Args: as :func:`probe_needs_triton`, and ``lengths``, the probed rows' causal lengths
    summed.

    Returns:
        ``(B, Hq)`` float32 in ``(0, 1]``, every query head of a group its kv head's.
    """
    B, Hq = q.shape[:2]
    Hkv = k.shape[1]
    counts, pairs, chunks = _probe(q, k, layout, rows, alpha, scale, block_n, estimate=True)
    candidates, window = window_candidate_tables(layout, q.device)
    out = torch.empty(B, Hq, dtype=torch.float32, device=q.device)
    R = rows.numel()
    _probe_estimate_kernel[(B * Hkv,)](
        counts, pairs, window, out, R, chunks, candidates.numel(), Hkv, Hq // Hkv,
        float(lengths), float(layout.causal_pairs),
        CANDIDATES_PAD=pairs.shape[-1], ROWS_PAD=triton.next_power_of_2(R),
        GROUP_PAD=triton.next_power_of_2(Hq // Hkv),
    )  # fmt: skip
    return out


def _probe(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: SampleLayout,
    rows: torch.Tensor,
    alpha: float,
    scale: float,
    block_n: int | None,
    *,
    estimate: bool,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The three kernels: ``(counts, reach or the candidates' pairs per chunk, chunks)``."""
    B, Hq = q.shape[:2]
    Hkv, S = k.shape[1], k.shape[2]
    R = rows.numel()
    if not 1 <= R <= MAX_TRITON_PROBE_ROWS:
        raise ValueError(f"the Triton probe takes 1 to {MAX_TRITON_PROBE_ROWS} rows, got {R}")
    settings = launch_settings(q, None, block_n, None)
    block_n = settings["block_n"]
    block_m = max(16, triton.next_power_of_2(R))
    chunk = max(block_n, triton.next_power_of_2(triton.cdiv(S, TARGET_CHUNKS)))
    chunks = triton.cdiv(S, chunk)
    units = B * Hkv
    # Keys lighter than (1 - alpha) / S hold less than 1 - alpha between them: no bin below.
    lightest = max(1.0 - alpha, 1e-9) / S
    levels = min(LEVELS, math.ceil(-math.log2(lightest) * LEVELS_PER_OCTAVE) + 2)
    candidates, _ = window_candidate_tables(layout, q.device)
    candidates_pad = max(2, triton.next_power_of_2(candidates.numel()))
    dev = q.device
    part = torch.empty(2, units, chunks, block_m, dtype=torch.float32, device=dev)
    hist = torch.empty(2, units, chunks, block_m, LEVELS, dtype=torch.float32, device=dev)
    counts = torch.empty(units, R, dtype=torch.int64, device=dev)
    if estimate:
        reach = torch.empty(units, chunks, candidates_pad, dtype=torch.int64, device=dev)
    else:
        reach = torch.empty(units, S, dtype=torch.int32, device=dev)
    common = (
        *q.stride(), *k.stride(), Hkv, Hq // Hkv, R, S, layout.query_start, chunks, chunk,
        scale * LOG2E,
    )  # fmt: skip
    tiles = {"BLOCK_M": block_m, "BLOCK_N": block_n, **settings["common"]}
    levels_args = {"LEVELS": LEVELS, "PER_OCTAVE": LEVELS_PER_OCTAVE}
    grid = (chunks, units)
    _probe_lse_kernel[grid](q, k, rows, part, *common, **tiles)
    _probe_histogram_kernel[grid](q, k, rows, part, hist, *common, levels, **levels_args, **tiles)
    _probe_reach_kernel[grid](
        q, k, rows, part, hist, counts, reach, *common, levels, float(alpha),
        layout.sink_tokens, layout.block_size, candidates, candidates.numel(),
        ESTIMATE=estimate, CANDIDATES_PAD=candidates_pad, **levels_args, **tiles,
    )  # fmt: skip
    return counts, reach, chunks
