"""Query-aware selection: for each query tile, the keys its rows need beyond a window +
columns pattern (:class:`~flexsample.patterns.TileKeys`).

A few rows of each tile (:func:`tile_rows`, the tile's last row among them) are scored
exactly against every causal key. Where the base pattern leaves one of them short of
``alpha`` of its mass, the tile takes the keys the base does not read (before its window,
not the head's columns or the sink) in order of their mass summed over the tile's sampled
rows, until every sampled row of the tile reaches ``alpha``, at most ``max_keys`` of them:
the query-tile oracle (:func:`~flexsample.oracle.oracle_frontier` with ``query_tile``) on
the sampled rows.

Two steps. First, which tiles are short: with the Triton sampler, the cover's row kernels
measure every tile row's kept mass over the keys the base reads (a few key tiles a row);
elsewhere every tile is taken as short (a tile whose rows all reach ``alpha`` takes no key,
so this changes the work, not the result). Then the short tiles of every head at once
(:func:`choose_tile_keys`), in chunks of tiles ordered by kv head: one matrix product per kv
head a chunk holds, the rest a fixed number of operations per chunk.
"""

from __future__ import annotations

import torch

from .layout import SampleLayout, query_blocks
from .patterns import TileKeys, WindowColumns
from .patterns.window_columns import window_start
from .sampling.torch_sampler import DEFAULT_MAX_CHUNK_ELEMS, grouped_probabilities

