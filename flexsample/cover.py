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
reference sampler). The repair runs in torch on the short rows only.
Memory stays ``chunk x S`` per step, never ``rows x S``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .layout import SampleLayout
from .sampling.torch_sampler import DEFAULT_MAX_CHUNK_ELEMS, chunk_probabilities, cpu_compiled
from .selection import ColumnSelection, row_keep

#: Keys first searched per short row (its heaviest missing ones); four times more, then a
#: full sort, only where they do not reach ``alpha``.
_PROBE = 64
#: A repair adds only keys holding at least ``(1 - alpha) / KEY_FLOOR_DIVISOR`` of the row's
#: mass. A shortfall spread thinner (a diffuse background) would cost thousands of columns,
#: each read by every later query, for a few thousandths of mass: such a row stays short,
#: and ``row_mass`` says by how much. ``alpha = 1`` has no floor.
KEY_FLOOR_DIVISOR = 64


@dataclass(frozen=True, eq=False)
class RowCover:
    """The result of :func:`cover_rows`.

    Attributes:
        selection: the input selection with the repaired rows' columns added.
        row_mass: ``(B, Hq, num_segments, rows_per_segment)`` float32, each sampled row's
            kept share of its mass: measured before the repair, plus the mass of the keys
            the repair added for that row. A lower bound on the final mask (a column added
            for one row also serves others); below ``alpha`` only where the rest of the
            row's mass is spread over keys under the floor.
        repaired: ``(B, Hq)`` int64, sampled rows of each head that got keys added.
    """

    selection: ColumnSelection
    row_mass: torch.Tensor
    repaired: torch.Tensor


def key_floor(alpha: float) -> float:
    """The lightest key a repair adds, as a share of the row's mass."""
    return (1.0 - alpha) / KEY_FLOOR_DIVISOR


