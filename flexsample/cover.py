"""Stage 2b — the per-row guarantee: every sampled row keeps ``alpha`` of its own mass.

:func:`~flexsample.selection.select_columns` covers each segment's *mean* sampled row; a row
whose heavy keys differ from its segment's can keep less. This stage measures, for every
sampled row, the share of its exact causal attention mass that its head's mask keeps (window,
sink and its own columns: what the attention call reads), and where that is below
``alpha`` adds the row's own heaviest missing keys until it is not (the paper's cumulative
residual attention, per row), skipping keys too light to matter (:data:`KEY_FLOOR_DIVISOR`).

The measurement runs in Triton row kernels on CUDA, reusing the sampler's log-sum-exp: first
over the keys each row's mask keeps (sink, window, columns), then, for the rows that come
out short (programs holding none of them skip it), a pass over every key before each row's
window that also finds its heaviest missed key; or in chunked torch (float64 with the
reference sampler). The repair runs in torch on the short rows only, all heads' together
(:func:`repair_rows`: a few dozen operations whatever the batch and heads, not a loop per kv
head). Memory stays ``chunk x S`` per step, never ``rows x S``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .patterns import Pattern
from .sampling.torch_sampler import (
    DEFAULT_MAX_CHUNK_ELEMS,
    chunk_probabilities,
    cpu_compiled,
    grouped_probabilities,
)
from .tuning import COVER_FIRST_KEYS, KEY_FLOOR_DIVISOR


@dataclass(frozen=True, eq=False)
class RowCover:
    """The result of :func:`cover_rows`.

    Attributes:
        selection: the input pattern with the keys added for the repaired rows
            (:meth:`~flexsample.patterns.Pattern.with_keys`).
        row_mass: ``(B, Hq, num_segments, rows_per_segment)`` float32, each sampled row's
            kept share of its mass: measured before the repair, plus the mass of the keys
            the repair added for that row. A lower bound on the final mask (a column added
            for one row also serves others); below ``alpha`` only where the rest of the
            row's mass is spread over keys under the floor.
        repaired: ``(B, Hq)`` int64, sampled rows of each head that got keys added.
    """

    selection: Pattern
    row_mass: torch.Tensor
    repaired: torch.Tensor


def key_floor(alpha: float) -> float:
    """The lightest key a repair adds, as a share of the row's mass."""
    return (1.0 - alpha) / KEY_FLOOR_DIVISOR


