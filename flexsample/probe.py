"""Stage 0 — the probe: how sparse could any mask of this input be?

Planning costs a pass of the sampled rows over the keys, selection and the row cover. On
diffuse attention (every key carries a little of the mass) all of it is wasted: the plan
comes out too dense to beat dense attention and runs dense anyway. The probe asks first, on
a handful of rows (the last :data:`ROWS_PER_SEGMENT` sampled rows of each segment): the fewest
keys that hold ``alpha`` of each row's exact attention mass (the per-row oracle). Every mask
that keeps ``alpha`` of these rows' mass (the row cover's guarantee) computes at least that
many pairs on them, so their share of the rows' causal keys estimates the least density any
plan can reach. Where even that density would not beat dense attention, the call runs dense
before sampling.

Two implementations: :func:`probe_density` (chunked float32, inductor-compiled on CPU) and
its float64 twin ``probe_density(..., reference=True)``; tests hold them together.
"""

from __future__ import annotations

import numpy as np
import torch

from .layout import SampleLayout
from .sampling.reference import sampled_row_probabilities
from .sampling.torch_sampler import DEFAULT_MAX_CHUNK_ELEMS, chunk_probabilities, cpu_compiled
from .selection import local_pairs

#: Rows probed per segment: its last sampled row. Two per segment cost 11 ms at 128K on an
#: H100 (32 heads; the sort of each row dominates), 4% of cuDNN's dense time.
ROWS_PER_SEGMENT = 1


def probe_rows(layout: SampleLayout, device: torch.device | str = "cpu") -> torch.Tensor:
    """Positions of the probed rows: the last :data:`ROWS_PER_SEGMENT` sampled rows of each
    segment (fewer where a segment samples fewer), ascending, int64."""
    return layout.sampled_rows(device).flatten()[_probe_index(layout, device)]


def _probe_index(layout: SampleLayout, device: torch.device | str = "cpu") -> torch.Tensor:
    """Where the probed rows sit among ``layout.sampled_rows().flatten()``."""
    G, r = layout.num_segments, layout.rows_per_segment
    index = torch.arange(G * r, device=device).view(G, r)
    return index[:, -min(ROWS_PER_SEGMENT, r) :].flatten()


def fewest_keys(p: torch.Tensor, alpha: float, *, numpy_sort: bool | None = None) -> torch.Tensor:
    """The fewest keys whose probabilities add up to ``alpha`` of each row, heaviest first.

    Args:
        p: ``(..., W)`` probabilities, each row summing to 1.
        alpha: share of the row's mass, in ``(0, 1]``.
        numpy_sort: sort with NumPy (default: on CPU, where it takes about a seventh of
            torch's time, 2 threads, 64 x 4096) or with torch (elsewhere).

    Returns:
        ``(...)`` int64 counts, at least 1: a key counts while the heavier ones hold less
        than ``alpha`` (with ``alpha = 1``, rounding may leave a row's total a hair under
        it: every nonzero key counts then).
    """
    return _fewest_and_lightest(p, alpha, numpy_sort)[0]


