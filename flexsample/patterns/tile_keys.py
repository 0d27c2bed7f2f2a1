"""The query-aware pattern: a window + columns pattern, and per query tile the keys its rows
need beyond it.

A column every later query reads is the wrong shape for a key only some queries need (a
fact one passage asks about): one column set per head either misses it or makes every
query read it. Here query tile ``t`` (the queries of block ``first_query_block + t``, the
kernel's tile) of head ``h`` also reads ``keys[b, h, t]``: positions before the tile's
window, not among the head's columns, chosen for that tile
(:func:`~flexsample.tiles.select_tile_keys`). The rule, :meth:`TileKeys.keep`: the base
pattern's keys, and the tile's.

Built after the base pattern's row cover (the cover's row kernels read window + columns
tables), so the cover's interface (:meth:`TileKeys.row_tables`, :meth:`TileKeys.with_keys`)
is not this pattern's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layout import SampleLayout, query_blocks
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
        none), dropping those the rule gives a tile anyway or may not give it."""
        layout = base.layout
        S, bs = layout.seq_len, layout.block_size
        keys = keys.clamp(max=S)
        qb, _, _ = query_blocks(layout, keys.device)  # (T,) the tiles' blocks
        start = window_start(qb, base.window_blocks[..., None]) * bs  # (B, Hq, T)
        columns = torch.nn.functional.pad(base.columns, (0, 1))  # position S: not a column
        column = columns.gather(-1, keys.flatten(2)).view(keys.shape)
        keep = (keys < start[..., None]) & (keys >= layout.sink_tokens) & ~column
        keys = torch.where(keep, keys, S).sort(dim=-1).values
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
        raise NotImplementedError(
            "tile keys run as gathered products (backend 'gather'); the FlexAttention call "
            "of this pattern is not built yet"
        )

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
