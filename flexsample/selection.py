"""Stage 2 — score-based filtering: per head, a local window and the fewest key columns that
reach the CRA threshold, at the window size that computes the fewest (query, key) pairs."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .graphs import graphed
from .layout import SampleLayout, column_readers, window_candidate_tables
from .patterns import WindowColumns
from .tuning import FIRST_UNITS, SELECT_BUDGET_BYTES, TOP_UNITS


def _check_scores(scores: object, layout: SampleLayout) -> torch.Tensor:
    if not isinstance(scores, torch.Tensor) or not scores.is_floating_point():
        raise TypeError("scores must be a floating-point torch.Tensor")
    expected = (layout.num_segments, layout.seq_len)
    if scores.dim() != 4 or tuple(scores.shape[-2:]) != expected:
        raise ValueError(
            f"scores must be (B, H, {expected[0]}, {expected[1]}) for this layout, "
            f"got shape {tuple(scores.shape)}"
        )
    return scores


def _units(scores: torch.Tensor, layout: SampleLayout):
    """Candidate columns: ``(mass (B,H,G,U), first token (U,), last token (U,), tokens (U,))``."""
    S, bs, n = layout.seq_len, layout.block_size, layout.num_blocks
    dev = scores.device
    if layout.column_unit == "token":
        pos = torch.arange(S, device=dev)
        return scores, pos, pos, torch.ones(S, dtype=torch.int64, device=dev)
    mass = F.pad(scores, (0, n * bs - S)).view(*scores.shape[:-1], n, bs).sum(dim=-1)
    first = torch.arange(n, device=dev) * bs
    last = (first + bs).clamp(max=S) - 1
    return mass, first, last, last - first + 1


def _mass_before(mass: torch.Tensor, last: torch.Tensor, S: int) -> torch.Tensor:
    """``(..., S + 1)``: for each token ``t``, the mass of the units ending before ``t``."""
    per_token = torch.zeros(*mass.shape[:-1], S + 1, dtype=mass.dtype, device=mass.device)
    # a unit counts from the token after its last one on
    per_token.index_add_(-1, last + 1, mass)
    return per_token.cumsum(dim=-1)


def select_columns(
    scores: torch.Tensor, layout: SampleLayout, alpha: float, *, top_units: int | None = None
) -> WindowColumns:
    """Choose each head's window and the fewest columns that, with it, keep ``alpha``.

    For every window candidate ``w`` (:meth:`SampleLayout.window_candidates`) and segment
    ``g``, the window is credited with the segment's sampled mass on the ``w * block_size``
    keys up to its last sampled row (what the window reaches from any row, wherever the row
    sits in its block) and the sink; columns before that are then taken in order of
    decreasing mass until the kept mass reaches ``alpha``, and the union over segments is
    the candidate's column set. Each head takes the candidate that computes the fewest
    (query, key) pairs: the window's pairs plus, for each column, the queries whose window
    starts after it.

    Only each segment's ``top_units`` heaviest units are weighed: a candidate whose columns
    reach ``alpha`` among them gets exactly the columns the whole list gives; one that would
    need lighter units is not eligible for that head (the whole-sequence window, which needs
    no columns, always is; a fixed window, the only candidate, weighs every unit). The
    result keeps ``alpha`` of every segment either way; it can only be denser than the
    unbounded search's. The search first weighs the :data:`FIRST_UNITS` heaviest, and weighs
    ``top_units`` only for the heads where a candidate those leave short could still win:
    the same result (up to the order of equal masses), with far less work where attention
    is sharp.

    Args:
        scores: ``(B, H, num_segments, S)`` from
            :func:`~flexsample.sampling.sample_column_scores`.
        layout: geometry of the prefill (window candidates, sink, column unit).
        alpha: CRA threshold in ``(0, 1]``.
        top_units: units weighed per segment (default :data:`TOP_UNITS`; ``S`` or more
            weighs them all).

    Returns:
        A :class:`~flexsample.patterns.WindowColumns`.

    Raises:
        TypeError: ``scores`` is not a floating tensor.
        ValueError: ``scores`` does not fit ``layout``, or ``alpha`` outside ``(0, 1]``.
    """
    scores = _check_scores(scores, layout)
    if not (0.0 < alpha <= 1.0):  # also rejects NaN
        raise ValueError(f"alpha must lie in (0, 1], got {alpha}")
    bs = layout.block_size
    U = layout.seq_len if layout.column_unit == "token" else layout.num_blocks
    top = min(U, TOP_UNITS if top_units is None else max(1, top_units))
    if layout.fixed_window_blocks is not None:
        top = U  # one candidate, no fallback: weigh every unit
    # The search is sync-free and launch-bound on a GPU: replayed as a CUDA graph there.
    short_list = min(top, FIRST_UNITS)
    dev = scores.device
    window, columns, undecided = graphed(
        ("select_columns", layout, alpha, short_list),
        functools.partial(_search, layout=layout, alpha=alpha, top=short_list),
        (scores,),
        keep=(window_candidate_tables(layout, dev), layout.sampled_rows(dev)),
    )
    if short_list < top:
        # The heaviest FIRST_UNITS were weighed first. A candidate they leave short would take
        # at least those units' columns, so their cost bounds its cost from below: where every
        # such bound exceeds the cheapest candidate that fits, the head's answer is final.
        # The other heads are weighed again over ``top`` units (one read on the host).
        redo = undecided.flatten().nonzero().squeeze(-1)
        if redo.numel():
            B, H = window.shape
            mass, first, last, tokens = _units(scores.float(), layout)
            sub = mass.flatten(0, 1)[redo][None]  # (1, heads, G, U)
            w2, c2, _ = _cheapest_candidates(sub, (first, last, tokens), layout, alpha, top)
            window = window.flatten().index_copy(0, redo, w2[0]).view(B, H)
            columns = columns.flatten(0, 1).index_copy(0, redo, c2[0]).view(B, H, U)
    if layout.column_unit == "block":
        columns = columns.repeat_interleave(bs, dim=-1)[..., : layout.seq_len]
    columns[..., : layout.sink_tokens] = True  # the sink: columns every head keeps
    return WindowColumns(window_blocks=window, columns=columns, layout=layout)


def _search(
    scores: torch.Tensor, *, layout: SampleLayout, alpha: float, top: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_cheapest_candidates` on raw scores: one sync-free step, for :func:`graphed`."""
    mass, first, last, tokens = _units(scores.float(), layout)
    return _cheapest_candidates(mass, (first, last, tokens), layout, alpha, top)