def _fewest_and_lightest(
    p: torch.Tensor, alpha: float, numpy_sort: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fewest_keys` and the lightest of those keys' probabilities, ``(...)`` each."""
    if numpy_sort is None:
        numpy_sort = p.device.type == "cpu"
    if numpy_sort:
        ascending = torch.from_numpy(np.sort(p.detach().cpu().contiguous().numpy(), axis=-1))
    else:
        ascending = p.sort(dim=-1).values
    # In ascending order the keys heavier than key i hold total - cumsum[i].
    cumsum = ascending.cumsum(dim=-1)
    heavier = cumsum[..., -1:] - cumsum
    counts = ((heavier < alpha) & (ascending > 0)).sum(dim=-1).clamp_min(1)
    lightest = ascending.gather(-1, (p.shape[-1] - counts)[..., None]).squeeze(-1)
    return counts.to(p.device), lightest.to(p.device)


def _row_needs(
    p: torch.Tensor, alpha: float, row_pos: torch.Tensor, numpy_sort: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What each row ``p (..., n, S)`` at positions ``row_pos (n,)`` needs to keep ``alpha``
    of its mass: ``(counts, reach, far)``.

    ``counts (..., n)``: :func:`fewest_keys`. The needed keys are the heaviest ``counts``;
    ``reach (..., n)``: the longest band of keys ending at the row of which at least half are
    needed (a window that keeps them costs at most twice the pairs), in tokens;
    ``far (..., n, S)`` bool: the needed keys before that band (columns, for a mask).
    """
    counts, lightest = _fewest_and_lightest(p, alpha, numpy_sort)
    needed = (p >= lightest[..., None]) & (p > 0)
    S = p.shape[-1]
    keys = torch.arange(S, device=p.device)
    # Needed keys in [j, row] (p is zero after the row): all of them less those before j.
    before = needed.cumsum(dim=-1, dtype=torch.int32)
    within = before[..., -1:] - before + needed
    span = row_pos[:, None] - keys + 1  # (n, S): keys in [j, row]
    half = (2 * within >= span) & (span >= 1)
    start = torch.where(half, keys, row_pos[:, None] + 1).amin(dim=-1)
    return counts, row_pos - start + 1, needed & (keys < start[..., None])


def _estimate(
    counts: torch.Tensor,
    reach: torch.Tensor,
    columns: torch.Tensor,
    layout: SampleLayout,
    lengths: float,
    group_union: bool,
) -> torch.Tensor:
    """Per head of ``(units, group)``: the larger of the per-row oracle's share of the rows'
    causal keys and the density of a band + columns mask keeping every row's needed keys.

    Args:
        counts, reach: ``(units, group, R)`` from :func:`_row_needs`.
        columns: ``(units, group, S)`` bool, the head's rows' needed keys before their bands.
        layout: the geometry.
        lengths: the probed rows' causal lengths, summed.
        group_union: the group's heads share their columns (``SampleConfig.group_union``).
    """
    least = counts.sum(dim=-1).float() / lengths
    blocks = -(-reach.amax(dim=-1) // layout.block_size)
    window = local_pairs(blocks.clamp(min=layout.min_window_blocks), layout).float()
    if group_union:
        columns = columns.any(dim=1, keepdim=True)
    keys = torch.arange(layout.seq_len, device=columns.device)
    readers = (layout.seq_len - keys.clamp(min=layout.query_start)).float()  # queries >= key
    column_pairs = columns.float() @ readers
    band = ((window + column_pairs) / layout.causal_pairs).clamp(max=1.0)
    return torch.maximum(least, band)


def probe_density(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: SampleLayout,
    alpha: float,
    scale: float,
    *,
    group_union: bool = True,
    reference: bool = False,
    max_chunk_elems: int | None = None,
) -> torch.Tensor:
    """The probe's estimate of the least density a mask keeping ``alpha`` of the probed
    rows' mass computes, per head.

    The larger of two numbers. The per-row oracle's share of the rows' causal keys (the
    fewest keys holding ``alpha`` of each row's mass): every such mask computes at least
    that on these rows. And the density of the band + columns mask that keeps those keys of
    every row, as SampleAttention's masks keep them: a window reaching back as far as at
    least half of a row's keys are needed, and the needed keys before it as columns that
    every later query reads (shared by the kv group's heads with ``group_union``). The
    first alone is blind to rows that need different keys: on random q/k at 128K it said
    0.74 where the selection came out at 1.0 (H200, ``bench/gpu_run.py``).

    Args:
        q: ``(B, Hq, L, D)`` queries, the last ``L`` of the ``S`` positions.
        k: ``(B, Hkv, S, D)`` keys, ``Hq % Hkv == 0``.
        layout: the geometry (:func:`probe_rows` reads its sampled rows).
        alpha: the mass each row must keep.
        scale: softmax scale.
        group_union: columns are shared by each kv head's query heads.
        reference: compute in float64 at once (small inputs: ``B * Hq * rows * S``
            doubles), the twin the tests compare against.
        max_chunk_elems: bound on the elements of one probability chunk (default 2M on
            CPU, 32M on CUDA).

    Returns:
        ``(B, Hq)`` float32 in ``(0, 1]``.
    """
    B, Hq = q.shape[:2]
    Hkv, S = k.shape[1], k.shape[2]
    group = Hq // Hkv
    pos = probe_rows(layout, q.device)
    R = pos.numel()
    lengths = float((pos + 1).sum())
    if reference:
        # The float64 oracle of every sampled row (small inputs), then the probed ones.
        p = sampled_row_probabilities(q, k, layout, scale)[:, :, _probe_index(layout, q.device)]
        counts, reach, far = _row_needs(p, alpha, pos)
        columns = far.any(dim=2).view(B * Hkv, group, S)
        counts, reach = counts.view(B * Hkv, group, R), reach.view(B * Hkv, group, R)
        return _estimate(counts, reach, columns, layout, lengths, group_union).view(B, Hq)

    if max_chunk_elems is None:
        max_chunk_elems = DEFAULT_MAX_CHUNK_ELEMS * (16 if q.device.type == "cuda" else 1)
    per_kv = group * R  # the probed rows of the query heads sharing one kv head
    q_rows = q[:, :, pos - layout.query_start]  # (B, Hq, R, D)
    rows = (q_rows.float() * scale).reshape(B * Hkv, per_kv, -1)
    keys = k.reshape(B * Hkv, S, -1)
    row_pos = pos.repeat(group)  # (per_kv,)
    counts = torch.empty(B * Hkv, per_kv, dtype=torch.int64, device=q.device)
    reach = torch.empty_like(counts)
    columns = torch.zeros(B * Hkv, group, S, dtype=torch.bool, device=q.device)
    if per_kv * S > max_chunk_elems:  # long rows: a few rows at a time
        _needs_in_row_chunks(rows, keys, row_pos, alpha, max_chunk_elems, R, counts, reach, columns)
    else:
        # Whole kv heads per step: one matmul each into a shared buffer, then the softmax,
        # sort and counts of the whole step at once (few launches on a GPU).
        step = max(1, max_chunk_elems // (per_kv * S))
        after = torch.arange(S, device=q.device)[None, :] > row_pos[:, None]  # (per_kv, S)
        for u0 in range(0, B * Hkv, step):
            u1 = min(u0 + step, B * Hkv)
            logits = torch.empty(u1 - u0, per_kv, S, dtype=torch.float32, device=q.device)
            for i, u in enumerate(range(u0, u1)):
                torch.matmul(rows[u], keys[u].float().T, out=logits[i])
            p = logits.masked_fill_(after, float("-inf")).softmax(dim=-1)
            counts[u0:u1], reach[u0:u1], far = _row_needs(p, alpha, row_pos)
            columns[u0:u1] = far.view(u1 - u0, group, R, S).any(dim=2)
    view = (B * Hkv, group, R)
    estimate = _estimate(counts.view(view), reach.view(view), columns, layout, lengths, group_union)
    return estimate.view(B, Hq)


def _needs_in_row_chunks(
    rows: torch.Tensor,
    keys: torch.Tensor,
    row_pos: torch.Tensor,
    alpha: float,
    max_elems: int,
    rows_per_head: int,
    counts: torch.Tensor,
    reach: torch.Tensor,
    columns: torch.Tensor,
) -> None:
    """:func:`_row_needs` of each probed row, ``max_elems // S`` rows a step, into ``counts``
    and ``reach`` ``(units, n)`` and ``columns`` ``(units, group, S)`` (OR over each head's
    rows), for ``rows (units, n, D)`` (scaled queries, head-major), ``keys (units, S, D)``
    and the rows' positions ``row_pos (n,)``."""
    units, n, _ = rows.shape
    S = keys.shape[1]
    probabilities = cpu_compiled(chunk_probabilities, rows.device)
    chunk = max(1, max_elems // S)
    heads = torch.arange(n, device=rows.device) // rows_per_head
    for u in range(units):
        unit_keys = keys[u].float()
        for start in range(0, n, chunk):
            part = slice(start, start + chunk)
            p = probabilities(rows[u, part], unit_keys, row_pos[part])
            counts[u, part], reach[u, part], far = _row_needs(p, alpha, row_pos[part])
            for head in heads[part].unique().tolist():
                columns[u, head] |= far[heads[part] == head].any(dim=0)
