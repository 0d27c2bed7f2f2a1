"""Stage 0 — the probe: how sparse could any mask of this input be?

Planning costs a pass of the sampled rows over the keys, selection and the row cover. On
diffuse attention (every key carries a little of the mass) all of it is wasted: the plan
comes out too dense to beat dense attention and runs dense anyway. The probe asks first, on
a handful of rows (the last :data:`PROBE_ROWS_PER_SEGMENT` sampled rows of each segment, of the
first query head of each kv group: its estimate stands for the group), which keys each row
needs: the fewest that hold ``alpha`` of its exact attention mass (the per-row
oracle). Every mask that keeps ``alpha`` of these rows' mass (the row cover's guarantee)
computes at least that many pairs on them; a mask shaped like SampleAttention's (a window
and columns every later query reads) computes what its cheapest window and those keys as
columns come to, which is near 1 where the rows need different keys. The larger of the two
estimates the least density any plan can reach; where even that would not beat dense
attention, the call runs dense before sampling.

Three implementations: :func:`probe_density` (chunked float32 with a sort of each row,
inductor-compiled on CPU), its float64 twin ``probe_density(..., reference=True)``, and
``probe_density(..., triton=True)`` (:mod:`flexsample.sampling.triton_probe`: the rows'
mass histogrammed in four Triton launches, the plan's choice where the Triton sampler runs,
far fewer launches than the sort); tests hold them together.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from .layout import SampleLayout, column_readers, window_candidate_tables
from .sampling.reference import sampled_row_probabilities
from .sampling.torch_sampler import DEFAULT_MAX_CHUNK_ELEMS, chunk_probabilities, cpu_compiled
from .tuning import MAX_TRITON_PROBE_ROWS, PROBE_ROWS_PER_SEGMENT


def probe_rows(layout: SampleLayout, device: torch.device | str = "cpu") -> torch.Tensor:
    """Positions of the probed rows: the last :data:`PROBE_ROWS_PER_SEGMENT` sampled rows of each
    segment (fewer where a segment samples fewer), ascending, int64."""
    return layout.sampled_rows(device).flatten()[_probe_index(layout, device)]


@functools.lru_cache(maxsize=64)
def _probed(layout: SampleLayout, device: torch.device) -> tuple[torch.Tensor, float]:
    """:func:`probe_rows` on ``device`` and the sum of their causal lengths, made once per
    layout (every layer of a prefill probes the same rows; reading the sum back from a GPU
    would wait for it)."""
    pos = probe_rows(layout)
    return pos.to(device), float((pos + 1).sum())


def _probe_index(layout: SampleLayout, device: torch.device | str = "cpu") -> torch.Tensor:
    """Where the probed rows sit among ``layout.sampled_rows().flatten()``."""
    G, r = layout.num_segments, layout.rows_per_segment
    index = torch.arange(G * r, device=device).view(G, r)
    return index[:, -min(PROBE_ROWS_PER_SEGMENT, r) :].flatten()


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
    p: torch.Tensor, alpha: float, row_pos: torch.Tensor, layout: SampleLayout
) -> tuple[torch.Tensor, torch.Tensor]:
    """What each row ``p (..., n, S)`` at positions ``row_pos (n,)`` needs to keep ``alpha``
    of its mass: ``(counts, reach)``.

    ``counts (..., n)``: :func:`fewest_keys`; the needed keys are the heaviest ``counts``.
    ``reach (..., n, S)`` int32: for each needed key past the sink, how many blocks before
    the row's block it lies (a window of fewer blocks leaves it to a column); -1 elsewhere.
    """
    counts, lightest = _fewest_and_lightest(p, alpha)
    S, bs = p.shape[-1], layout.block_size
    keys = torch.arange(S, device=p.device)
    blocks = (row_pos // bs)[:, None] - keys // bs  # (n, S)
    needed = (p >= lightest[..., None]) & (p > 0) & (keys >= layout.sink_tokens)
    return counts, torch.where(needed, blocks.to(torch.int32), -1)


def estimate_from_needs(
    counts: torch.Tensor, reach: torch.Tensor, layout: SampleLayout, lengths: float
) -> torch.Tensor:
    """Per probed head (``units``): the larger of the per-row oracle's share of the rows'
    causal keys and the density of the cheapest window + columns mask that keeps every
    row's needed keys (over the window candidates selection weighs).

    Args:
        counts: ``(units, R)`` from :func:`_row_needs`.
        reach: ``(units, S)``, the largest reach over the head's rows per key.
        layout: the geometry.
        lengths: the probed rows' causal lengths, summed.
    """
    least = counts.sum(dim=-1).float() / lengths
    candidates, window, readers = _candidate_tables(layout, reach.device)
    # Key j is a column of a window of w blocks where a row needs it from more than w blocks
    # back; then every query past its block + w reads it. All candidates at once: few
    # launches (a loop over the candidates was launch-bound on a GPU).
    columns = (reach[..., None, :] > candidates[:, None]).float()  # (units, c, S)
    pairs = window + (columns * readers).sum(dim=-1)
    best = pairs.amin(dim=-1)
    return torch.maximum(least, (best / layout.causal_pairs).clamp(max=1.0))


@functools.lru_cache(maxsize=8)
def _candidate_tables(
    layout: SampleLayout, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Selection's window candidates ``(c,)`` in blocks, their window pairs ``(c,)`` and, per
    candidate and key, the queries that read the key as a column ``(c, S)`` (every layer of
    a prefill shares them)."""
    candidates, window = window_candidate_tables(layout, device)
    keys = torch.arange(layout.seq_len, device=device)
    return candidates, window.float(), column_readers(layout, candidates, keys).float()


