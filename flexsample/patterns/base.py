"""What every mask shape provides: the interface planning, the cost model, the cover, the
oracle and the statistics use, and the attention call a pattern compiles to."""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn.attention.flex_attention import BlockMask

from ..layout import SampleLayout
from ..masks import pad_sequence


@dataclass(frozen=True, eq=False)
class MaskedCall:
    """What one FlexAttention call of a pattern reads: its ``BlockMask`` and how q, k and v
    are laid out for it.

    The mask's query rows start at the first query's block (``layout.first_query_block *
    block_size``): the queries are padded in front to it, and at the end to ``padded``'s
    rows where the kernel compiles per static shape. Keys and values are rearranged by the
    pattern (``arrange``: e.g. gathered columns in front of the keys), then padded.

    Attributes:
        block_mask: the ``BlockMask`` over ``(query rows, keys)``.
        layout: the geometry.
        arrange: ``(B, Hkv, S, D) -> (B, Hkv, keys, D)``, the keys (or values) in the order
            the mask indexes them, padded to ``padded``'s keys when set.
        padded: ``(query rows, keys)`` of a static-shape kernel, or None.
    """

    block_mask: BlockMask
    layout: SampleLayout
    arrange: Callable[[torch.Tensor], torch.Tensor]
    padded: tuple[int, int] | None = None

    def queries(self, q: torch.Tensor) -> torch.Tensor:
        """``q (B, Hq, L, D)`` padded as the mask's rows are (see the class)."""
        lead = self._lead()
        if lead:
            q = torch.nn.functional.pad(q, (0, 0, lead, 0))
        if self.padded is not None:
            q = pad_sequence(q, self.padded[0])
        return q

    def outputs(self, out: torch.Tensor, query_len: int) -> torch.Tensor:
        """The rows of ``out`` that belong to the ``query_len`` queries."""
        lead = self._lead()
        if lead or self.padded is not None:
            out = out[:, :, lead : lead + query_len]
        return out

    def _lead(self) -> int:
        layout = self.layout
        return layout.query_start - layout.first_query_block * layout.block_size


class Pattern(abc.ABC):
    """A mask shape: which keys each query of each head reads, chosen by planning.

    A pattern owns its rule once: the per-row keep test (:meth:`keep`, the reference every
    other form is held to), the pairs it computes (:meth:`density`), how the row cover adds
    keys (:meth:`with_keys`), the FlexAttention call it compiles to (:meth:`compile`) and
    its attention as dense products where no ``BlockMask`` is wanted (:meth:`attend`).
    Planning, the cost model, the cover, the oracle and the statistics use only this
    interface.
    """

    #: The pattern's name in statistics and logs.
    name: str
    #: The geometry the pattern was chosen for.
    layout: SampleLayout

    @abc.abstractmethod
    def keep(self, rows: torch.Tensor) -> torch.Tensor:
        """``(B, H, R, S)`` bool: the keys query positions ``rows (R,)`` read (causal)."""

    @abc.abstractmethod
    def keep_heads(
        self, heads: torch.Tensor, rows: torch.Tensor, num_keys: int | None = None
    ) -> torch.Tensor:
        """``(R, K)`` bool: the keys each of ``R`` rows reads, row ``i`` of flattened head
        ``heads[i]`` (``b * H + h``) at position ``rows[i]``, over the first ``K = num_keys``
        keys (all ``S`` if None; the cover's measurement needs only the rows' causal prefix)."""

    @abc.abstractmethod
    def density(self) -> torch.Tensor:
        """``(B, H)`` float64: computed (query, key) pairs over the queries' causal pairs."""

    @abc.abstractmethod
    def with_keys(self, added: torch.Tensor) -> Pattern:
        """This pattern reading also ``added (B, H, S)`` bool keys (the row cover's repair)."""

    @abc.abstractmethod
    def row_tables(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pattern as the cover's Triton row kernels read it, for query positions
        ``rows (R,)``: ``(start (B, H, R) int64, columns (B, H, S) bool)``. Row ``i`` of
        head ``h`` reads every key from ``start[..., i]`` up to itself, the sink, and the
        head's columns (the kernels take the sink from the layout)."""

    @abc.abstractmethod
    def compile(self, group: int, *, static: bool = False) -> MaskedCall:
        """The FlexAttention call of this pattern for ``group`` query heads per kv head;
        ``static``: for a kernel compiled per static shape (padded to bucket lengths, the
        ``mask_mod``'s numbers as Python constants)."""

    @abc.abstractmethod
    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """The pattern's attention without a ``BlockMask``: dense products over the keys
        each head reads (``SampleConfig.backend="gather"``, the CPU's faster path).
        ``q (B, Hq, L, D)`` are the last ``L`` positions of ``k, v (B, Hkv, S, D)``; returns
        ``(B, Hq, L, D)`` in q's dtype."""

    def kept_sampled_mass(self, scores: torch.Tensor) -> torch.Tensor:
        """``(B, H, G)``: the share of each segment's sampled mass ``scores (B, H, G, S)``
        that the pattern keeps at the segment's last sampled row."""
        last_rows = self.layout.sampled_rows(scores.device)[:, -1]
        keep = self.keep(last_rows)  # (B, H, G, S)
        return (scores * keep).sum(dim=-1) / scores.sum(dim=-1).clamp_min(1e-30)