def chunk_kept_mass(
    q_rows: torch.Tensor, keys: torch.Tensor, pos: torch.Tensor, keep: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The share of each of a chunk of rows' (of heads sharing one kv head) mass that its
    head's mask keeps, and the heaviest probability it misses: the torch twin of
    :func:`~flexsample.sampling.triton_kernel.row_kept_mass_triton`.

    Args:
        q_rows: ``(c, D)`` queries, already multiplied by the softmax scale.
        keys: ``(W, D)`` the key prefix the chunk needs (``W > max(pos)``).
        pos: ``(c,)`` query positions.
        keep: ``(c, W)`` bool, the keys each row's mask keeps
            (:meth:`~flexsample.patterns.Pattern.keep_heads`).

    Returns:
        ``(kept (c,), heaviest_missing (c,))``.
    """
    p = chunk_probabilities(q_rows, keys, pos)
    return (p * keep).sum(dim=-1), p.masked_fill(keep, 0).amax(dim=-1)


def cover_row_chunk(
    p: torch.Tensor, keep: torch.Tensor, kept: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fewest keys that raise each row's kept mass to ``alpha``, heaviest first.

    Args:
        p: ``(c, W)`` each row's attention probabilities (rows sum to 1).
        keep: ``(c, W)`` bool, the keys the mask keeps for each row.
        kept: ``(c,)`` the mass ``keep`` holds, below ``alpha``.
        alpha: the share of its mass every row must keep.

    Returns:
        ``(gained (c,), add (c, W) bool)``: the mass added to each row, and its keys; keys
        below the floor (``(1 - alpha) / KEY_FLOOR_DIVISOR``) are never added.
    """
    missing = p.masked_fill(keep, 0)
    need = alpha - kept
    floor = key_floor(alpha)
    W = missing.shape[-1]
    rows = None  # the rows still searched (None: all, on the first search, which sets
    # gained and add for every row; later searches overwrite the rows they take up)
    for probe in (COVER_FIRST_KEYS, 4 * COVER_FIRST_KEYS, W):
        part = missing if rows is None else missing[rows]
        part_need = need if rows is None else need[rows]
        top, index = part.topk(min(probe, W), dim=-1)
        # A row is done when its heaviest missing keys reach alpha, or take every key above
        # the floor; the others search again with more keys (the last search sorts them all).
        final = probe >= W
        enough = (top.sum(dim=-1) >= part_need) | (top[:, -1] <= floor) | final
        before = top.cumsum(dim=-1) - top  # mass of the heavier keys
        take = (before < part_need[:, None]) & (top > floor) & enough[:, None]
        part_add = torch.zeros_like(part, dtype=torch.bool).scatter_(-1, index, take)
        part_gained = (top * take).sum(dim=-1)
        if rows is None:
            gained, add = part_gained, part_add
        else:
            gained[rows], add[rows] = part_gained, part_add
        if final:
            break
        left = (~enough).nonzero().squeeze(-1)  # one read on the host per search
        if not left.numel():
            break
        rows = left if rows is None else rows[left]
    return gained, add


def cover_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    selection: Pattern,
    alpha: float,
    scale: float,
    sampler: str,
    *,
    max_chunk_elems: int | None = None,
    row_lse: torch.Tensor | None = None,
) -> RowCover:
    """Make every sampled row keep at least ``alpha`` of its attention mass.

    Two steps: measure every sampled row's kept share and its heaviest missed key (Triton row
    kernels, or chunked torch), then repair the rows that are short and have a key above the
    floor to add, all of them together (:func:`repair_rows`).

    Args:
        q: ``(B, Hq, L, D)`` queries (the last ``L`` of the ``S`` positions).
        k: ``(B, Hkv, S, D)`` keys.
        selection: from :func:`~flexsample.selection.select_columns`.
        alpha: CRA threshold in ``(0, 1]``.
        scale: softmax scale.
        sampler: the resolved stage-1 implementation: ``"triton"`` measures in the Triton
            row kernel, ``"torch"`` in chunked float32 torch, ``"reference"`` in float64.
        max_chunk_elems: bound on the elements of one probability chunk (default 2M on
            CPU, 32M on CUDA).
        row_lse: with the Triton sampler, the sampled rows' log-sum-exp from its first pass
            (:func:`~flexsample.sampling.run_sampler_with_lse` on the same q, k and layout):
            the measurement then skips that pass. Ignored by the other samplers.

    Returns:
        A :class:`RowCover`.
    """
    layout = selection.layout
    B, Hq = q.shape[:2]
    G, r = layout.num_segments, layout.rows_per_segment
    dtype = torch.float64 if sampler == "reference" else torch.float32
    if max_chunk_elems is None:  # GPUs have the memory for far fewer, larger steps
        max_chunk_elems = DEFAULT_MAX_CHUNK_ELEMS * (16 if q.device.type == "cuda" else 1)
    if sampler == "triton":
        kept, heaviest = _measure_triton(q, k, selection, alpha, scale, row_lse)
    else:
        kept, heaviest = _measure_torch(q, k, selection, scale, dtype, max_chunk_elems)
    # The rows to repair: short, with a key above the floor to add (one read on the host).
    repairable = (kept < alpha) & (heaviest > key_floor(alpha))
    b_idx, h_idx, r_idx = repairable.nonzero().unbind(-1)
    added = torch.zeros(B, Hq, layout.seq_len, dtype=torch.bool, device=q.device)
    repaired = torch.zeros(B, Hq, dtype=torch.int64, device=q.device)
    if b_idx.numel():
        rows_kept = repair_rows(
            q, k, selection, alpha, scale, (b_idx, h_idx, r_idx), added, repaired,
            dtype=dtype, max_chunk_elems=max_chunk_elems,
        )  # fmt: skip
        kept[b_idx, h_idx, r_idx] = rows_kept.float()
    covered = selection.with_keys(added)
    return RowCover(selection=covered, row_mass=kept.view(B, Hq, G, r), repaired=repaired)


def _measure_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    selection: Pattern,
    alpha: float,
    scale: float,
    row_lse: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kept, heaviest_missing)``, each ``(B, Hq, G * r)``, from the Triton row kernels:
    first over the keys the mask keeps (a few tiles a row where it is sparse); then, for the
    rows that come out short and only for their tiles, the pass over every key they miss,
    which also finds each one's heaviest missed key. (That pass over every row was most of
    the cover's time, and few rows come out short: ``docs/tuning.md``.)"""
    from .sampling.triton_kernel import (
        row_kept_mass_sparse_triton,
        row_kept_mass_triton,
        row_lse_triton,
    )

    layout = selection.layout
    B, Hq = q.shape[:2]
    G, r = layout.num_segments, layout.rows_per_segment
    starts, attended = selection.row_tables(layout.sampled_rows(q.device).flatten())
    starts = starts.view(B, Hq, G, r)
    if row_lse is None:
        row_lse = row_lse_triton(q, k, layout, scale)
    kept = row_kept_mass_sparse_triton(q, k, layout, scale, starts, attended, lse=row_lse)
    kept = kept.view(B, Hq, G * r)
    heaviest = torch.zeros_like(kept)
    short = kept < alpha
    if bool(short.any()):
        measured, missing = row_kept_mass_triton(
            q, k, layout, scale, starts, attended, lse=row_lse, only=short.view(B, Hq, G, r)
        )
        kept = torch.where(short, measured.view(B, Hq, G * r), kept)
        heaviest = missing.view(B, Hq, G * r)
    return kept, heaviest


