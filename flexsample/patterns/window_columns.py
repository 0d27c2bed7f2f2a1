"""The window + columns pattern: per head, a local window and key columns every later query
reads (SampleAttention's shape, flexsample's since 0.1).

Query ``q`` (in block ``qb``) of head ``h`` reads key ``j <= q`` iff ``j`` lies in its window
(:func:`window_start`: ``window_blocks[h]`` whole blocks before ``qb``, and on), in the sink
(``j < sink_blocks * block_size``), or among the head's columns. :func:`keeps` is that rule;
every other form here is held to it by the tests: the closed-form pair counts
(:func:`pair_density`), the block indices (:func:`kv_block_indices`, with
:func:`block_maps` its reference twin) and the ``mask_mod``.

The attention call reads ``[gathered columns | all keys]``: for each kv head, the columns of
each of its query heads, copied into a compact prefix of ``C`` keys (one slice of a whole
number of blocks per query head, or one for the whole group where it shares its columns),
then the keys in order. Query block ``qb`` of head ``h`` reads

* the blocks of its slice whose columns lie before its window (the one block where the
  window start falls is *partial*: the ``mask_mod`` checks each column's original position);
* key blocks ``window_start .. qb`` (full below the diagonal, partial on it).

Sink tokens are columns every head selects, so they are gathered too. Full blocks are
computed without a ``mask_mod`` call; the ``mask_mod`` is exact everywhere, so eager
FlexAttention and ``BlockMask.to_dense`` mean the same attention as compiled kernels.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask

from ..graphs import graphed
from ..layout import SampleLayout, bucket_length, local_pairs, query_blocks
from ..masks import check_padded, from_kv_blocks, int32_scalar
from ..products import attend_tile_keys, attend_with_lse, merge
from .base import MaskedCall, Pattern


def window_start(query_block, window_blocks):
    """The first key block of the window of the queries in ``query_block``: ``window_blocks``
    whole blocks before theirs (negative: the window reaches key 0). Tensors or numbers."""
    return query_block - window_blocks


def keeps(
    key: torch.Tensor,
    pos: torch.Tensor,
    start: torch.Tensor,
    sink_tokens: int,
    columns: torch.Tensor,
) -> torch.Tensor:
    """The rule: query ``pos`` reads ``key`` iff it is causal and in the window (from key
    ``start``), in the sink or a column (``columns``: bool, broadcast with ``key``)."""
    return (key <= pos) & ((key >= start) | (key < sink_tokens) | columns)


def row_keep(
    pos: torch.Tensor,
    window_blocks: torch.Tensor,
    columns: torch.Tensor,
    layout: SampleLayout,
    num_keys: int | None = None,
) -> torch.Tensor:
    """The keys that query ``pos`` of a head reads, row by row.

    Args:
        pos: ``(...)`` query positions.
        window_blocks: the window of each row's head in blocks (broadcasts with ``pos``).
        columns: ``(..., K)`` bool, the columns each row's head reads (broadcasts).
        layout: the geometry.
        num_keys: ``K``, the first keys only (a prefix the rows' causal keys fit in); all
            ``S`` if None.

    Returns:
        ``(..., K)`` bool, causal.
    """
    bs = layout.block_size
    key = torch.arange(layout.seq_len if num_keys is None else num_keys, device=pos.device)
    start = (window_start(pos // bs, window_blocks) * bs)[..., None]
    return keeps(key, pos[..., None], start, layout.sink_tokens, columns)


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
class WindowColumns(Pattern):
    """Per head a window and a set of key columns (see the module).

    Attributes:
        window_blocks: ``(B, Hq)`` int64 window per head, in blocks.
        columns: ``(B, Hq, S)`` bool, the key columns each query head reads (the sink
            tokens included).
        layout: the geometry they were chosen for.
        shared_by: runs of this many consecutive query heads have the same columns (1: no
            promise; set by :meth:`shared_by_group`), so :meth:`gathered` lists them once.
    """

    window_blocks: torch.Tensor
    columns: torch.Tensor
    layout: SampleLayout
    shared_by: int = 1

    name = "window+columns"

    def keep(self, rows: torch.Tensor) -> torch.Tensor:
        return row_keep(
            rows, self.window_blocks[..., None], self.columns[:, :, None, :], self.layout
        )

    def keep_heads(
        self, heads: torch.Tensor, rows: torch.Tensor, num_keys: int | None = None
    ) -> torch.Tensor:
        windows = self.window_blocks.flatten()[heads]
        columns = self.columns.flatten(0, 1)[:, :num_keys][heads]
        return row_keep(rows, windows, columns, self.layout, num_keys)

    def density(self) -> torch.Tensor:
        return pair_density(self.window_blocks, self.columns, self.layout)

    def row_tables(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        block = rows // self.layout.block_size
        start = window_start(block, self.window_blocks[..., None]).clamp(min=0)
        return start * self.layout.block_size, self.columns

    def with_keys(self, added: torch.Tensor) -> WindowColumns:
        """With ``added`` keys as columns (whole blocks where the layout's columns are
        blocks); per head, so without :attr:`shared_by`'s promise."""
        if self.layout.column_unit == "block":
            added = _whole_blocks(added, self.layout)
        return WindowColumns(self.window_blocks, self.columns | added, self.layout)

    def shared_by_group(self, group: int) -> WindowColumns:
        """Every query head's columns replaced by its GQA group's union (flexsample 0.3's
        selection, see :mod:`flexsample.presets`): more mass kept, more pairs computed."""
        B, Hq, S = self.columns.shape
        union = self.columns.view(B, Hq // group, group, S).any(dim=2, keepdim=True)
        return WindowColumns(
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

    def compile(self, group: int, *, static: bool = False) -> MaskedCall:
        gathered = self.gathered(group)
        padded = bucketed_shape(self.layout, gathered.positions.shape[-1]) if static else None
        block_mask = build_block_mask(
            self.window_blocks, gathered, self.layout, padded=padded, static=static
        )
        length = None if padded is None else padded[1]
        return WindowColumnsCall(
            block_mask=block_mask,
            layout=self.layout,
            arrange=functools.partial(gather_keys, gathered=gathered, length=length),
            padded=padded,
            gathered=gathered,
        )

    def tile_coverage(self) -> torch.Tensor:
        """``(B, H, N, N)`` share of each tile's keys read (:func:`tile_coverage`)."""
        return tile_coverage(self.window_blocks, self.columns, self.layout)

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
        tile_keys: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Each head's window and columns as dense products, in float32 (see
        :func:`attend_window_columns`); ``tile_keys (B, Hq, T, C)``: and each query tile's
        own keys (:class:`~flexsample.patterns.TileKeys`)."""
        group = q.shape[1] // k.shape[1]
        positions = self.gathered(group).per_query_head()
        windows = self.window_blocks.tolist()
        B, Hq, L, D = q.shape
        nb, bs = self.layout.num_blocks, self.layout.block_size
        out = q.new_empty(B, Hq, L, D)
        for b in range(B):
            for kv in range(k.shape[1]):
                # Whole blocks of keys: a block's window is then a view of them.
                keys, values = (_whole_key_blocks(x[b, kv].float(), nb * bs) for x in (k, v))
                for h in range(kv * group, (kv + 1) * group):
                    attend_window_columns(
                        q[b, h].float(), keys, values, windows[b][h], positions[b, h],
                        self.layout, scale, out=out[b, h],
                        tile_keys=None if tile_keys is None else tile_keys[b, h],
                    )  # fmt: skip
        return out


def _whole_key_blocks(x: torch.Tensor, length: int) -> torch.Tensor:
    """``x (S, D)`` contiguous and zero-padded to ``length`` rows (itself where it is both)."""
    return x.contiguous() if x.shape[0] == length else F.pad(x, (0, 0, 0, length - x.shape[0]))


def attend_window_columns(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    window_blocks: int,
    positions: torch.Tensor,
    layout: SampleLayout,
    scale: float,
    out: torch.Tensor | None = None,
    tile_keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """One head's attention under the rule, as dense products over the keys it reads.

    Disjoint key sets, each one call of the fused CPU kernel
    (:func:`~flexsample.products.attend_with_lse`), merged by their log-sum-exp:

    * rows whose window reaches key 0: causal attention over that prefix;
    * every later query block: the ``window_blocks`` whole blocks before it and its own
      block, one strided view of the keys (no copy) with a mask causal on the diagonal
      block, and the columns before its window start (the gathered positions, with a mask
      where a block's start cuts the list).

    Args:
        q: ``(L, D)`` float32, the last ``L`` of ``S`` positions.
        keys: ``(num_blocks * block_size, D)`` float32, contiguous, zero after ``S``.
        values: likewise.
        window_blocks: the head's window in blocks.
        positions: ``(C,)`` the head's columns, ascending, padded with ``S``
            (:meth:`GatheredColumns.per_query_head`).
        layout: the geometry.
        scale: softmax scale.
        out: ``(L, D)`` to write the rows into (converted to its dtype), or None.
        tile_keys: ``(T, C)`` each query tile's own keys (before its window, not columns;
            padded with ``S`` or beyond), read by the tile's every row; None: none.

    Returns:
        ``out``, or a new ``(L, D)`` float32 tensor.
    """
    L, D = q.shape
    S, bs = layout.seq_len, layout.block_size
    first = S - L
    window = min(window_blocks, layout.num_blocks)
    out = q.new_empty(L, D) if out is None else out
    # Rows before block window + 1 read every causal key: their window starts at key 0.
    prefix = min(S, (window + 1) * bs) - first
    if prefix > 0:
        rows = q[None, None, :prefix]
        if first == 0:
            part, _ = attend_with_lse(
                rows, keys[None, None, :prefix], values[None, None, :prefix], scale, causal=True
            )
        else:  # a chunk's queries: causal from the bottom right
            visible = torch.ones(prefix, first + prefix, dtype=torch.bool).tril(first)
            mask = torch.zeros(visible.shape).masked_fill_(~visible, -math.inf)
            part, _ = attend_with_lse(
                rows, keys[None, None, : first + prefix], values[None, None, : first + prefix],
                scale, mask=mask,
            )  # fmt: skip
        out[:prefix] = part[0, 0]
    done = max(prefix, 0)
    if done == L:
        return out
    # The rest, in whole query blocks from qb0 (the first padded in front by `lead` rows).
    start_row = first + done
    qb0, lead = divmod(start_row, bs)
    rows_left = L - done
    blocks = -(-(lead + rows_left) // bs)
    mine = slice(lead, lead + rows_left)
    tail = blocks * bs - lead - rows_left
    tiles = (F.pad(q[done:], (0, 0, lead, tail)) if lead or tail else q[done:]).view(
        blocks, 1, bs, D
    )
    # (blocks, 1, width, D): block qb0 + i reads the window's blocks and its own.
    width = (window + 1) * bs
    shape, strides = (blocks, 1, width, D), (bs * D, bs * D, D, 1)

    def blocks_of(x: torch.Tensor) -> torch.Tensor:  # as_strided's offset is the storage's
        return x.as_strided(shape, strides, x.storage_offset() + (qb0 - window) * bs * D)

    o, lse = attend_with_lse(
        tiles,
        blocks_of(keys),
        blocks_of(values),
        scale,
        causal=not window,
        mask=_window_mask(bs, window, q.dtype) if window else None,
    )
    parts = [(o.reshape(-1, D)[mine], lse.reshape(-1)[mine])]
    columns = _before_windows(q[done:], keys, values, positions, start_row, window, layout, scale)
    if columns is not None:
        parts.append(columns)
    if tile_keys is not None and tile_keys.shape[-1]:
        # The prefix rows' tiles hold none (nothing lies before their window).
        first_tile = qb0 - layout.first_query_block
        o, lse = attend_tile_keys(
            tiles, keys[:S], values[:S], tile_keys[first_tile : first_tile + blocks], scale
        )
        parts.append((o.reshape(-1, D)[mine], lse.reshape(-1)[mine]))
    out[done:] = merge(parts)
    return out


@functools.lru_cache(maxsize=64)
def _window_mask(block_size: int, window_blocks: int, dtype: torch.dtype) -> torch.Tensor:
    """``(block_size, (window_blocks + 1) * block_size)`` additive mask of a query block over
    its window and its own block: 0, and ``-inf`` above the diagonal of the last block."""
    mask = torch.zeros(block_size, (window_blocks + 1) * block_size, dtype=dtype)
    above = torch.ones(block_size, block_size, dtype=torch.bool).triu(1)
    mask[:, window_blocks * block_size :].masked_fill_(above, -math.inf)
    return mask


#: Query rows per call of :func:`_before_windows`: each call reads the columns before its
#: last row's window start, so earlier rows read few they must mask (whole blocks).
COLUMN_CHUNK_ROWS = 1024


def _before_windows(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    first: int,
    window: int,
    layout: SampleLayout,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(out, lse)`` of query rows ``first ..`` over the columns before their window start
    (``lse = -inf`` for rows that read none); None where no row reads any."""
    R, D = q.shape
    bs = layout.block_size
    start = window_start(torch.arange(first, first + R) // bs, window) * bs
    out, lse = q.new_zeros(R, D), q.new_full((R,), -math.inf)
    found = False
    edges = list(range(COLUMN_CHUNK_ROWS, R, COLUMN_CHUNK_ROWS))
    for lo, hi in zip([0, *edges], [*edges, R], strict=True):
        count = int((positions < start[hi - 1]).sum())  # ascending: a prefix
        if not count:
            continue
        cols = positions[:count]
        cut = start[lo:hi, None]
        mask = torch.zeros(hi - lo, count).masked_fill_(cols >= cut, -math.inf)
        o, chunk_lse = attend_with_lse(
            q[None, None, lo:hi], keys[cols][None, None], values[cols][None, None], scale,
            mask=mask,
        )  # fmt: skip
        reads = cols[0] < cut[:, 0]  # rows before any column's window start read none
        out[lo:hi] = o[0, 0]
        lse[lo:hi] = torch.where(reads, chunk_lse[0, 0], -math.inf)
        found = True
    return (out, lse) if found else None


@dataclass(frozen=True, eq=False)
class WindowColumnsCall(MaskedCall):
    """A :class:`~flexsample.patterns.MaskedCall` that also says which columns it gathers."""

    gathered: GatheredColumns | None = None


def _whole_blocks(columns: torch.Tensor, layout: SampleLayout) -> torch.Tensor:
    S, bs, n = layout.seq_len, layout.block_size, layout.num_blocks
    padded = torch.nn.functional.pad(columns, (0, n * bs - S))
    blocks = padded.view(*columns.shape[:-1], n, bs).any(dim=-1)
    return blocks.repeat_interleave(bs, dim=-1)[..., :S]


def key_codes(gathered: GatheredColumns, seq_len: int) -> torch.Tensor:
    """``(B, Hq, C + S)`` int32: what each key the attention call reads is, per query head.

    A column of the slice a query head reads, at original position ``p``, is coded
    ``-(p + 1)`` (negative), the other slices of its kv head's list ``-(S + 1)`` (position
    ``S``, which no query attends), the keys that follow by their position ``0 .. S - 1``.

    Args:
        gathered: from :meth:`WindowColumns.gathered`.
        seq_len: ``S``.
    """
    positions, group, slices = gathered.positions, gathered.group, gathered.slices
    B, Hkv, C = positions.shape
    own = -(positions.view(B, Hkv, 1, slices, gathered.width) + 1)  # (B, Hkv, 1, slice, W)
    slice_ids = torch.arange(slices, device=positions.device)
    mine = (gathered.slice_of_head()[:, None] == slice_ids[None, :])[:, :, None]  # (j, s, 1)
    prefix = torch.where(mine, own, -(seq_len + 1)).view(B, Hkv * group, C)
    tail = torch.arange(seq_len, device=positions.device).expand(B, Hkv * group, seq_len)
    return torch.cat([prefix, tail], dim=-1).to(torch.int32).contiguous()


def sample_attention_mask_mod(
    codes: torch.Tensor,
    window_blocks: torch.Tensor,
    block_size: int,
    *,
    query_offset: int = 0,
    static: bool = False,
):
    """The exact ``mask_mod`` of a SampleAttention call over ``[gathered | keys]``.

    Query ``q`` reads a gathered column iff its position is before ``q``'s window, and a key
    of the second part iff it is in the window and causal.

    Written for inductor's CPU template (torch 2.13), which miscompiles lookups into
    captured tensors in several shapes (C++ that names an undeclared ``cur_kvSplitSize5``):
    only flat 1-D tensors are indexed, every number is a 0-d tensor (a captured Python int
    becomes a symbol under ``dynamic=True``), and the call runs without duck sizing (see
    :func:`flexsample.attention.sparse_attention`). ``tests/test_attention.py`` compiles it
    over batch sizes, head counts and lengths. FlashAttention-4's code generator takes
    captured tensors but not 0-d ones ("Expected TensorSSA, but got int"); it compiles per
    static shape, where plain Python ints are constants: ``static=True`` uses those.

    Args:
        codes: ``(B, Hq, C + S)`` from :func:`key_codes`.
        window_blocks: ``(B, Hq)`` window per head, in blocks.
        block_size: tile side in tokens.
        query_offset: position of the call's query row 0 (a multiple of ``block_size``).
        static: the numbers as Python ints, for a kernel compiled per static shape.
    """
    _, H, L = codes.shape
    flat_codes = codes.reshape(-1)
    flat_windows = window_blocks.to(torch.int32).reshape(-1).contiguous()

    def number(x: int) -> torch.Tensor | int:
        return x if static else int32_scalar(x, codes.device)

    heads, length, tile = number(H), number(L), number(block_size)
    offset = number(query_offset)

    def sample_attention_mask(b, h, q_idx, kv_idx):
        q_idx = q_idx + offset
        head = b * heads + h
        code = flat_codes[head * length + kv_idx]
        start = window_start(q_idx // tile, flat_windows[head]) * tile
        gathered = code < 0
        return torch.where(gathered, -code - 1 < start, (code <= q_idx) & (code >= start))

    return sample_attention_mask


def block_maps(
    window_blocks: torch.Tensor, gathered: GatheredColumns, layout: SampleLayout
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which ``(query block, kv block)`` pairs are full and which partial (the dense maps
    :func:`kv_block_indices` writes the indices of directly; kept as its reference twin).

    Args:
        window_blocks: ``(B, Hq)`` window per head, in blocks.
        gathered: from :meth:`WindowColumns.gathered`: ``C`` positions per
            kv head in ascending slices of whole blocks (padding ``S``).
        layout: the geometry.

    Returns:
        ``(full, partial)``, each ``(B, Hq, Nq, C / block_size + N)`` bool, where ``Nq``
        counts the query blocks from ``layout.first_query_block``.
    """
    bs, n = layout.block_size, layout.num_blocks
    Hq = window_blocks.shape[1]
    width = gathered.width  # columns per slice
    dev = window_blocks.device
    qb = torch.arange(layout.first_query_block, n, device=dev)
    kb = torch.arange(n, device=dev)
    start = window_start(qb[None, None, :], window_blocks[..., None])  # (B, Hq, Nq)
    # Gathered part: in the slice the head reads, the columns before the window start (a
    # prefix of the ascending slice).
    own = gathered.per_query_head().contiguous()
    before = torch.searchsorted(own, (start.clamp(min=0) * bs).contiguous())  # (B, Hq, Nq)
    slot = torch.arange(gathered.positions.shape[-1] // bs, device=dev)
    first = gathered.slice_of_head().repeat(Hq // gathered.group) * (width // bs)  # (Hq,)
    c = (slot[None, :] - first[:, None])[None, :, None, :]  # block index within the slice
    g_full = (c >= 0) & (c < (before // bs)[..., None])
    g_partial = (c == (before // bs)[..., None]) & (before % bs != 0)[..., None]
    # Key part: the window; the diagonal is the only partial block.
    below = kb[None, :] < qb[:, None]
    k_full = below & (kb[None, None, None, :] >= start[..., None])
    k_partial = (kb[None, :] == qb[:, None]).expand_as(k_full)
    return torch.cat([g_full, k_full], dim=-1), torch.cat([g_partial, k_partial], dim=-1)


def kv_block_indices(
    window_blocks: torch.Tensor, gathered: GatheredColumns, layout: SampleLayout
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``BlockMask.from_kv_blocks``'s ``(full_num, full_idx, partial_num, partial_idx)``,
    written directly: the fast twin of ``block_map_indices`` on :func:`block_maps` (tests hold
    them equal).

    Each query block's full blocks are two runs, the gathered slots before its window start
    and the key blocks from the window start to the diagonal; its partial blocks are the
    gathered slot where the window start falls (if it falls inside one) and the diagonal. So
    the indices are arithmetic on ``(B, Hq, Nq)`` counts, with no ``(B, Hq, Nq, Nkv)``
    boolean maps, cumulative sums or scatters (at 128K tokens those cost milliseconds).

    Returns:
        ``(B, Hq, Nq)`` int32 counts and ``(B, Hq, Nq, C / block_size + N)`` int32 ascending
        block indices (zeros after the count), as :func:`block_map_indices` gives them.
    """
    bs, n = layout.block_size, layout.num_blocks
    Hq = window_blocks.shape[1]
    dev = window_blocks.device
    i32 = torch.int32  # (B, Hq, Nq, Nkv) is large: every op on it in int32
    gathered_blocks = gathered.positions.shape[-1] // bs
    qb = torch.arange(layout.first_query_block, n, device=dev, dtype=i32)
    start = window_start(qb, window_blocks.to(i32)[..., None]).clamp(min=0)  # (B, Hq, Nq)
    own = gathered.per_query_head().contiguous()
    # columns of the head's slice before its window start
    before = torch.searchsorted(own, (start.long() * bs).contiguous(), out_int32=True)
    first = gathered.slice_of_head().repeat(Hq // gathered.group) * (gathered.width // bs)
    first = first.to(i32)[None, :, None]  # (1, Hq, 1): the head's slice, in blocks
    g_full, g_partial = before // bs, before % bs != 0
    full_num = g_full + (qb - start)
    j = torch.arange(gathered_blocks + n, device=dev, dtype=i32)
    full_idx = torch.where(
        j < g_full[..., None],
        first[..., None] + j,
        (gathered_blocks + start - g_full)[..., None] + j,
    )
    full_idx = torch.where(j < full_num[..., None], full_idx, 0)
    diagonal = (gathered_blocks + qb).expand_as(start)
    part_idx = torch.zeros(*start.shape, j.numel(), dtype=i32, device=dev)
    part_idx[..., 0] = torch.where(g_partial, first + g_full, diagonal)
    if j.numel() > 1:  # else there is no gathered block, and no second partial one
        part_idx[..., 1] = torch.where(g_partial, diagonal, 0)
    return full_num, full_idx.contiguous(), (g_partial + 1).to(i32), part_idx


def build_block_mask(
    window_blocks: torch.Tensor,
    gathered: GatheredColumns,
    layout: SampleLayout,
    *,
    padded: tuple[int, int] | None = None,
    static: bool = False,
) -> BlockMask:
    """The SampleAttention ``BlockMask`` over ``(B, Hq, S - offset, C + S)``.

    Its query rows start at the first query's block, ``offset = first_query_block *
    block_size`` (0 for a whole prompt): the caller pads the queries in front to it.

    Args:
        window_blocks: ``(B, Hq)`` window per head, in blocks.
        gathered: from :meth:`WindowColumns.gathered`.
        layout: the geometry.
        padded: ``(query rows, keys)``, multiples of the block size at least ``S - offset``
            and ``C + S``: a mask over that larger shape, for a kernel compiled per static
            shape (see :func:`bucket_length`). The extra query blocks read no key block (no
            work), the extra keys no query; the caller pads q at the end and keys and
            values after ``C + S`` (see :func:`pad_sequence`).
        static: for a kernel compiled per static shape: the ``mask_mod`` holds its numbers
            as Python ints (see :func:`sample_attention_mask_mod`).

    Returns:
        A ``BlockMask`` for ``flex_attention`` with keys and values laid out by
        :func:`gather_keys`. It carries no transposed indices where the torch version allows
        skipping them, so it serves the forward pass only.
    """
    S, bs = layout.seq_len, layout.block_size
    offset = layout.first_query_block * bs
    rows, keys = mask_shape(layout, gathered.positions.shape[-1])
    group, slices = gathered.group, gathered.slices

    def indices(windows: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        columns = GatheredColumns(positions=positions, group=group, slices=slices)
        return (*kv_block_indices(windows, columns, layout), key_codes(columns, S))

    # Sync-free and launch-bound on a GPU: replayed as a CUDA graph there (the gathered
    # width is bucketed, see WindowColumns.gathered, so that layers share a few shapes).
    full_num, full_idx, part_num, part_idx, codes = graphed(
        ("build_block_mask", layout, group, slices), indices, (window_blocks, gathered.positions)
    )
    if padded is not None:
        rows, keys = check_padded(padded, rows, keys, bs)
        # The extra query blocks read no block; the extra key blocks are read by none.
        grow_rows = (0, rows // bs - full_num.shape[-1])
        grow = (0, keys // bs - full_idx.shape[-1], *grow_rows)
        full_num, part_num = (F.pad(t, grow_rows) for t in (full_num, part_num))
        full_idx, part_idx = (F.pad(t, grow) for t in (full_idx, part_idx))
        # Padding keys sit after every query (position S): never attended.
        codes = F.pad(codes, (0, keys - codes.shape[-1]), value=S)
    mask_mod = sample_attention_mask_mod(
        codes, window_blocks, bs, query_offset=offset, static=static
    )
    return from_kv_blocks(
        part_num,
        part_idx,
        full_num,
        full_idx,
        block_size=bs,
        mask_mod=mask_mod,
        seq_lengths=(rows, keys),
    )


def mask_shape(layout: SampleLayout, num_gathered: int) -> tuple[int, int]:
    """``(query rows, keys)`` of the unpadded mask (:func:`build_block_mask`): rows from
    the first query's block, ``S - offset``, and keys ``C + S``."""
    S = layout.seq_len
    return S - layout.first_query_block * layout.block_size, num_gathered + S


def bucketed_shape(layout: SampleLayout, num_gathered: int) -> tuple[int, int]:
    """``(query rows, keys)`` of a padded mask (:func:`build_block_mask`): those of
    :func:`mask_shape`, each padded to :func:`bucket_length`."""
    rows, keys = mask_shape(layout, num_gathered)
    return bucket_length(rows, layout.block_size), bucket_length(keys, layout.block_size)


def gather_keys(
    x: torch.Tensor, gathered: GatheredColumns, length: int | None = None
) -> torch.Tensor:
    """``[x at the gathered positions | x]`` along the sequence: ``(B, Hkv, C + S, D)``.

    Padding positions (``S``) read key ``S - 1``; the mask never lets a query attend them.
    With ``length``, zero rows follow up to that length (a padded shape, see
    :func:`build_block_mask`), in the same copy.
    """
    positions = gathered.positions
    S, D = x.shape[-2:]
    parts = []
    if positions.shape[-1]:
        index = positions.clamp(max=S - 1)[..., None].expand(-1, -1, -1, D)
        parts.append(x.gather(2, index))
    parts.append(x)
    extra = 0 if length is None else length - positions.shape[-1] - S
    if extra < 0:
        raise ValueError(f"length {length} is shorter than C + S = {positions.shape[-1] + S}")
    if extra:
        parts.append(x.new_zeros(*x.shape[:2], extra, D))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def pair_density(
    window_blocks: torch.Tensor, columns: torch.Tensor, layout: SampleLayout
) -> torch.Tensor:
    """``(B, H)`` computed (query, key) pairs over the queries' causal pairs.

    Every plan asks it (the density verdicts): a handful of operations, the per-window and
    per-block counts looked up from :func:`density_tables`. :meth:`WindowColumns.keep`
    counted element by element is its reference (tests hold them equal).

    Args:
        window_blocks: ``(B, H)`` window per head, in blocks.
        columns: ``(B, H, S)`` bool, the columns each head attends.
        layout: the geometry.
    """
    qb, rows, local = density_tables(layout, columns.device)
    start = window_start(qb, window_blocks[..., None]).clamp(min=0) * layout.block_size
    # Columns before each query block's window start (the same for all its queries), the
    # sink's excepted (the window count holds it): prefix sums at block boundaries.
    prefix = F.pad(columns.cumsum(dim=-1), (1, 0))  # (B, H, S + 1) int64
    sink = prefix[..., layout.sink_tokens : layout.sink_tokens + 1]
    before = (prefix.gather(-1, start) - sink).clamp(min=0)
    kept = local[window_blocks.clamp(max=layout.num_blocks)] + (before * rows).sum(dim=-1)
    return kept.double() / layout.causal_pairs


@functools.lru_cache(maxsize=64)
def density_tables(
    layout: SampleLayout, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(qb, rows, local)`` for :func:`pair_density`, once per layout and device: each query
    block's index and number of queries, and the causal pairs a window of ``w`` blocks and
    the sink keep, for every ``w`` from 0 to the whole sequence (:func:`local_pairs`).
    Shared: read them, do not write."""
    qb, _, rows = query_blocks(layout, device)
    windows = torch.arange(layout.num_blocks + 1, device=device)
    return qb, rows, local_pairs(windows, layout)


def tile_coverage(
    window_blocks: torch.Tensor, columns: torch.Tensor, layout: SampleLayout
) -> torch.Tensor:
    """``(B, H, N, N)`` float: fraction of each causal tile's key columns a query block reads.

    1 for window, sink and diagonal tiles; for a tile before the window, the share of its
    ``block_size`` keys that are gathered columns. For pictures.
    """
    S, bs, n = layout.seq_len, layout.block_size, layout.num_blocks
    dev = columns.device
    padded = torch.nn.functional.pad(columns.float(), (0, n * bs - S))
    share = padded.view(*columns.shape[:-1], n, bs).mean(dim=-1)  # (B, H, N)
    qb = torch.arange(n, device=dev)[:, None]
    kb = torch.arange(n, device=dev)[None, :]
    local = (kb >= window_start(qb, window_blocks[..., None, None])) | (kb < layout.sink_blocks)
    causal = (kb <= qb) & (qb >= layout.first_query_block)
    return torch.where(local, 1.0, share[..., None, :].expand(-1, -1, n, -1)) * causal
