"""The query-aware pattern: a window + columns pattern, and per query tile the keys its rows
need beyond it.

A column every later query reads is the wrong shape for a key only some queries need (a
fact one passage asks about): one column set per head either misses it or makes every
query read it. Here query tile ``t`` (the queries of block ``first_query_block + t``, the
kernel's tile) of head ``h`` also reads ``keys[b, h, t]``: positions before the tile's
window, not among the head's columns, chosen for that tile
(:func:`~flexsample.tiles.select_tile_keys`). The rule, :meth:`TileKeys.keep`: the base
pattern's keys, and the tile's. It runs as gathered products (:meth:`TileKeys.attend`) or
as one FlexAttention call with each tile's keys gathered in front (:meth:`TileKeys.compile`).

Built after the base pattern's row cover (the cover's row kernels read window + columns
tables), so the cover's interface (:meth:`TileKeys.row_tables`, :meth:`TileKeys.with_keys`)
is not this pattern's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..layout import SampleLayout, query_blocks
from ..masks import from_kv_blocks, int32_scalar
from .base import MaskedCall, Pattern
from .window_columns import WindowColumns, window_start


@dataclass(frozen=True, eq=False)
class TileKeys(Pattern):
    """A :class:`~flexsample.patterns.WindowColumns` and per query tile its own keys.

    Build it with :meth:`create`, which keeps the invariant every form relies on: a tile's
    keys lie before its window start and are neither the head's columns nor sink tokens (so
    they are disjoint from what the base reads and causal for every row of the tile).

    Attributes:
        base: the window + columns every row of a head reads.
        keys: ``(B, Hq, T, C)`` int64, tile ``t``'s keys ascending, padded with ``S``;
            ``T`` query tiles from the layout's first query block.
    """

    base: WindowColumns
    keys: torch.Tensor

    name = "window+columns+tile keys"

    @classmethod
    def create(cls, base: WindowColumns, keys: torch.Tensor) -> TileKeys:
        """``base`` plus ``keys (B, Hq, T, C)`` (positions, any order, ``S`` or beyond for
        none), dropping repeats and those the rule gives a tile anyway or may not give it."""
        layout = base.layout
        S, bs = layout.seq_len, layout.block_size
        keys = keys.clamp(max=S)
        qb, _, _ = query_blocks(layout, keys.device)  # (T,) the tiles' blocks
        start = window_start(qb, base.window_blocks[..., None]) * bs  # (B, Hq, T)
        columns = torch.nn.functional.pad(base.columns, (0, 1))  # position S: not a column
        column = columns.gather(-1, keys.flatten(2)).view(keys.shape)
        keep = (keys < start[..., None]) & (keys >= layout.sink_tokens) & ~column
        keys = torch.where(keep, keys, S).sort(dim=-1).values
        repeated = F.pad(keys[..., 1:] == keys[..., :-1], (1, 0))  # each key once
        keys = keys.masked_fill(repeated, S).sort(dim=-1).values
        width = int((keys < S).sum(dim=-1).max()) if keys.numel() else 0
        return cls(base=base, keys=keys[..., :width].contiguous())

    @property
    def layout(self) -> SampleLayout:  # type: ignore[override]
        return self.base.layout

    def _tile_of(self, rows: torch.Tensor) -> torch.Tensor:
        return rows // self.layout.block_size - self.layout.first_query_block

    def keep(self, rows: torch.Tensor) -> torch.Tensor:
        keep = self.base.keep(rows)  # (B, H, R, S)
        keys = self.keys[:, :, self._tile_of(rows)]  # (B, H, R, C)
        return keep | _members(keys, keep.shape[-1])

    def keep_heads(
        self, heads: torch.Tensor, rows: torch.Tensor, num_keys: int | None = None
    ) -> torch.Tensor:
        keep = self.base.keep_heads(heads, rows, num_keys)  # (R, K)
        keys = self.keys.flatten(0, 1)[heads, self._tile_of(rows)]  # (R, C)
        return keep | _members(keys, keep.shape[-1])

    def counts(self) -> torch.Tensor:
        """``(B, Hq, T)`` int64: each tile's own keys."""
        return (self.keys < self.layout.seq_len).sum(dim=-1)

    def density(self) -> torch.Tensor:
        # Every query of a tile reads each of its keys (they lie before all of them).
        _, _, rows = query_blocks(self.layout, self.keys.device)
        tiles = (self.counts() * rows).sum(dim=-1)
        return self.base.density() + tiles.double() / self.layout.causal_pairs

    def row_tables(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise TypeError(
            "the row cover reads window + columns tables: it runs on the base pattern, "
            "before the tiles' keys are chosen"
        )

    def with_keys(self, added: torch.Tensor) -> Pattern:
        raise TypeError(
            "the row cover adds keys to the base pattern, before the tiles' keys are chosen"
        )

    def compile(self, group: int, *, static: bool = False) -> MaskedCall:
        """The base pattern's call with each tile's keys gathered in front of its keys.

        Kv head ``h`` reads ``[slots | the base's keys]``: one slot of ``W`` keys (the
        widest tile's count, in whole blocks) per query head of its group and query tile,
        holding that tile's keys; query block ``t`` of query head ``j`` of the group reads
        its own slot's blocks, then the base's (indices shifted past the slots). The
        ``mask_mod`` keeps a slot's first ``counts()`` keys and defers the rest to the
        base's. Not for kernels compiled per static shape (FlashAttention-4).
        """
        if static:
            raise NotImplementedError(
                "tile keys have no FlexAttention call for static-shape kernels (FlashAttention-4)"
            )
        base = self.base.compile(group)
        B, Hq, T, C = self.keys.shape
        bs = self.layout.block_size
        blocks = -(-C // bs)
        if not blocks:
            return base
        width = blocks * bs
        S, device = self.layout.seq_len, self.keys.device
        slots = F.pad(self.keys, (0, width - C), value=S).reshape(B, Hq // group, -1)
        prefix = slots.shape[-1]
        mask = base.block_mask
        rows = mask.kv_num_blocks.shape[-1]
        tile = torch.arange(rows, device=device).clamp(max=T - 1)
        head = torch.arange(Hq, device=device) % group
        own = ((head[:, None] * T + tile) * blocks)[..., None] + torch.arange(blocks, device=device)
        counts = self.counts()  # (B, Hq, T)
        used = (counts > 0)[..., tile].to(torch.int32)  # (B, Hq, rows)
        if rows > T:  # rows past the queries read nothing of their own
            used[..., T:] = 0
        # Own blocks first (they precede every base block: indices stay ascending), listed
        # only where the tile has keys; the index tables span every key block (FlexAttention
        # reads the key length off them).
        num, shift = mask.kv_num_blocks, prefix // bs
        based = mask.kv_indices + shift
        own = own.expand(B, -1, -1, -1).to(based.dtype)
        idx = torch.where(
            used[..., None].bool(), torch.cat([own, based], -1), torch.cat([based, own], -1)
        )
        idx = F.pad(idx, (0, shift - blocks))
        base_mod = mask.mask_mod
        # Written as the base's is for inductor's CPU template (see
        # sample_attention_mask_mod): flat 1-D lookups, every number a 0-d tensor.
        flat_counts = counts.to(torch.int32).reshape(-1).contiguous()
        heads, tiles, last, group_size, block, slot_width, start, zero = (
            int32_scalar(x, device) for x in (Hq, T, T - 1, group, bs, width, prefix, 0)
        )

        def mask_mod(b, h, q_idx, kv_idx):
            t = torch.minimum(q_idx // block, last)
            owner = (h % group_size) * tiles + t
            count = flat_counts[(b * heads + h) * tiles + t]
            mine = (kv_idx // slot_width == owner) & (kv_idx % slot_width < count)
            shifted = torch.maximum(kv_idx - start, zero)
            return torch.where(kv_idx < start, mine, base_mod(b, h, q_idx, shifted))

        block_mask = from_kv_blocks(
            num + blocks * used,
            idx,
            mask.full_kv_num_blocks,
            None
            if mask.full_kv_indices is None
            else F.pad(mask.full_kv_indices + shift, (0, shift)),
            block_size=bs,
            mask_mod=mask_mod,
            seq_lengths=(mask.seq_lengths[0], mask.seq_lengths[1] + prefix),
        )

        def arrange(x: torch.Tensor) -> torch.Tensor:
            index = slots.clamp(max=x.shape[2] - 1)[..., None].expand(-1, -1, -1, x.shape[-1])
            return torch.cat([x.gather(2, index), base.arrange(x)], dim=2)

        return MaskedCall(block_mask=block_mask, layout=self.layout, arrange=arrange)

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """The base pattern's products (:meth:`WindowColumns.attend`) and, per query tile,
        one more over its own keys, merged by log-sum-exp."""
        return self.base.attend(q, k, v, scale, tile_keys=self.keys)


def _members(keys: torch.Tensor, num_keys: int) -> torch.Tensor:
    """``(..., num_keys)`` bool: the positions in ``keys (..., C)`` (``>= num_keys``: none)."""
    hits = torch.zeros(*keys.shape[:-1], num_keys + 1, dtype=torch.bool, device=keys.device)
    return hits.scatter_(-1, keys.clamp(max=num_keys), True)[..., :num_keys]
