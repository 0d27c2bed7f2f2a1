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
    if numpy_sort is None:
        numpy_sort = p.device.type == "cpu"
    if numpy_sort:
        ascending = torch.from_numpy(np.sort(p.detach().cpu().contiguous().numpy(), axis=-1))
    else:
        ascending = p.sort(dim=-1).values
    # In ascending order the keys heavier than key i hold total - cumsum[i].
    cumsum = ascending.cumsum(dim=-1)
    heavier = cumsum[..., -1:] - cumsum
    return ((heavier < alpha) & (ascending > 0)).sum(dim=-1).clamp_min(1).to(p.device)


def probe_density(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: SampleLayout,
    alpha: float,
    scale: float,
    *,
    reference: bool = False,
    max_chunk_elems: int | None = None,
) -> torch.Tensor:
    """The per-row oracle's share of the probed rows' causal keys, per head.

    Args:
        q: ``(B, Hq, L, D)`` queries, the last ``L`` of the ``S`` positions.
        k: ``(B, Hkv, S, D)`` keys, ``Hq % Hkv == 0``.
        layout: the geometry (:func:`probe_rows` reads its sampled rows).
        alpha: the mass each row must keep.
        scale: softmax scale.
        reference: compute in float64 at once (small inputs: ``B * Hq * rows * S``
            doubles), the twin the tests compare against.
        max_chunk_elems: bound on the elements of one probability chunk (default 2M on
            CPU, 32M on CUDA).

    Returns:
        ``(B, Hq)`` float32: the sum over probed rows of the fewest keys holding ``alpha``
        of the row's mass, over the sum of their causal lengths.
    """
    B, Hq = q.shape[:2]
    Hkv, S = k.shape[1], k.shape[2]
    group = Hq // Hkv
    pos = probe_rows(layout, q.device)
    lengths = float((pos + 1).sum())
    q_rows = q[:, :, pos - layout.query_start]  # (B, Hq, R, D)
    if reference:
        # The float64 oracle of every sampled row (small inputs), then the probed ones.
        p = sampled_row_probabilities(q, k, layout, scale)[:, :, _probe_index(layout, q.device)]
        return (fewest_keys(p, alpha).sum(dim=-1) / lengths).float()

    if max_chunk_elems is None:
        max_chunk_elems = DEFAULT_MAX_CHUNK_ELEMS * (16 if q.device.type == "cuda" else 1)
    R = pos.numel()
    per_kv = group * R  # the probed rows of the query heads sharing one kv head
    rows = (q_rows.float() * scale).reshape(B * Hkv, per_kv, -1)
    keys = k.reshape(B * Hkv, S, -1)
    row_pos = pos.repeat(group)  # (per_kv,)
    if per_kv * S > max_chunk_elems:  # long rows: a few rows at a time
        needed = _needed_in_row_chunks(rows, keys, row_pos, alpha, max_chunk_elems)
        return needed.view(B, Hq, R).sum(dim=-1) / lengths
    # Whole kv heads per step: one matmul each into a shared buffer, then the softmax, sort
    # and count of the whole step at once (few launches on a GPU).
    step = max(1, max_chunk_elems // (per_kv * S))
    after = torch.arange(S, device=q.device)[None, :] > row_pos[:, None]  # (per_kv, S)
    counts = torch.empty(B * Hkv, group, dtype=torch.float32, device=q.device)
    for u0 in range(0, B * Hkv, step):
        u1 = min(u0 + step, B * Hkv)
        logits = torch.empty(u1 - u0, per_kv, S, dtype=torch.float32, device=q.device)
        for i, u in enumerate(range(u0, u1)):
            torch.matmul(rows[u], keys[u].float().T, out=logits[i])
        p = logits.masked_fill_(after, float("-inf")).softmax(dim=-1)
        counts[u0:u1] = fewest_keys(p, alpha).view(u1 - u0, group, R).sum(dim=-1).float()
    return counts.view(B, Hq) / lengths


def _needed_in_row_chunks(
    rows: torch.Tensor, keys: torch.Tensor, row_pos: torch.Tensor, alpha: float, max_elems: int
) -> torch.Tensor:
    """Each probed row's fewest keys, ``max_elems // S`` rows a step: ``(units, rows)``
    float32 for ``rows (units, n, D)`` (scaled queries), ``keys (units, S, D)`` and the rows'
    positions ``row_pos (n,)``."""
    units, n, _ = rows.shape
    S = keys.shape[1]
    probabilities = cpu_compiled(chunk_probabilities, rows.device)
    chunk = max(1, max_elems // S)
    needed = torch.empty(units, n, dtype=torch.float32, device=rows.device)
    for u in range(units):
        unit_keys = keys[u].float()
        for start in range(0, n, chunk):
            part = slice(start, start + chunk)
            p = probabilities(rows[u, part], unit_keys, row_pos[part])
            needed[u, part] = fewest_keys(p, alpha).float()
    return needed
