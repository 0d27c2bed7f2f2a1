"""Stage 2 — score-based filtering: per head, a local window and the fewest key columns that
reach the CRA threshold, at the window size that computes the fewest (query, key) pairs."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .graphs import graphed
from .layout import SampleLayout, bucket_length


@dataclass(frozen=True, eq=False)
class GatheredColumns:
    """The key positions each kv head gathers in front of its keys for the attention call.

    Kv head ``h``'s list holds ``slices`` ascending slices of ``width`` positions each,
    padded with ``S`` (a position no query attends); ``width`` is a whole number of blocks.
    With ``slices == group`` every query head has its own slice (query head ``h * group + j``
    reads slice ``j``); with ``slices == 1`` the group shares one (``group_union``), gathered
    once.

    Attributes:
        positions: ``(B, Hkv, slices * width)`` int64.
        group: query heads per kv head.
        slices: ``group`` or 1.
    """

    positions: torch.Tensor
    group: int
    slices: int

    @property
    def width(self) -> int:
        """Positions per slice."""
        return self.positions.shape[-1] // self.slices

    def slice_of_head(self) -> torch.Tensor:
        """``(group,)`` int64: the slice query head ``j`` of a group reads."""
        heads = torch.arange(self.group, device=self.positions.device)
        return heads * self.slices // self.group

    def per_query_head(self) -> torch.Tensor:
        """``(B, Hq, width)``: the slice each query head reads (a copy when slices are
        shared)."""
        B, Hkv, _ = self.positions.shape
        lists = self.positions.view(B, Hkv, self.slices, self.width)
        return lists[:, :, self.slice_of_head()].reshape(B, Hkv * self.group, self.width)


@dataclass(frozen=True, eq=False)
class ColumnSelection:
    """What stage 2 chose for every head: a window and a set of key columns.

    Query ``q`` (in block ``qb``) of head ``h`` attends key ``j <= q`` iff ``j`` is in its
    window (``j >= (qb - window_blocks[h]) * block_size``), in the sink
    (``j < sink_blocks * block_size``), or one of its own selected columns before the
    window.

    Attributes:
        window_blocks: ``(B, Hq)`` int64 window per head, in blocks.
        columns: ``(B, Hq, S)`` bool, the key columns each query head selected (the sink
            tokens included).
        layout: the geometry they were chosen for.
        shared_by: runs of this many consecutive query heads have the same columns (1: no
            promise; set by :meth:`shared_by_group`), so :meth:`gathered` lists them once.
    """

    window_blocks: torch.Tensor
    columns: torch.Tensor
    layout: SampleLayout
    shared_by: int = 1

    def shared_by_group(self, group: int) -> ColumnSelection:
        """This selection with every query head's columns replaced by its GQA group's union
        (``SampleConfig.group_union``): more mass kept, more pairs computed."""
        B, Hq, S = self.columns.shape
        union = self.columns.view(B, Hq // group, group, S).any(dim=2, keepdim=True)
        return ColumnSelection(
            window_blocks=self.window_blocks,
            columns=union.expand(-1, -1, group, -1).reshape(B, Hq, S),
            layout=self.layout,
            shared_by=group,
        )

    def gathered(self, group: int) -> GatheredColumns:
        """The columns the attention call gathers per kv head (``group`` query heads each).

        One slice per query head of the group, each holding that head's own columns; one
        slice per kv head where the group shares its columns (``shared_by`` a multiple of
        ``group``). ``width`` is the largest count over batch and heads, rounded up to whole
        blocks and then to :func:`~flexsample.bucket_length` (``2^k`` or ``3 * 2^k``
        blocks, at most 1.5x: layers share a few mask shapes, and so their CUDA graphs and
        static-shape kernels); 0 when no column is selected. Padding is never attended.
        Reads the count on the host.

        (flexsample 0.3 gave every query head its group's union by default; per-head columns
        (``group_union=False``, the default since 0.4) compute 23-37% fewer pairs on SmolLM2
        at 8K for 8-19% more output error, nearer the per-row oracle at equal error; see the
        frontier.)
        """
        B, Hq, S = self.columns.shape
        slices = 1 if self.shared_by % group == 0 else group
        cols = self.columns[:, :: group // slices]  # one head per slice
        count = int(cols.sum(dim=-1).max()) if cols.numel() else 0
        bs = self.layout.block_size
        width = bucket_length(count, bs) if count else 0
        # Selected column i of a head goes to slot i (the count of selected columns before
        # it): ascending without a sort. The rest go to a spare last slot, dropped.
        slot = torch.where(cols, cols.cumsum(dim=-1) - 1, width)
        own = torch.full((*cols.shape[:2], width + 1), S, dtype=torch.int64, device=cols.device)
        own.scatter_(-1, slot, torch.arange(S, device=cols.device).expand_as(cols))
        positions = own[..., :width].reshape(B, Hq // group, slices * width).contiguous()
        return GatheredColumns(positions=positions, group=group, slices=slices)


#: Memory per device type for weighing a batch of window candidates at once in
#: :func:`select_columns`. On CUDA selection is launch-bound below 32K, and batching cut it
#: from 3.2 to 1.7 ms at 8K on an H100; on CPU it is compute-bound (batching measured no
#: faster) and one candidate at a time keeps planning's memory below the size of q, k, v.
_SELECT_BUDGET_BYTES = {"cuda": 1 << 28}


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


def query_blocks(layout: SampleLayout, device: torch.device | str = "cpu"):
    """``(qb, first, rows)``, int64 over the query blocks: each block's index, its first
    query and its number of queries (the window and the columns before it are the same for
    every query of a block, so pair counts sum per block, not per query)."""
    bs = layout.block_size
    qb = torch.arange(layout.first_query_block, layout.num_blocks, device=device)
    first = (qb * bs).clamp(min=layout.query_start)
    rows = ((qb + 1) * bs).clamp(max=layout.seq_len) - first
    return qb, first, rows


def local_pairs(window_blocks: torch.Tensor, layout: SampleLayout) -> torch.Tensor:
    """Causal pairs that windows of ``window_blocks`` (any shape) and the sink keep.

    Closed form per query block: query ``q`` keeps keys ``start .. q`` of its block's window
    and the sink keys before ``start``.
    """
    qb, first, rows = query_blocks(layout, window_blocks.device)
    start = (qb - window_blocks[..., None]).clamp(min=0) * layout.block_size  # (..., blocks)
    last = first + rows - 1
    total = (
        (first + last) * rows // 2 - rows * (start - 1) + rows * start.clamp(max=layout.sink_tokens)
    )
    return total.sum(dim=-1)


@functools.lru_cache(maxsize=1024)
def window_pairs(layout: SampleLayout, window_blocks: int) -> int:
    """Causal (query, key) pairs a window of ``window_blocks`` blocks and the sink keep (on
    the host: :func:`local_pairs` of one window; cached per layout and window, as every layer
    of a prefill asks the same)."""
    return int(local_pairs(torch.tensor(window_blocks), layout))


#: Heaviest units per segment that selection weighs (:func:`select_columns`): the columns a
#: candidate takes are the heaviest eligible ones, so where they lie among the first
#: ``TOP_UNITS`` the result is the one the whole sorted list gives, at ``TOP_UNITS / S`` of
#: the work per candidate (a sixteenth at 128K).
TOP_UNITS = 8192
#: Units weighed first (:func:`select_columns`): a head whose answer these already decide
#: (every candidate they leave short costs more over them than the winner) is not weighed
#: again over :data:`TOP_UNITS`. Heads with sharp attention need a few hundred columns.
FIRST_UNITS = 1024


def select_columns(
    scores: torch.Tensor, layout: SampleLayout, alpha: float, *, top_units: int | None = None
) -> ColumnSelection:
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
        A :class:`ColumnSelection`.

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
    return ColumnSelection(window_blocks=window, columns=columns, layout=layout)


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
    budget = _SELECT_BUDGET_BYTES.get(dev.type, 0)
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


@functools.lru_cache(maxsize=64)
def window_candidate_tables(
    layout: SampleLayout, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The window candidates ``(c,)`` int64 in blocks and the causal pairs each keeps with
    the sink ``(c,)`` int64 (:func:`local_pairs`), on ``device``, once per layout: selection
    and the probe weigh the same candidates on every layer of a prefill (and a copy from the
    host waits on a GPU for the work queued before it). Shared: read them, do not write."""
    candidates = torch.tensor(layout.window_candidates(), device=device)
    return candidates, local_pairs(candidates, layout)


