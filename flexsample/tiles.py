"""Query-aware selection: for each query tile, the keys its rows need beyond a window +
columns pattern (:class:`~flexsample.patterns.TileKeys`).

A few rows of each tile (:func:`tile_rows`, the tile's last row among them) are scored
exactly against every causal key. Where the base pattern leaves one of them short of
``alpha`` of its mass, the tile takes the keys the base does not read (before its window,
not the head's columns or the sink) in order of their mass summed over the tile's sampled
rows, until every sampled row of the tile reaches ``alpha``, at most ``max_keys`` of them:
the query-tile oracle (:func:`~flexsample.oracle.oracle_frontier` with ``query_tile``) on
the sampled rows.
"""

from __future__ import annotations

import torch

from .layout import SampleLayout, query_blocks
from .patterns import TileKeys, WindowColumns
from .patterns.window_columns import window_start
from .sampling.torch_sampler import chunk_probabilities

#: Scores held at once while selecting (float32 elements: tiles x rows x keys).
CHUNK_ELEMENTS = 1 << 24


def tile_rows(layout: SampleLayout, rows_per_tile: int, device: torch.device | str = "cpu"):
    """``(T, rows_per_tile)`` int64: the sampled query positions of each query tile, evenly
    spaced and ending at the tile's last query (repeated in tiles with fewer queries)."""
    _, first, rows = query_blocks(layout, device)
    step = torch.arange(rows_per_tile, 0, -1, device=device) - 1  # r-1 .. 0
    offsets = rows[:, None] - 1 - (step[None, :] * rows[:, None]) // rows_per_tile
    return first[:, None] + offsets.clamp(min=0)


def select_tile_keys(
    q: torch.Tensor,
    k: torch.Tensor,
    base: WindowColumns,
    alpha: float,
    scale: float,
    rows_per_tile: int,
    max_keys: int,
) -> TileKeys:
    """Each query tile's own keys on top of ``base`` (see the module).

    Args:
        q: ``(B, Hq, L, D)``, the last ``L`` positions.
        k: ``(B, Hkv, S, D)``.
        base: the window + columns pattern (after its row cover).
        alpha: the share of each sampled row's mass to reach.
        scale: softmax scale.
        rows_per_tile: sampled rows per query tile.
        max_keys: most keys a tile takes.

    Returns:
        The :class:`~flexsample.patterns.TileKeys` pattern.
    """
    layout = base.layout
    B, Hq = q.shape[:2]
    group = Hq // k.shape[1]
    S, device = layout.seq_len, q.device
    rows = tile_rows(layout, rows_per_tile, device)  # (T, r)
    T, r = rows.shape
    qb, _, _ = query_blocks(layout, device)
    start = window_start(qb, base.window_blocks[..., None]) * layout.block_size  # (B, Hq, T)
    keys = torch.arange(S, device=device)
    width = min(max_keys, S)
    chosen = torch.full((B, Hq, T, width), S, dtype=torch.int64, device=device)
    step = max(1, CHUNK_ELEMENTS // (r * S))
    for b in range(B):
        for h in range(Hq):
            head_q, head_keys = q[b, h].float() * scale, k[b, h // group].float()
            outside = (keys >= layout.sink_tokens) & ~base.columns[b, h]  # (S,)
            for t0 in range(0, T, step):
                pos = rows[t0 : t0 + step]  # (t, r)
                flat = pos.flatten()
                probs = chunk_probabilities(head_q[flat - layout.query_start], head_keys, flat)
                probs = probs.view(*pos.shape, S)  # (t, r, S)
                heads = torch.full((pos.numel(),), b * Hq + h, device=device)
                kept = base.keep_heads(heads, flat).view(probs.shape)
                short = alpha - (probs * kept).sum(dim=-1)  # (t, r)
                free = outside & (keys < start[b, h, t0 : t0 + step, None])  # (t, S)
                mass, order = (probs.sum(dim=1) * free).topk(width, dim=-1)  # (t, width)
                gained = probs.gather(-1, order[:, None].expand(-1, r, -1)).cumsum(dim=-1)
                # Keys each row needs: those before its gain reaches its shortfall, and that one.
                need = torch.where(short > 0, (gained < short[..., None]).sum(dim=-1) + 1, 0)
                count = need.amax(dim=-1, keepdim=True)  # (t, 1)
                take = (torch.arange(width, device=device) < count) & (mass > 0)
                chosen[b, h, t0 : t0 + step] = torch.where(take, order, S)
    return TileKeys.create(base, chosen)
