"""Geometry of one prefill: block grid, window candidates, sink, and which rows are sampled.

Every stage (the three samplers, selection, the mask) reads the same :class:`SampleLayout`,
so "covered by the window" means the same thing everywhere.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .config import SampleConfig


@dataclass(frozen=True)
class SampleLayout:
    """Block geometry of a causal prefill of ``seq_len`` tokens under a config.

    A window of ``w`` blocks means: query block ``qb`` keeps key blocks ``qb - w .. qb``
    whole (causally masked on the diagonal), i.e. every key at or after token
    ``(qb - w) * block_size``. Blocks are counted from key 0; a prefill of a later chunk
    (``query_start > 0``: earlier keys are context without queries) shares the grid.

    Attributes:
        seq_len: Number of key tokens ``S``; the queries are the last ``S - query_start``.
        block_size: Tile side in tokens.
        num_blocks: ``ceil(S / block_size)``; the last block may be partial.
        min_window_blocks: Smallest window in blocks (``ceil(min_window / block_size)``).
        fixed_window_blocks: The window of every head when the config fixes one
            (``window_ratio`` set), else None (adaptive, chosen per head).
        sink_blocks: Key blocks ``0 .. sink_blocks - 1`` are kept by every query block.
        num_segments: Number of query segments (at most ``S``).
        rows_per_segment: Sampled rows per segment (the segment's last rows).
        column_unit: ``"token"`` or ``"block"`` (see :class:`SampleConfig`).
        query_start: Position of the first query (0 for a whole prompt; the chunk's
            offset for a chunked prefill).
        requested_rows: The rows per segment ``sample_ratio`` asked for, before rounding up
            to whole rows (a note says when it is below one).
    """

    seq_len: int
    block_size: int
    num_blocks: int
    min_window_blocks: int
    fixed_window_blocks: int | None
    sink_blocks: int
    num_segments: int
    rows_per_segment: int
    column_unit: str = "token"
    query_start: int = 0
    requested_rows: float = 1.0

    @classmethod
    def create(
        cls, seq_len: int, config: SampleConfig, *, query_len: int | None = None
    ) -> SampleLayout:
        """Lay out ``seq_len >= 1`` keys under ``config``, queried by the last ``query_len``
        positions (all of them when None)."""
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        query_len = seq_len if query_len is None else query_len
        if not 1 <= query_len <= seq_len:
            raise ValueError(f"query_len must lie in [1, seq_len={seq_len}], got {query_len}")
        bs = config.block_size
        num_blocks = math.ceil(seq_len / bs)
        floor = math.ceil(config.min_window / bs)
        fixed = None
        selection = config.selection
        if selection.window_ratio is not None:
            fixed = max(floor, math.ceil(math.ceil(selection.window_ratio * seq_len) / bs))
        num_segments = min(config.num_segments, query_len)
        shortest_segment = query_len // num_segments
        rows = math.ceil(config.sample_ratio * query_len / num_segments)
        if config.max_sampled_rows is not None:
            rows = min(rows, max(1, config.max_sampled_rows // num_segments))
        return cls(
            seq_len=seq_len,
            block_size=bs,
            num_blocks=num_blocks,
            min_window_blocks=min(floor, num_blocks),
            fixed_window_blocks=None if fixed is None else min(fixed, num_blocks),
            sink_blocks=selection.sink_blocks,
            num_segments=num_segments,
            rows_per_segment=max(1, min(rows, shortest_segment)),
            column_unit=selection.column_unit,
            query_start=seq_len - query_len,
            requested_rows=config.sample_ratio * query_len / num_segments,
        )

    @property
    def num_sampled_rows(self) -> int:
        return self.num_segments * self.rows_per_segment

    @property
    def query_len(self) -> int:
        """Number of queries: positions ``query_start .. seq_len - 1``."""
        return self.seq_len - self.query_start

    @property
    def first_query_block(self) -> int:
        """The block of the first query; the attention call starts its rows there."""
        return self.query_start // self.block_size

    @property
    def causal_pairs(self) -> int:
        """Causal (query, key) pairs of the queries: query ``q`` has ``q + 1`` keys."""
        S, P = self.seq_len, self.query_start
        return (S * (S + 1) - P * (P + 1)) // 2

    @property
    def sink_tokens(self) -> int:
        """Keys ``0 .. sink_tokens - 1`` are the sink (kept whole by every query)."""
        return min(self.sink_blocks * self.block_size, self.seq_len)

    def window_candidates(self) -> list[int]:
        """Window sizes in blocks that selection weighs: the fixed one, or the floor doubling.

        Adaptive: ``floor, 2 floor, 4 floor, ...`` (from 1 block when the floor is 0) up to
        ``num_blocks``, which covers every causal key (a dense head).
        """
        if self.fixed_window_blocks is not None:
            return [self.fixed_window_blocks]
        candidates = [self.min_window_blocks]
        w = max(1, self.min_window_blocks)
        while w < self.num_blocks:
            if w not in candidates:
                candidates.append(w)
            w *= 2
        if self.num_blocks not in candidates:
            candidates.append(self.num_blocks)
        return candidates

    def segment_ends(self) -> list[int]:
        """Exclusive end row of each segment (segments split the queries); the last one is
        ``seq_len``."""
        g, L = self.num_segments, self.query_len
        return [self.query_start + ((i + 1) * L) // g for i in range(g)]

    def sampled_rows(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Positions of the sampled query rows, ``(num_segments, rows_per_segment)`` int64.

        Segment ``g`` samples its last ``rows_per_segment`` rows, in ascending order, so the
        final rows of the prompt (which usually ask the question) are always sampled.

        One tensor per layout and device, shared by every caller (each stage of every layer
        asks; building it copies from the host, which on a GPU waits for the work queued
        before): read it, do not write to it.
        """
        return _sampled_rows(self, torch.device(device))

    def notes(self) -> dict[str, str]:
        """Why this geometry cannot give a sparse mask: ``{config field: explanation}``.

        A config can be valid and still leave nothing to skip at a given length: a single
        tile, or a fixed window that covers the whole sequence. Plans and stats carry these
        notes. Empty when the geometry allows sparsity.
        """
        notes = {}
        if self.requested_rows < 1:
            notes["sample_ratio"] = (
                f"sample_ratio asks for {self.requested_rows:.2g} rows per segment at query_len "
                f"{self.query_len}: each of the {self.num_segments} segments samples 1 row, and "
                "the selection sees only those"
            )
        query_blocks = self.num_blocks - self.first_query_block
        if self.num_segments > query_blocks:
            notes["num_segments"] = (
                f"{self.num_segments} segments over {query_blocks} query blocks: segments "
                f"shorter than a block sample rows that share their tiles"
            )
        if self.num_blocks == 1:
            notes["block_size"] = (
                f"block_size {self.block_size} >= seq_len {self.seq_len}: one tile, "
                "nothing to skip (density 1.0)"
            )
        elif self.fixed_window_blocks is not None and self.fixed_window_blocks >= (
            self.num_blocks - 1
        ):
            notes["window_ratio"] = (
                f"a fixed window of {self.fixed_window_blocks} blocks covers all "
                f"{self.num_blocks} blocks of seq_len {self.seq_len}: dense (density 1.0)"
            )
        return notes


@functools.lru_cache(maxsize=64)
def _sampled_rows(layout: SampleLayout, device: torch.device) -> torch.Tensor:
    ends = torch.tensor(layout.segment_ends(), dtype=torch.int64, device=device)
    offsets = torch.arange(layout.rows_per_segment, dtype=torch.int64, device=device)
    return ends[:, None] - layout.rows_per_segment + offsets[None, :]


def bucket_length(n: int, block_size: int) -> int:
    """The length a static-shape kernel pads ``n`` to: the smallest multiple of
    ``block_size`` of the form ``2^k`` or ``3 * 2^k`` (at most 1.5x the next multiple of
    the block, and 11 sizes from 1K to 32K).

    Distinct prompt lengths then share few compiled kernels; the padding costs memory for
    the padded copies of q, k and v, not attention work (see
    :func:`~flexsample.patterns.window_columns.build_block_mask`).
    """
    if n < 1 or block_size < 1:
        raise ValueError(f"n and block_size must be positive, got {n}, {block_size}")
    blocks = -(-n // block_size)
    size = 1
    while True:
        for candidate in (size, 3 * size // 2):
            if candidate >= blocks:
                return candidate * block_size
        size *= 2


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