#: Probabilities held at once while choosing (elements of ``tiles x rows x keys``), per device
#: type; others take the CPU's. On a CPU, chunks that stay in cache (the sampler's size: 16M
#: took twice as long at 8K); on a GPU, few launches.
CHUNK_ELEMENTS = {"cpu": DEFAULT_MAX_CHUNK_ELEMS, "cuda": 1 << 27}


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
    sampler: str = "torch",
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
        sampler: the resolved stage-1 implementation: ``"triton"`` finds the short tiles in
            the Triton row kernels first; ``"reference"`` chooses in float64.

    Returns:
        The :class:`~flexsample.patterns.TileKeys` pattern.
    """
    layout = base.layout
    B, Hq = q.shape[:2]
    rows = tile_rows(layout, rows_per_tile)  # (T, r) on the host: chunks are planned there
    if sampler == "triton":
        short = short_tiles_triton(q, k, base, alpha, scale, rows.to(q.device))
    else:
        short = torch.ones(B, Hq, rows.shape[0], dtype=torch.bool)
    dtype = torch.float64 if sampler == "reference" else torch.float32
    chosen = choose_tile_keys(q, k, base, alpha, scale, rows, short, max_keys, dtype=dtype)
    return TileKeys.create(base, chosen)


def short_tiles_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    base: WindowColumns,
    alpha: float,
    scale: float,
    rows: torch.Tensor,
) -> torch.Tensor:
    """``(B, Hq, T)`` bool: the query tiles with a sampled row (of ``rows``, ``(T, r)`` on
    the device) that ``base`` leaves short of ``alpha``, measured by the cover's row kernels
    (a log-sum-exp pass, then the mass over the keys the base reads)."""
    from .sampling.triton_kernel import row_kept_mass_sparse_triton, row_lse_triton

    layout = base.layout
    B, Hq = q.shape[:2]
    T, r = rows.shape
    starts, columns = base.row_tables(rows.flatten())
    lse = row_lse_triton(q, k, layout, scale, rows=rows)
    kept = row_kept_mass_sparse_triton(
        q, k, layout, scale, starts.view(B, Hq, T, r), columns, lse=lse, rows=rows
    )
    return (kept < alpha).any(dim=-1)


def choose_tile_keys(
    q: torch.Tensor,
    k: torch.Tensor,
    base: WindowColumns,
    alpha: float,
    scale: float,
    rows: torch.Tensor,
    short: torch.Tensor,
    max_keys: int,
    *,
    dtype: torch.dtype = torch.float32,
    chunk_elements: int | None = None,
) -> torch.Tensor:
    """The keys each of the ``short`` tiles takes (the others take none).

    Args:
        q, k, base, alpha, scale, max_keys: as :func:`select_tile_keys`.
        rows: ``(T, r)`` int64 on the host, the tiles' sampled rows (:func:`tile_rows`).
        short: ``(B, Hq, T)`` bool, the tiles to choose keys for (read on the host once).
        dtype: float32, or float64 (the reference).
        chunk_elements: most probabilities held at once (default :data:`CHUNK_ELEMENTS`).

    Returns:
        ``(B, Hq, T, min(max_keys, S))`` int64 key positions, ``S`` in unused slots.
    """
    layout = base.layout
    B, Hq = q.shape[:2]
    Hkv, S = k.shape[1], k.shape[2]
    group, device = Hq // Hkv, q.device
    T, r = rows.shape
    width = min(max_keys, S)
    chosen = torch.full((B * Hq * T, width), S, dtype=torch.int64, device=device)
    # The short tiles as (head, tile), ordered by kv head and then position: a chunk takes
    # one matrix product per kv head it holds, over the keys its last tile reads.
    head, tile = short.cpu().view(B * Hq, T).nonzero().unbind(-1)
    owner = head // group  # b * Hkv + kv
    order = torch.argsort(owner * T + tile, stable=True)
    head, tile, owner = head[order], tile[order], owner[order]
    bounds = (torch.bincount(owner, minlength=B * Hkv).cumsum(0) * r).tolist()  # in rows
    if chunk_elements is None:
        chunk_elements = CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS["cpu"])
    per_chunk = max(1, chunk_elements // (r * S))
    # Window starts of every tile, on the host (one read): where each tile's free keys end.
    qb, _, _ = query_blocks(layout, "cpu")
    starts = window_start(qb, base.window_blocks.cpu()[..., None]) * layout.block_size
    starts = starts.view(B * Hq, T)
    keys = torch.arange(S, device=device)
    # Every short tile's sampled rows, in the order above: their heads, positions, queries.
    row_heads = head.repeat_interleave(r).to(device)
    row_pos = rows[tile].flatten().to(device)
    q_rows = q.flatten(0, 1)[row_heads, row_pos - layout.query_start].to(dtype) * scale
    for lo in range(0, head.numel(), per_chunk):
        h, t = head[lo : lo + per_chunk], tile[lo : lo + per_chunk]
        c, W = t.numel(), int(rows[t].max()) + 1  # keys up to the chunk's last row
        a, z = lo * r, (lo + c) * r  # the chunk's rows
        probs = grouped_probabilities(q_rows, k, bounds, a, z, row_pos, W)
        kept = base.keep_heads(row_heads[a:z], row_pos[a:z], W)
        missing = alpha - (probs * kept).sum(dim=-1).view(c, r)
        probs = probs.view(c, r, W)
        # Keys the tile may take: past the sink, not the head's columns, before its window.
        columns = base.columns.flatten(0, 1)[h.to(device), :W]
        free = (keys[:W] >= layout.sink_tokens) & ~columns
        free &= keys[None, :W] < starts[h, t].to(device)[:, None]
        mass, order_k = (probs.sum(dim=1) * free).topk(min(width, W), dim=-1)  # (c, n)
        gained = probs.gather(-1, order_k[:, None].expand(-1, r, -1)).cumsum(dim=-1)
        # Keys each row needs: those before its gain reaches its shortfall, and that one.
        need = torch.where(missing > 0, (gained < missing[..., None]).sum(dim=-1) + 1, 0)
        count = need.amax(dim=-1, keepdim=True)  # (c, 1)
        take = (torch.arange(order_k.shape[-1], device=device) < count) & (mass > 0)
        index = (h * T + t).to(device)
        chosen[index, : order_k.shape[-1]] = torch.where(take, order_k, S)
    return chosen.view(B, Hq, T, width)
