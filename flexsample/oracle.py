"""How good a mask is, measured on exact attention: kept mass per row, density, output error.

The yardstick of every selection choice. :func:`evaluate_plan` scores what a SampleAttention
plan computes (:func:`evaluate_mask` any mask given row by row); :func:`oracle_frontier`
scores the per-row oracle, which keeps for
each query row the fewest keys (or tiles) reaching ``alpha`` of that row's exact attention
mass: the smallest mask any selection with a per-row guarantee could compute. With
``query_tile`` it scores the oracle a tile kernel can reach: the rows of one query tile read
one key set, the fewest (greedily) that give every one of them ``alpha``.

Everything runs in float64 over chunks of query rows, one head at a time, so memory stays at
``chunk x S`` doubles; time grows with ``S^2`` (the oracle also sorts every row). Meant for
benchmarks and studies at up to a few ten thousand tokens, not for production.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .plan import PrefillPlan


@dataclass(frozen=True)
class MaskQuality:
    """What a mask keeps of exact causal attention.

    Attributes:
        density: computed (query, key) pairs over causal pairs ``S (S + 1) / 2``.
        output_error: relative RMS error of the masked attention output against exact
            attention, ``||o - o_exact|| / ||o_exact||`` over all heads and rows.
        kept_mass_min: smallest fraction of a row's attention mass the mask keeps.
        kept_mass_p1: 1st percentile of that fraction over rows (and heads).
        kept_mass_mean: its mean.
    """

    density: float
    output_error: float
    kept_mass_min: float
    kept_mass_p1: float
    kept_mass_mean: float


def _row_chunks(rows: torch.Tensor, chunk: int) -> Iterator[torch.Tensor]:
    for start in range(0, rows.numel(), chunk):
        yield rows[start : start + chunk]


def _rows(q: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """The query positions to score: ``rows`` (checked), or all of them."""
    S = q.shape[2]
    if rows is None:
        return torch.arange(S, device=q.device)
    rows = torch.as_tensor(rows, device=q.device).flatten().long()
    if rows.numel() == 0 or int(rows.min()) < 0 or int(rows.max()) >= S:
        raise ValueError(f"rows must be non-empty positions in [0, {S}), got {rows.tolist()}")
    return rows


def _exact_probs(q_rows, keys, pos: torch.Tensor, scale: float) -> torch.Tensor:
    """``(c, S)`` float64 causal softmax of the query rows at positions ``pos`` (one head)."""
    logits = (q_rows.double() @ keys.double().T) * scale
    causal = torch.arange(keys.shape[0], device=keys.device)[None, :] <= pos[:, None]
    return logits.masked_fill(~causal, float("-inf")).softmax(dim=-1)


class _Accumulator:
    """Sums over heads and rows: pairs, squared errors, kept masses."""

    def __init__(self) -> None:
        self.pairs = 0.0
        self.causal_pairs = 0.0
        self.err2 = 0.0
        self.ref2 = 0.0
        self.kept: list[torch.Tensor] = []

    def add(self, probs, keep, values, pos) -> None:
        """``keep``: ``(c, S)`` bool, causal; ``values``: ``(S, Dv)``; ``pos``: row positions."""
        kept = (probs * keep).sum(dim=-1)
        exact = probs @ values
        masked = ((probs * keep) @ values) / kept.clamp_min(1e-300)[:, None]
        self.pairs += float(keep.sum())
        self.causal_pairs += float((pos + 1).sum())
        self.err2 += float(((masked - exact) ** 2).sum())
        self.ref2 += float((exact**2).sum())
        self.kept.append(kept.float().cpu())

    def result(self) -> MaskQuality:
        kept = torch.cat(self.kept)
        return MaskQuality(
            density=self.pairs / self.causal_pairs,
            output_error=(self.err2 / max(self.ref2, 1e-300)) ** 0.5,
            kept_mass_min=float(kept.min()),
            kept_mass_p1=float(torch.quantile(kept, 0.01)),
            kept_mass_mean=float(kept.mean()),
        )


def _heads(q, k, v):
    """``(b, h, q_head, k_head, v_head)`` for every batch row and query head (GQA aware)."""
    B, Hq = q.shape[:2]
    group = Hq // k.shape[1]
    for b in range(B):
        for h in range(Hq):
            yield b, h, q[b, h], k[b, h // group], v[b, h // group]


def evaluate_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep_rows: Callable[[int, int, torch.Tensor], torch.Tensor],
    *,
    scale: float | None = None,
    chunk: int = 512,
    rows: torch.Tensor | None = None,
) -> MaskQuality:
    """Score a mask, given row by row, against exact attention.

    Args:
        q: ``(B, Hq, S, D)``.
        k: ``(B, Hkv, S, D)``.
        v: ``(B, Hkv, S, Dv)``.
        keep_rows: ``(b, h, rows) -> (len(rows), S)`` bool, the keys query rows ``rows`` of
            batch row ``b`` and head ``h`` attend (intersected with causality here).
        scale: softmax scale, ``1/sqrt(D)`` if None.
        chunk: query rows per step (memory ``chunk x S`` doubles).
        rows: score only the query rows at these positions (default: all); density then
            counts their causal pairs.

    Returns:
        The :class:`MaskQuality` of the mask.
    """
    S = q.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    keys = torch.arange(S, device=q.device)
    positions = _rows(q, rows)
    acc = _Accumulator()
    for b, h, qh, kh, vh in _heads(q, k, v):
        for pos in _row_chunks(positions, chunk):
            probs = _exact_probs(qh[pos], kh, pos, scale)
            keep = keep_rows(b, h, pos) & (keys[None, :] <= pos[:, None])
            acc.add(probs, keep, vh.double(), pos)
    return acc.result()


def evaluate_plan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: PrefillPlan,
    *,
    chunk: int = 512,
    rows: torch.Tensor | None = None,
) -> MaskQuality:
    """Score what :func:`~flexsample.run_plan` computes for ``plan`` on these inputs (only
    the query rows at ``rows``, if given; see :func:`evaluate_mask`).

    A dense plan keeps every causal pair (density 1, error 0 up to rounding).
    """
    if plan.pattern is None:
        return evaluate_mask(
            q,
            k,
            v,
            lambda b, h, pos: torch.ones(len(pos), q.shape[2], dtype=torch.bool, device=q.device),
            scale=plan.scale,
            chunk=chunk,
            rows=rows,
        )
    pattern, heads = plan.pattern, plan.num_heads

    def keep_rows(b: int, h: int, pos: torch.Tensor) -> torch.Tensor:
        return pattern.keep_heads(torch.full_like(pos, b * heads + h), pos)

    return evaluate_mask(q, k, v, keep_rows, scale=plan.scale, chunk=chunk, rows=rows)


def oracle_frontier(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    alphas: Sequence[float],
    *,
    unit: str = "token",
    block_size: int = 128,
    scale: float | None = None,
    chunk: int = 256,
    rows: torch.Tensor | None = None,
    query_tile: int | None = None,
) -> dict[float, MaskQuality]:
    """The per-row oracle at each ``alpha``: every row keeps its fewest keys reaching alpha;
    with ``query_tile``, the query-tile oracle: the rows of a tile share their keys.

    The query-tile oracle ranks keys (or key tiles) by their mass summed over the tile's
    rows and keeps, for the whole tile, the shortest prefix of that ranking that gives each
    of its rows ``alpha`` of its mass: what a kernel computing whole query tiles can reach
    (a greedy answer to a covering problem, so an upper bound of the fewest keys, and the
    same as the per-row oracle for a tile of one row). Density counts each row's causal
    keys in its tile's set.

    Args:
        q: ``(B, Hq, S, D)``.
        k: ``(B, Hkv, S, D)``.
        v: ``(B, Hkv, S, Dv)``.
        alphas: mass thresholds in ``(0, 1]``.
        unit: ``"token"`` (keep single keys) or ``"tile"`` (keep whole ``block_size`` key
            blocks, a row's own blocks: the best any per-row tile mask can do).
        block_size: tile width for ``unit="tile"``.
        scale: softmax scale, ``1/sqrt(D)`` if None.
        chunk: query rows per step (per-row oracle).
        rows: score only the query rows at these positions (default: all). With
            ``query_tile``, a tile holds the given rows in it (give whole tiles: a tile's
            rows left out are not held to alpha).
        query_tile: rows per query tile (positions ``t * query_tile ..``), e.g. the
            kernel's 128; None: the per-row oracle.

    Returns:
        ``{alpha: MaskQuality}``.

    Raises:
        ValueError: an alpha outside ``(0, 1]``, an unknown ``unit`` or a ``query_tile``
            below 1.
    """
    if unit not in ("token", "tile"):
        raise ValueError(f"unit must be 'token' or 'tile', got {unit!r}")
    if not all(0 < a <= 1 for a in alphas):
        raise ValueError(f"alphas must lie in (0, 1], got {list(alphas)}")
    if query_tile is not None and query_tile < 1:
        raise ValueError(f"query_tile must be at least 1 row, got {query_tile}")
    S = q.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    n = -(-S // block_size)
    positions = _rows(q, rows)
    keys = torch.arange(S, device=q.device)
    accs = {a: _Accumulator() for a in alphas}
    for _, _, qh, kh, vh in _heads(q, k, v):
        values = vh.double()
        groups = (
            _row_chunks(positions, chunk)
            if query_tile is None
            else _query_tiles(positions, query_tile)
        )
        for pos in groups:
            probs = _exact_probs(qh[pos], kh, pos, scale)
            if unit == "token":
                units = probs
            else:
                padded = torch.nn.functional.pad(probs, (0, n * block_size - S))
                units = padded.view(len(pos), n, block_size).sum(dim=-1)
            for alpha, keep_units in _oracle_units(units, alphas, shared=query_tile is not None):
                if unit == "token":
                    keep = keep_units
                else:
                    keep = keep_units.repeat_interleave(block_size, dim=-1)[:, :S]
                accs[alpha].add(probs, keep & (keys[None, :] <= pos[:, None]), values, pos)
    return {a: acc.result() for a, acc in accs.items()}


def _query_tiles(positions: torch.Tensor, query_tile: int) -> Iterator[torch.Tensor]:
    """The positions of each query tile that holds any, tile by tile."""
    tiles = positions // query_tile
    for tile in torch.unique(tiles).tolist():
        yield positions[tiles == tile]


def _oracle_units(
    units: torch.Tensor, alphas: Sequence[float], *, shared: bool
) -> Iterator[tuple[float, torch.Tensor]]:
    """``(alpha, keep (R, N) bool)``: the units (keys or key tiles) each of ``R`` rows keeps,
    from their masses ``units (R, N)``: per row its heaviest reaching alpha, or (``shared``)
    for all rows one prefix of the units ranked by summed mass, the shortest giving every
    row alpha."""
    if not shared:
        ordered, order = units.sort(dim=-1, descending=True)
        before = ordered.cumsum(dim=-1) - ordered  # mass of the heavier units
        for alpha in alphas:
            take = (before < alpha - 1e-12) & (ordered > 0)
            yield alpha, torch.zeros_like(take).scatter_(-1, order, take)
        return
    order = units.sum(dim=0).argsort(descending=True)
    reached = units[:, order].cumsum(dim=-1)  # (R, N): each row's mass over a prefix
    for alpha in alphas:
        # Units each row needs: those before its mass reaches alpha, and the one that does.
        needed = (reached < alpha - 1e-12).sum(dim=-1) + 1
        length = min(int(needed.max()), units.shape[-1])
        keep = torch.zeros(units.shape[-1], dtype=torch.bool, device=units.device)
        keep[order[:length]] = True
        yield alpha, keep.expand(units.shape[0], -1)