def _cheapest_candidates(
    mass: torch.Tensor,
    units: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    layout: SampleLayout,
    alpha: float,
    top: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`select_columns`' search over the ``top`` heaviest units of each segment.

    Args:
        mass: ``(B, H, G, U)`` sampled mass per unit.
        units: each unit's first token, last token and token count, ``(U,)`` each.
        layout: the geometry.
        alpha: CRA threshold.
        top: units weighed per segment (``U``: all).

    Returns:
        ``(window (B, H) int64, columns (B, H, U) bool, undecided (B, H) bool)``: the
        cheapest candidate that fits among the ``top`` units, and where a candidate they
        leave short might still be cheaper (its cost over them, a lower bound of its cost
        over all units, is at most the winner's).
    """
    first, last, tokens = units
    B, H, _, U = mass.shape
    S, bs = layout.seq_len, layout.block_size
    if top < U:
        ordered, order = mass.topk(top, dim=-1, sorted=True)
    else:
        ordered, order = mass.sort(dim=-1, descending=True)
    total = mass.sum(dim=-1, keepdim=True)
    if layout.column_unit == "token":  # a unit is its position: no gathered copies
        last_sorted = first_sorted = order
    else:
        last_sorted, first_sorted = last[order], first[order]
    # Each segment's window is measured from its last sampled row, in tokens: a window of w
    # blocks reaches at least w * block_size keys back from any row (rows at the start of
    # their block reach no further), so the mass it is credited with holds for every row.
    windows, window_pair_counts = window_candidate_tables(layout, mass.device)
    last_row = layout.sampled_rows(mass.device)[:, -1:]  # (G, 1)
    # Mass of the units that lie wholly before a token, for every token (the eligible mass
    # of a window starting there, sink included): (B, H, G, S + 1).
    before_token = _mass_before(mass, last, S)

    dev = mass.device
    best_cost = torch.full((B, H), float("inf"), device=dev, dtype=torch.float64)
    best_window = torch.zeros(B, H, dtype=torch.int64, device=dev)
    best_columns = torch.zeros(B, H, U, dtype=torch.bool, device=dev)
    least_short = torch.full((B, H), float("inf"), device=dev, dtype=torch.float64)
    candidates = layout.window_candidates()
    # Candidates are weighed a batch at a time (a leading dim) where the device's budget
    # allows (about 16 bytes per unit and candidate): few launches on a GPU at short lengths.
    budget = SELECT_BUDGET_BYTES.get(dev.type, 0)
    per_batch = max(1, budget // (16 * max(ordered.numel(), B * H * U)))
    sink_mass = before_token[..., min(layout.sink_tokens, S)]  # (B, H, G)
    flat_order = order.flatten(-2)  # (B, H, G * top)
    for i in range(0, len(candidates), per_batch):
        ws = candidates[i : i + per_batch]
        w = windows[i : i + per_batch].view(-1, 1, 1, 1, 1)  # (Wc, 1, 1, 1, 1)
        start = last_row - w * bs + 1  # (Wc, 1, 1, G, 1): the keys every row's window reaches
        eligible = (last_sorted < start) & (first_sorted >= layout.sink_tokens)
        outside = ordered * eligible
        # The window, the sink and whatever lies after the segment's rows hold the rest.
        index = start.clamp(min=0, max=S).expand(-1, B, H, -1, 1)
        eligible_all = (before_token.expand(len(ws), -1, -1, -1, -1).gather(-1, index))[..., 0]
        eligible_all = (eligible_all - sink_mass).clamp(min=0)  # (Wc, B, H, G)
        need = alpha * total[..., 0] - (total[..., 0] - eligible_all)
        held = outside.cumsum(dim=-1)
        before = held - outside  # eligible mass of the heavier units
        take = eligible & (before < need[..., None]) & (ordered > 0)
        # Where the heaviest units' eligible mass falls short of the need, lighter units would
        # be taken too: not weighed, so that candidate is out for the head here.
        short = (held[..., -1] < need).any(dim=-1) if top < U else None  # (Wc, B, H)
        chosen = torch.zeros(len(ws), B, H, U, dtype=torch.uint8, device=dev)
        chosen.scatter_reduce_(
            -1, flat_order.expand(len(ws), -1, -1, -1), take.flatten(-2).to(torch.uint8), "amax"
        )
        chosen = chosen.bool()  # (Wc, B, H, U): the union over segments
        readers = column_readers(layout, w.view(-1), first) * tokens  # (Wc, U)
        pairs = window_pair_counts[i : i + per_batch]
        cost = pairs.view(-1, 1, 1).double() + (chosen * readers[:, None, None, :]).sum(
            dim=-1, dtype=torch.float64
        )  # (Wc, B, H)
        if short is not None:
            bound = cost.masked_fill(~short, float("inf")).amin(dim=0)
            least_short = torch.minimum(least_short, bound)
            cost = cost.masked_fill(short, float("inf"))
        # The first (smallest) window wins ties, within a batch and across batches.
        cheapest, pick = cost.min(dim=0)
        better = cheapest < best_cost
        best_cost = torch.where(better, cheapest, best_cost)
        best_window = torch.where(better, w.view(-1)[pick], best_window)
        picked = chosen.gather(0, pick[None, :, :, None].expand(1, B, H, U))[0]
        best_columns = torch.where(better[..., None], picked, best_columns)
    return best_window, best_columns, least_short <= best_cost