def column_readers(
    layout: SampleLayout, windows: torch.Tensor, first_token: torch.Tensor
) -> torch.Tensor:
    """``(c, n)``: for windows of ``windows (c,)`` blocks, how many queries read a column
    whose first token is ``first_token (n,)`` as a column: every query in the blocks after
    the column's block plus the window (earlier ones reach it with their window)."""
    bs = layout.block_size
    first_reader = ((first_token // bs + windows[:, None] + 1) * bs).clamp(min=layout.query_start)
    return (layout.seq_len - first_reader).clamp(min=0)


def keep_mask(
    window_blocks: torch.Tensor, columns: torch.Tensor, layout: SampleLayout, rows: torch.Tensor
) -> torch.Tensor:
    """Which keys the given query rows attend: window, sink, and columns before the window.

    Args:
        window_blocks: ``(B, H)`` window per head in blocks.
        columns: ``(B, H, S)`` bool, the columns each head attends.
        layout: the geometry.
        rows: ``(R,)`` query positions.

    Returns:
        ``(B, H, R, S)`` bool, causal.
    """
    return row_keep(rows, window_blocks[..., None], columns[:, :, None, :], layout)


def row_keep(
    pos: torch.Tensor, window_blocks: torch.Tensor, columns: torch.Tensor, layout: SampleLayout
) -> torch.Tensor:
    """:func:`keep_mask` row by row: the keys that query ``pos`` of a head attends.

    Args:
        pos: ``(...)`` query positions.
        window_blocks: the window of each row's head in blocks (broadcasts with ``pos``).
        columns: ``(..., S)`` bool, the columns each row's head attends (broadcasts).
        layout: the geometry.

    Returns:
        ``(..., S)`` bool, causal.
    """
    S, bs = layout.seq_len, layout.block_size
    key = torch.arange(S, device=pos.device)
    start = (((pos // bs) - window_blocks) * bs)[..., None]
    causal = key <= pos[..., None]
    local = (key >= start) | (key < layout.sink_tokens)
    return causal & (local | (columns & (key < start)))


def kept_sampled_mass(
    scores: torch.Tensor, window_blocks: torch.Tensor, columns: torch.Tensor, layout: SampleLayout
) -> torch.Tensor:
    """Fraction of each segment's sampled mass that window, sink and columns keep.

    Measured, like the selection, at each segment's last sampled row's window (earlier rows'
    windows start earlier and keep at least as much).

    Args:
        scores: ``(B, H, num_segments, S)`` sampled column mass.
        window_blocks: ``(B, H)`` windows in blocks.
        columns: ``(B, H, S)`` bool, the columns each head attends.
        layout: the geometry.

    Returns:
        ``(B, H, num_segments)``, at least ``alpha`` for the selection's own columns.
    """
    last_rows = layout.sampled_rows(scores.device)[:, -1]
    keep = keep_mask(window_blocks, columns, layout, last_rows)  # (B, H, G, S)
    return (scores * keep).sum(dim=-1) / scores.sum(dim=-1).clamp_min(1e-30)
