"""Geometry of one prefill: block grid, local window, sink, and which query rows are sampled.

Every stage (the three samplers, selection, the mask) reads the same :class:`SampleLayout`,
so "covered by the window" means the same thing everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import SampleConfig


@dataclass(frozen=True)
class SampleLayout:
    """Block geometry of a causal prefill of ``seq_len`` tokens under a config.

    Attributes:
        seq_len: Number of query (= key) tokens ``S``.
        block_size: Tile side in tokens.
        num_blocks: ``ceil(S / block_size)``; the last block may be partial.
        window_blocks: Query block ``qb`` keeps key blocks ``qb - window_blocks .. qb``. This
            covers every key within ``window_blocks * block_size`` tokens of the query, at least
            the configured window.
        sink_blocks: Key blocks ``0 .. sink_blocks - 1`` are kept by every query block.
        num_segments: Number of query segments (at most ``S``).
        rows_per_segment: Sampled rows per segment (the segment's last rows).
    """

    seq_len: int
    block_size: int
    num_blocks: int
    window_blocks: int
    sink_blocks: int
    num_segments: int
    rows_per_segment: int

    @classmethod
    def create(cls, seq_len: int, config: SampleConfig) -> SampleLayout:
        """Lay out a sequence of ``seq_len >= 1`` tokens under ``config``."""
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        bs = config.block_size
        window_tokens = max(config.min_window, math.ceil(config.window_ratio * seq_len))
        num_segments = min(config.num_segments, seq_len)
        shortest_segment = seq_len // num_segments
        rows = math.ceil(config.sample_ratio * seq_len / num_segments)
        return cls(
            seq_len=seq_len,
            block_size=bs,
            num_blocks=math.ceil(seq_len / bs),
            window_blocks=math.ceil(window_tokens / bs),
            sink_blocks=config.sink_blocks,
            num_segments=num_segments,
            rows_per_segment=max(1, min(rows, shortest_segment)),
        )

    @property
    def num_sampled_rows(self) -> int:
        return self.num_segments * self.rows_per_segment

    def segment_ends(self) -> list[int]:
        """Exclusive end row of each segment; the last one is ``seq_len``."""
        g = self.num_segments
        return [((i + 1) * self.seq_len) // g for i in range(g)]

    def sampled_rows(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Positions of the sampled query rows, ``(num_segments, rows_per_segment)`` int64.

        Segment ``g`` samples its last ``rows_per_segment`` rows, in ascending order, so the
        final rows of the prompt (which usually ask the question) are always sampled.
        """
        ends = torch.tensor(self.segment_ends(), dtype=torch.int64, device=device)
        offsets = torch.arange(self.rows_per_segment, dtype=torch.int64, device=device)
        return ends[:, None] - self.rows_per_segment + offsets[None, :]

    def uncovered_blocks(self, rows: torch.Tensor) -> torch.Tensor:
        """Which key blocks are *not* already kept for each query row by window or sink.

        Args:
            rows: query positions, any shape ``(*R,)``.

        Returns:
            ``(*R, num_blocks)`` bool: True where the block is strictly before the row's window,
            after the sink and therefore only kept if stage 2 selects it.
        """
        kb = torch.arange(self.num_blocks, device=rows.device)
        qb = torch.div(rows, self.block_size, rounding_mode="floor")
        return (kb >= self.sink_blocks) & (kb < (qb - self.window_blocks)[..., None])

    def local_blocks(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """``(num_blocks, num_blocks)`` bool: causal blocks kept by the window or the sink."""
        qb = torch.arange(self.num_blocks, device=device)[:, None]
        kb = torch.arange(self.num_blocks, device=device)[None, :]
        return (kb <= qb) & ((qb - kb <= self.window_blocks) | (kb < self.sink_blocks))

    def causal_blocks(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """``(num_blocks, num_blocks)`` bool lower triangle (diagonal included)."""
        n = self.num_blocks
        return torch.ones(n, n, dtype=torch.bool, device=device).tril()

    def notes(self) -> dict[str, str]:
        """Why this geometry cannot give a sparse mask: ``{config field: explanation}``.

        A config can be valid and still leave nothing to skip at a given length: a single
        tile, or query segments shorter than a tile (each segment's cover adds its own
        stripes, so the union approaches every block). Plans and stats carry these notes.
        Empty when the geometry allows sparsity.
        """
        notes = {}
        if self.num_blocks == 1:
            notes["block_size"] = (
                f"block_size {self.block_size} >= seq_len {self.seq_len}: one tile, "
                "nothing to skip (density 1.0)"
            )
        elif self.seq_len // self.num_segments < self.block_size:
            notes["num_segments"] = (
                f"num_segments {self.num_segments} at seq_len {self.seq_len}: segments are "
                f"shorter than one {self.block_size}-token tile, so their covers add up to a "
                "nearly dense mask; use fewer segments"
            )
        return notes
