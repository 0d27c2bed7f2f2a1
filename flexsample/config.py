"""Configuration of SampleAttention: one frozen, validated dataclass."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

Sampler = Literal["auto", "triton", "torch", "reference"]
SAMPLERS: tuple[str, ...] = ("auto", "triton", "torch", "reference")
ColumnUnit = Literal["token", "block"]
COLUMN_UNITS: tuple[str, ...] = ("token", "block")
BackendChoice = Literal["auto", "triton", "flash"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "flash")


@dataclass(frozen=True)
class SampleConfig:
    """How SampleAttention chooses what each head computes: a local window plus key columns.

    Every field is checked when the object is made; a bad value raises ``ValueError`` (or
    ``TypeError`` for a value of the wrong type) that names the field.

    Attributes:
        alpha: Cumulative residual attention (CRA) threshold in ``(0, 1]``. For every query
            segment, the window, sink and selected columns keep at least this fraction of
            the sampled rows' attention mass, and with ``cover_rows`` (the default) every
            sampled row keeps at least this fraction of its own. Higher is more accurate and
            denser. Paper default 0.95.
        sample_ratio: Fraction of query rows sampled in stage 1, in ``(0, 1]``. Cost of
            sampling grows linearly with it. Paper: about 5%.
        max_sampled_rows: At most this many sampled rows in all (at least one per segment),
            so that sampling and the row cover stop growing with ``S^2`` at long lengths;
            ``None``: ``sample_ratio`` alone decides. The default 4096 changes nothing below
            about 80K tokens (5% of 80K); on an H100 at 128K it took the default call from
            70.5 to 53.5 ms with the same density, output error and kept mass on planted
            inputs (``bench/results/gpu_NVIDIA_H100_80GB_HBM3.md``); 2048 was faster still
            (44.9 ms) but raised the output error from 1.75% to 1.89%.
        num_segments: The query rows are cut into this many equal segments; the last
            ``sample_ratio * S / num_segments`` rows of each are sampled, and each segment's
            alpha-cover is added to the mask. More segments guard more query positions.
        cover_rows: ``True`` (the default): every sampled row keeps at least ``alpha`` of its
            own mass; rows that the segments' cover leaves short get their heaviest missing
            keys added (one more pass over the keys for the sampled rows). ``False``: the
            guarantee holds only for each segment's mean sampled row (flexsample 0.1 and
            0.2), which is cheaper.
        group_union: ``False`` (the default): each query head reads only its own columns.
            ``True``: query heads that share a kv head (GQA) all read the union of their
            selected columns (flexsample 0.3's default): more pairs and more mass kept; on
            SmolLM2's layers at 8K 0.378 of the pairs at 2.54% mean output error, against
            the defaults' 0.300 at 2.96% (``bench/score_configs.py``). Per-head columns
            leave more sampled rows for the row cover to repair: on an H200 at 64K on
            planted stripes it took 5.3 and 7.4 ms in two runs against the union's 3.6, in
            a call of 17 to 20 ms.
        window_ratio: ``None`` (the default): the local window is chosen per head, the one
            that, with the columns it then needs, computes the fewest (query, key) pairs
            (candidates from ``min_window`` doubling up to the whole sequence). A number in
            ``[0, 1]``: a fixed window of that share of the sequence for every head, as in
            the paper (about 8%) and flexsample 0.1.
        min_window: Smallest local window in tokens (``>= 0``), rounded up to whole blocks:
            the floor of the adaptive window, or the minimum of a fixed one. The default
            512: heads whose locality reaches past a narrower window would otherwise have
            the sampled rows' nearby keys chosen as columns, which the rows between the
            samples do not need. On SmolLM2's layers at 8K, 128 (flexsample 0.3) computed
            0.284 of the pairs at 3.65% mean output error with per-head columns, and lost a
            2K passkey prompt that dense attention finds (``tests/test_smollm2.py``, every
            layer sparse); 512: 0.300 at 2.96%, the same answers as dense.
        column_unit: What a selected column is: ``"token"`` (the default: single keys,
            gathered into a compact block-aligned prefix that the attention call also reads)
            or ``"block"`` (whole ``block_size`` key blocks, flexsample 0.1's stripes).
        sink_blocks: Number of leading key blocks every query keeps whole (attention sinks).
            Default 0: sink tokens are columns like any other, kept when sampled heavy.
        block_size: Side of the square tiles of the block mask, in tokens; a power of two
            ``>= 16``. 128 is FlexAttention's native tile.
        min_seq_len: ``None`` (the default): the device's cost model
            (:mod:`flexsample.costs`) decides before sampling whether a sparse call could
            beat dense attention at this length, and runs dense where it cannot. An int:
            sequences shorter than this run dense, longer ones are planned (an explicit
            override of the cost model's length crossover).
        max_density: ``None`` (the default): after selection, the plan runs dense where the
            cost model says its sparse call would not beat dense attention (diffuse
            attention selects nearly every pair). A number in ``(0, 1]``: plans computing a
            larger share of the causal pairs run dense; ``1.0`` never falls back.
        sampler: Stage-1 implementation: ``"auto"`` (Triton on CUDA when available, torch
            otherwise), ``"triton"``, ``"torch"`` or ``"reference"`` (dense oracle, small
            inputs only).
        backend: FlexAttention backend of the sparse call: ``"auto"`` (the default):
            ``"flash"`` where it can run (CUDA compute capability 9.0+, fp16/bf16, and
            ``flash_attn.cute`` installed: ``pip install "flexsample[flash]"``), else
            ``"triton"``. ``"triton"``: FlexAttention's own kernel (Triton on CUDA, C++ on
            CPU), compiled once for every length. ``"flash"``: its FlashAttention-4 backend,
            compiled per static shape, so lengths are padded to a few buckets
            (:func:`~flexsample.masks.bucket_length`); an error where it cannot run.
            ``stats.backend`` says which ran.
    """

    alpha: float = 0.95
    sample_ratio: float = 0.05
    max_sampled_rows: int | None = 4096
    num_segments: int = 8
    cover_rows: bool = True
    group_union: bool = False
    window_ratio: float | None = None
    min_window: int = 512
    column_unit: ColumnUnit = "token"
    sink_blocks: int = 0
    block_size: int = 128
    min_seq_len: int | None = None
    max_density: float | None = None
    sampler: Sampler = "auto"
    backend: BackendChoice = "auto"

    def __post_init__(self) -> None:
        _check_real("alpha", self.alpha, low=0.0, high=1.0, low_open=True)
        _check_real("sample_ratio", self.sample_ratio, low=0.0, high=1.0, low_open=True)
        if self.window_ratio is not None:
            _check_real("window_ratio", self.window_ratio, low=0.0, high=1.0)
        _check_int("num_segments", self.num_segments, low=1)
        if self.max_sampled_rows is not None:
            _check_int("max_sampled_rows", self.max_sampled_rows, low=1)
        if not isinstance(self.group_union, bool):
            raise TypeError(
                f"SampleConfig.group_union must be a bool, got {type(self.group_union).__name__}"
            )
        if not isinstance(self.cover_rows, bool):
            raise TypeError(
                f"SampleConfig.cover_rows must be a bool, got {type(self.cover_rows).__name__}"
            )
        _check_int("min_window", self.min_window, low=0)
        _check_int("sink_blocks", self.sink_blocks, low=0)
        if self.min_seq_len is not None:
            _check_int("min_seq_len", self.min_seq_len, low=0)
        if self.max_density is not None:
            _check_real("max_density", self.max_density, low=0.0, high=1.0, low_open=True)
        _check_int("block_size", self.block_size, low=16)
        if self.block_size & (self.block_size - 1):
            raise ValueError(
                f"SampleConfig.block_size must be a power of two, got {self.block_size}"
            )
        if self.column_unit not in COLUMN_UNITS:
            raise ValueError(
                f"SampleConfig.column_unit must be one of {COLUMN_UNITS}, got {self.column_unit!r}"
            )
        if self.sampler not in SAMPLERS:
            raise ValueError(
                f"SampleConfig.sampler must be one of {SAMPLERS}, got {self.sampler!r}"
            )
        if self.backend not in BACKENDS:
            raise ValueError(
                f"SampleConfig.backend must be one of {BACKENDS}, got {self.backend!r}"
            )

    def replace(self, **changes: object) -> SampleConfig:
        """Return a copy with some fields changed (validated like a new config)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def always_sparse(cls, **changes: object) -> SampleConfig:
        """A config that plans every call sparse (``min_seq_len=0``, ``max_density=1.0``),
        whatever the length and density: for tests and for measuring the sparse path."""
        fields: dict[str, object] = {"min_seq_len": 0, "max_density": 1.0}
        fields.update(changes)
        return cls(**fields)  # type: ignore[arg-type]

    @classmethod
    def dense_equivalent(cls, **changes: object) -> SampleConfig:
        """A config whose mask keeps every causal pair: ``alpha=1`` and a fixed full window.

        Useful to check plumbing: the output must equal dense causal attention.
        """
        fields = {"alpha": 1.0, "window_ratio": 1.0, "min_seq_len": 0, "max_density": 1.0}
        fields.update(changes)
        return cls(**fields)  # type: ignore[arg-type]


def _check_real(
    name: str, value: object, *, low: float, high: float, low_open: bool = False
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"SampleConfig.{name} must be a real number, got {type(value).__name__}")
    if math.isnan(value):
        raise ValueError(f"SampleConfig.{name} is NaN")
    below = value <= low if low_open else value < low
    if below or value > high:
        bracket = "(" if low_open else "["
        raise ValueError(f"SampleConfig.{name} must lie in {bracket}{low}, {high}], got {value}")


def _check_int(name: str, value: object, *, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"SampleConfig.{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"SampleConfig.{name} must be >= {low}, got {value}")