def _measure_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    selection: Pattern,
    scale: float,
    dtype: torch.dtype,
    max_chunk_elems: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_measure_triton`'s twin in chunked torch (``dtype`` float32 or float64): per
    (batch, kv head), its query heads' sampled rows in row order, so that a chunk's causal
    key prefix is short. Memory ``chunk x S`` per step."""
    layout = selection.layout
    B, Hq = q.shape[:2]
    Hkv, S = k.shape[1], k.shape[2]
    group = Hq // Hkv
    G, r = layout.num_segments, layout.rows_per_segment
    dev = q.device
    positions = layout.sampled_rows(dev).flatten()  # (G * r,) ascending
    measure = chunk_kept_mass if dtype == torch.float64 else cpu_compiled(chunk_kept_mass, dev)
    kept = torch.empty(B, Hq, G * r, dtype=torch.float32, device=dev)
    heaviest = torch.empty_like(kept)
    slots = torch.arange(G * r * group, device=dev)
    in_group, rows = slots % group, slots // group
    chunk = max(1, max_chunk_elems // S)
    for b in range(B):
        for kv in range(Hkv):
            keys = k[b, kv].to(dtype)
            for start in range(0, rows.numel(), chunk):
                h = in_group[start : start + chunk] + kv * group
                i = rows[start : start + chunk]
                pos = positions[i]
                width = int(pos.max()) + 1
                row_kept, missing = measure(
                    q[b, h, pos - layout.query_start].to(dtype) * scale,
                    keys[:width],
                    pos,
                    selection.keep_heads(b * Hq + h, pos, width),
                )
                kept[b, h, i], heaviest[b, h, i] = row_kept.float(), missing.float()
    return kept, heaviest


def repair_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    selection: Pattern,
    alpha: float,
    scale: float,
    rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    added: torch.Tensor,
    repaired: torch.Tensor,
    *,
    dtype: torch.dtype = torch.float32,
    max_chunk_elems: int = DEFAULT_MAX_CHUNK_ELEMS,
) -> torch.Tensor:
    """Add to the mask each given sampled row's heaviest missing keys until it keeps
    ``alpha`` (:func:`cover_row_chunk`), every row of every head in one batched pass.

    The rows are ordered by kv head, so that each chunk's probabilities take one matrix
    product per kv head it holds; everything else (causal softmax, the mask's keys, the
    repair) runs on the whole chunk at once: a few dozen operations per chunk, whatever the
    batch and the heads. Memory ``chunk x S`` per step.

    Args:
        q: ``(B, Hq, L, D)``; k: ``(B, Hkv, S, D)``.
        selection: the mask before the repair.
        alpha: the share of its mass every row must keep.
        scale: softmax scale.
        rows: ``(b, head, row)`` int64 indices of the rows to repair, ``row`` into the
            flattened ``(num_segments * rows_per_segment)`` sampled rows.
        added: ``(B, Hq, S)`` bool, updated: the keys added per head.
        repaired: ``(B, Hq)`` int64, updated: the rows of each head that got keys.
        dtype: float32, or float64 (the reference).
        max_chunk_elems: bound on the elements of one ``(rows, S)`` chunk.

    Returns:
        ``(R,)`` in ``dtype``: each given row's kept share after the repair, in the order of
        ``rows``.
    """
    layout = selection.layout
    B, Hq = q.shape[:2]
    Hkv, S = k.shape[1], k.shape[2]
    group = Hq // Hkv
    rows_total = layout.num_segments * layout.rows_per_segment
    b_idx, h_idx, r_idx = rows
    owner = b_idx * Hkv + h_idx // group
    order = torch.argsort(owner * rows_total + r_idx, stable=True)
    bounds = torch.bincount(owner, minlength=B * Hkv).cumsum(0).tolist()  # one host read
    head = (b_idx * Hq + h_idx)[order]
    pos = layout.sampled_rows(q.device).flatten()[r_idx[order]]
    q_rows = q.flatten(0, 1)[head, pos - layout.query_start].to(dtype) * scale  # (R, D)
    repaired = repaired.view(-1)
    hits = torch.zeros(B * Hq, S, dtype=torch.int32, device=q.device)  # rows adding each key
    R = head.numel()
    out = torch.empty(R, dtype=dtype, device=q.device)
    chunk = max(1, max_chunk_elems // S)
    for start in range(0, R, chunk):
        stop = min(start + chunk, R)
        p = grouped_probabilities(q_rows, k, bounds, start, stop, pos)
        h = head[start:stop]
        keep = selection.keep_heads(h, pos[start:stop])
        row_kept = (p * keep).sum(dim=-1)
        gained, add = cover_row_chunk(p, keep, row_kept, alpha)
        hits.index_add_(0, h, add.to(torch.int32))  # no host read, unlike add.nonzero()
        repaired.index_add_(0, h, add.any(dim=-1).long())
        out[start:stop] = row_kept + gained
    added |= (hits > 0).view(B, Hq, S)
    result = torch.empty_like(out)
    result[order] = out  # back to the order of ``rows``
    return result