def probe_density(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: SampleLayout,
    alpha: float,
    scale: float,
    *,
    reference: bool = False,
    triton: bool = False,
    max_chunk_elems: int | None = None,
) -> torch.Tensor:
    """The probe's estimate of the least density a mask keeping ``alpha`` of the probed
    rows' mass computes, per head: the first query head of each kv group is probed, and its
    estimate stands for the group (probing every head cost four times as much at GQA 32/8;
    the probe must stay a small share of dense attention, see
    :data:`~flexsample.tuning.PROBE_SHARE`).

    The larger of two numbers. The per-row oracle's share of the rows' causal keys (the
    fewest keys holding ``alpha`` of each row's mass): every such mask computes at least
    that on these rows. And the density of the cheapest window + columns mask that keeps
    those keys of every row, as SampleAttention's masks keep them: of the window candidates
    selection weighs, the one whose window pairs plus columns (the needed keys before the
    window, each read by every later query whose window does not reach it) come to the
    fewest. The first alone is blind to rows that need different keys (random q/k: far
    below the selection's density); how close the second comes is in ``docs/tuning.md``.

    Args:
        q: ``(B, Hq, L, D)`` queries, the last ``L`` of the ``S`` positions.
        k: ``(B, Hkv, S, D)`` keys, ``Hq % Hkv == 0``.
        layout: the geometry (:func:`probe_rows` reads its sampled rows).
        alpha: the mass each row must keep.
        scale: softmax scale.
        reference: compute in float64 at once (small inputs: ``B * Hq * rows * S``
            doubles), the twin the tests compare against.
        triton: histogram the rows' probabilities in four Triton launches instead of
            sorting them (:mod:`flexsample.sampling.triton_probe`; the plan's choice where
            the Triton sampler runs): counts and reach exact up to the keys of one bin
            (probabilities within 19% of each other). More than
            :data:`MAX_TRITON_PROBE_ROWS` probed rows take the torch probe.
        max_chunk_elems: bound on the elements of one probability chunk (default 2M on
            CPU, 32M on CUDA).

    Returns:
        ``(B, Hq)`` float32 in ``(0, 1]``.
    """
    B, Hq = q.shape[:2]
    Hkv, S = k.shape[1], k.shape[2]
    group = Hq // Hkv
    pos, lengths = _probed(layout, q.device)
    R = pos.numel()

    def per_query_head(estimate: torch.Tensor) -> torch.Tensor:
        return estimate.view(B, Hkv).repeat_interleave(group, dim=1)

    if triton and R <= MAX_TRITON_PROBE_ROWS:
        from .sampling.triton_probe import probe_density_triton

        return probe_density_triton(q, k, layout, pos, alpha, scale, lengths)

    q = q[:, ::group]  # the first query head of each kv group

    if reference:
        # The float64 oracle of every sampled row (small inputs), then the probed ones.
        p = sampled_row_probabilities(q, k, layout, scale)[:, :, _probe_index(layout, q.device)]
        counts, reach = _row_needs(p, alpha, pos, layout)
        reach = reach.amax(dim=2).view(B * Hkv, S)
        return per_query_head(estimate_from_needs(counts.view(B * Hkv, R), reach, layout, lengths))

    if max_chunk_elems is None:
        max_chunk_elems = DEFAULT_MAX_CHUNK_ELEMS * (16 if q.device.type == "cuda" else 1)
    q_rows = q[:, :, pos - layout.query_start]  # (B, Hkv, R, D)
    rows = (q_rows.float() * scale).reshape(B * Hkv, R, -1)
    keys = k.reshape(B * Hkv, S, -1)
    counts = torch.empty(B * Hkv, R, dtype=torch.int64, device=q.device)
    reach = torch.full((B * Hkv, S), -1, dtype=torch.int32, device=q.device)
    if R * S > max_chunk_elems:  # long rows: a few rows at a time
        _needs_in_row_chunks(rows, keys, pos, alpha, max_chunk_elems, layout, counts, reach)
    else:
        # Whole kv heads per step: one batched matmul (its keys in float32 bounded like its
        # logits), then the softmax, sort and counts of the whole step at once (few
        # launches on a GPU).
        step = max(1, max_chunk_elems // (max(R, k.shape[-1]) * S))
        after = torch.arange(S, device=q.device)[None, :] > pos[:, None]  # (R, S)
        for u0 in range(0, B * Hkv, step):
            u1 = min(u0 + step, B * Hkv)
            logits = torch.bmm(rows[u0:u1], keys[u0:u1].float().transpose(1, 2))
            p = logits.masked_fill_(after, float("-inf")).softmax(dim=-1)
            counts[u0:u1], row_reach = _row_needs(p, alpha, pos, layout)
            reach[u0:u1] = row_reach.amax(dim=1)
    return per_query_head(estimate_from_needs(counts, reach, layout, lengths))


def _needs_in_row_chunks(
    rows: torch.Tensor,
    keys: torch.Tensor,
    row_pos: torch.Tensor,
    alpha: float,
    max_elems: int,
    layout: SampleLayout,
    counts: torch.Tensor,
    reach: torch.Tensor,
) -> None:
    """:func:`_row_needs` of each probed row, ``max_elems // S`` rows a step, into ``counts``
    ``(units, n)`` and ``reach`` ``(units, S)`` (the largest over the rows), for ``rows
    (units, n, D)`` (one head's scaled queries), ``keys (units, S, D)`` and the rows'
    positions ``row_pos (n,)``."""
    units, n, _ = rows.shape
    S = keys.shape[1]
    probabilities = cpu_compiled(chunk_probabilities, rows.device)
    chunk = max(1, max_elems // S)
    for u in range(units):
        unit_keys = keys[u].float()
        for start in range(0, n, chunk):
            part = slice(start, start + chunk)
            p = probabilities(rows[u, part], unit_keys, row_pos[part])
            counts[u, part], row_reach = _row_needs(p, alpha, row_pos[part], layout)
            torch.maximum(reach[u], row_reach.amax(dim=0), out=reach[u])