def chunk_kept_mass(
    q_rows: torch.Tensor,
    keys: torch.Tensor,
    pos: torch.Tensor,
    window_start: torch.Tensor,
    columns: torch.Tensor,
    sink: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities of a chunk of rows (of heads sharing one kv head) and the share of
    each that its head's mask keeps.

    Args:
        q_rows: ``(c, D)`` queries, already multiplied by the softmax scale.
        keys: ``(W, D)`` the key prefix the chunk needs (``W > max(pos)``).
        pos: ``(c,)`` query positions.
        window_start: ``(c,)`` first key of each row's window.
        columns: ``(c, W)`` bool, the columns of each row's head.
        sink: leading keys every row keeps.

    Returns:
        ``(p (c, W), kept (c,))``.
    """
    p = chunk_probabilities(q_rows, keys, pos)
    key = torch.arange(keys.shape[0], device=keys.device)
    keep = (key[None, :] >= window_start[:, None]) | (key[None, :] < sink) | columns
    return p, (p * keep).sum(dim=-1)


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
    top = index = None
    for probe in (_PROBE, 4 * _PROBE, missing.shape[-1]):
        top, index = missing.topk(min(probe, missing.shape[-1]), dim=-1)
        # Enough when every row reaches alpha or has no key above the floor left to add.
        enough = (top.sum(dim=-1) >= need) | (top[:, -1] <= floor)
        if probe >= missing.shape[-1] or bool(enough.all()):
            break
    before = top.cumsum(dim=-1) - top  # mass of the heavier keys
    take = (before < need[:, None]) & (top > floor)
    add = torch.zeros_like(keep).scatter_(-1, index, take)
    return (top * take).sum(dim=-1), add


def cover_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    selection: ColumnSelection,
    alpha: float,
    scale: float,
    sampler: str,
    *,
    max_chunk_elems: int | None = None,
    row_lse: torch.Tensor | None = None,
) -> RowCover:
    """Make every sampled row keep at least ``alpha`` of its attention mass.

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
    Hkv, S = k.shape[1], k.shape[2]
    group = Hq // Hkv
    G, r = layout.num_segments, layout.rows_per_segment
    attended = selection.columns
    windows = selection.window_blocks
    positions = layout.sampled_rows(q.device).flatten()  # (G * r,) ascending
    dev = q.device

    # Work per (batch, kv head): (query head, sampled row) items, in row order, so that the
    # query heads sharing the keys are measured together and a chunk's key prefix is short.
    if sampler == "triton":
        from .sampling.triton_kernel import (
            row_kept_mass_sparse_triton,
            row_kept_mass_triton,
            row_lse_triton,
        )

        if row_lse is None:
            row_lse = row_lse_triton(q, k, layout, scale)
        # First over the keys the mask keeps (a few tiles a row where it is sparse); then,
        # for the rows that come out short and only for their tiles, the pass over every
        # key they miss, which also finds each one's heaviest missed key. (At 128K tokens
        # on an H200 that pass over every row took 9.8 ms of the cover's 11; on planted
        # stripes at 16K, 61 of 26368 sampled rows were short.)
        kept = row_kept_mass_sparse_triton(
            q, k, layout, scale, windows, attended, lse=row_lse
        ).view(B, Hq, G * r)
        missing = torch.zeros_like(kept)
        short = kept < alpha
        if bool(short.any()):
            measured, missing = row_kept_mass_triton(
                q, k, layout, scale, windows, attended, lse=row_lse, only=short.view(B, Hq, G, r)
            )
            kept = torch.where(short, measured.view(B, Hq, G * r), kept)
        # Only short rows with a key above the floor to add go on to the torch repair,
        # grouped per (batch, kv head) in row order: two reads on the host, whatever B, Hkv.
        repairable = (kept < alpha) & (missing.view(B, Hq, G * r) > key_floor(alpha))
        b_idx, h_idx, r_idx = repairable.nonzero().unbind(-1)
        items = {}
        if b_idx.numel():
            owner = b_idx * Hkv + h_idx // group
            order = torch.argsort(owner * (G * r) + r_idx, stable=True)
            h_idx, r_idx, owner = h_idx[order], r_idx[order], owner[order]
            counts = torch.bincount(owner, minlength=B * Hkv).tolist()
            heads, rows = h_idx.split(counts), r_idx.split(counts)
            for slot, count in enumerate(counts):
                if count:
                    items[divmod(slot, Hkv)] = (heads[slot], rows[slot])
    else:
        kept = torch.empty(B, Hq, G * r, dtype=torch.float32, device=dev)
        slots = torch.arange(G * r * group, device=dev)
        every = (slots % group, slots // group)
        items = {(b, kv): (every[0] + kv * group, every[1]) for b in range(B) for kv in range(Hkv)}

    dtype = torch.float64 if sampler == "reference" else torch.float32
    measure = chunk_kept_mass if sampler == "reference" else cpu_compiled(chunk_kept_mass, dev)
    if max_chunk_elems is None:  # GPUs have the memory for far fewer, larger steps
        max_chunk_elems = DEFAULT_MAX_CHUNK_ELEMS * (16 if dev.type == "cuda" else 1)
    chunk = max(1, max_chunk_elems // S)
    bs = layout.block_size
    added = torch.zeros(B, Hq, S, dtype=torch.bool, device=dev)
    repaired = torch.zeros(B, Hq, dtype=torch.int64, device=dev)
    for (b, kv), (heads, rows) in items.items():
        keys = k[b, kv].to(dtype)
        for start in range(0, rows.numel(), chunk):
            h, i = heads[start : start + chunk], rows[start : start + chunk]
            pos = positions[i]
            width = int(pos.max()) + 1
            window_start = (pos // bs - windows[b, h]) * bs
            p, row_kept = measure(
                q[b, h, pos - layout.query_start].to(dtype) * scale,
                keys[:width],
                pos,
                window_start,
                attended[b, h, :width],
                layout.sink_tokens,
            )
            short = (row_kept < alpha).nonzero().squeeze(-1)
            if short.numel():
                hs = h[short]
                keep = row_keep(pos[short], windows[b, hs], attended[b, hs], layout)[:, :width]
                gained, add = cover_row_chunk(p[short], keep, row_kept[short], alpha)
                row_kept[short] += gained
                which, key = add.nonzero().unbind(-1)
                added[b, hs[which], key] = True
                repaired[b].index_add_(0, hs, add.any(dim=-1).long())
            kept[b, h, i] = row_kept.float()

    if layout.column_unit == "block":  # a repaired key brings its whole block
        added = _whole_blocks(added, layout)
    covered = ColumnSelection(
        window_blocks=windows, columns=selection.columns | added, layout=layout
    )
    return RowCover(selection=covered, row_mass=kept.view(B, Hq, G, r), repaired=repaired)


def _whole_blocks(columns: torch.Tensor, layout: SampleLayout) -> torch.Tensor:
    S, bs, n = layout.seq_len, layout.block_size, layout.num_blocks
    padded = torch.nn.functional.pad(columns, (0, n * bs - S))
    blocks = padded.view(*columns.shape[:-1], n, bs).any(dim=-1)
    return blocks.repeat_interleave(bs, dim=-1)[..., :S]
