"""Configuration of SampleAttention: frozen, validated dataclasses."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

Sampler = Literal["auto", "triton", "torch", "reference"]
SAMPLERS: tuple[str, ...] = ("auto", "triton", "torch", "reference")
ColumnUnit = Literal["token", "block"]
COLUMN_UNITS: tuple[str, ...] = ("token", "block")
BackendChoice = Literal["auto", "triton", "flash", "gather"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "flash", "gather")


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


@dataclass(frozen=True)
class Selection:
    """How the window + columns pattern is chosen where it differs from the default: the
    selections of earlier releases (:mod:`flexsample.presets` names them), kept to measure
    against. Every field is checked like :class:`SampleConfig`'s.

    Attributes:
        row_guarantee: ``True`` (the default): every sampled row keeps at least ``alpha`` of its
            own mass; rows the segments' columns leave short get their heaviest missing keys
            added. ``False``: only each segment's mean sampled row keeps ``alpha`` (0.1, 0.2).
        group_union: ``True``: query heads that share a kv head read the union of their
            columns (0.3); ``False`` (the default): each reads its own.
        window_ratio: ``None`` (the default): each head's window is the one that, with the
            columns it then needs, computes the fewest pairs (from ``min_window`` doubling).
            A number in ``[0, 1]``: a fixed window of that share of the sequence (0.1: 0.08).
        column_unit: ``"token"`` (the default): a column is one key; ``"block"``: a whole
            ``block_size`` key block (0.1's stripes).
        sink_blocks: leading key blocks every query keeps whole (0.1: 1); by default 0, and
            sink tokens are columns like any other.
        tile_keys: ``0`` (the default): every query of a head reads its window and columns.
            ``n``: query-aware selection: each query tile (``block_size`` queries) also
            reads up to ``n`` keys of its own, those ``tile_rows`` sampled rows of it need
            to reach ``alpha`` (:mod:`flexsample.tiles`). Not on ``"flash"`` yet
            (``"auto"`` runs ``"triton"`` instead).
        tile_rows: rows of each query tile the tile keys are chosen from.
        column_alpha: with ``tile_keys``, the share of the sampled rows' mass the window and
            columns (and the row cover) keep, below ``alpha``: the tiles' own keys then take
            each tile's sampled rows from there to ``alpha``, so that keys only some query
            tiles need are read by those tiles alone, not by every later query. ``None``
            (the default): ``alpha``.
    """

    row_guarantee: bool = True
    group_union: bool = False
    window_ratio: float | None = None
    column_unit: ColumnUnit = "token"
    sink_blocks: int = 0
    tile_keys: int = 0
    tile_rows: int = 4
    column_alpha: float | None = None

    def __post_init__(self) -> None:
        for name in ("row_guarantee", "group_union"):
            if not isinstance(getattr(self, name), bool):
                kind = type(getattr(self, name)).__name__
                raise TypeError(f"SampleConfig.selection.{name} must be a bool, got {kind}")
        if self.window_ratio is not None:
            _check_real("selection.window_ratio", self.window_ratio, low=0.0, high=1.0)
        if self.column_unit not in COLUMN_UNITS:
            raise ValueError(
                f"SampleConfig.selection.column_unit must be one of {COLUMN_UNITS}, "
                f"got {self.column_unit!r}"
            )
        _check_int("selection.sink_blocks", self.sink_blocks, low=0)
        _check_int("selection.tile_keys", self.tile_keys, low=0)
        _check_int("selection.tile_rows", self.tile_rows, low=1)
        if self.column_alpha is not None:
            _check_real(
                "selection.column_alpha", self.column_alpha, low=0.0, high=1.0, low_open=True
            )
            if not self.tile_keys:
                raise ValueError(
                    "SampleConfig.selection.column_alpha needs tile_keys > 0 (without the "
                    "tiles' own keys the mask would keep only column_alpha: set alpha)"
                )


@dataclass(frozen=True)
class SampleConfig:
    """How SampleAttention plans a prefill. Every field is checked when the object is made; a
    bad value raises ``ValueError`` (``TypeError`` for a wrong type) naming the field.
    ``docs/configuration.md`` says what each does to speed and accuracy.

    Attributes:
        alpha: Share of the sampled rows' attention mass the mask keeps, in ``(0, 1]``
            (cumulative residual attention): higher is more accurate and denser.
        min_window: Smallest local window in tokens (``>= 0``, rounded up to whole blocks).
        sample_ratio: Share of query rows sampled, in ``(0, 1]``.
        max_sampled_rows: At most this many sampled rows in all (``None``: no cap), so that
            planning stops growing with ``S^2`` at long lengths.
        num_segments: The queries are cut into this many segments; each samples its last rows.
        block_size: Tile side of the block mask in tokens, a power of two ``>= 16``.
        min_seq_len: ``None``: the device's cost model decides when sparse can pay (see
            :mod:`flexsample.costs`); an int: shorter sequences run dense, longer are planned.
        max_density: ``None``: after selection, the cost model decides whether the sparse call
            pays; a number in ``(0, 1]``: plans computing more of the causal pairs run dense
            (``1.0`` never falls back).
        sampler: ``"auto"`` (Triton on CUDA, torch elsewhere), ``"triton"``, ``"torch"`` or
            ``"reference"`` (float64, small inputs).
        backend: kernel of the sparse call: ``"auto"`` (FlashAttention-4 where it runs, the
            gathered products on the CPU, else FlexAttention's Triton kernel; see
            :mod:`flexsample.backends`), ``"triton"``, ``"flash"`` or ``"gather"`` (CPU);
            ``stats.backend`` says which ran.
        selection: How the pattern is chosen where it differs from the default
            (:class:`Selection`; earlier releases' choices are :mod:`flexsample.presets`).
    """

    alpha: float = 0.95
    min_window: int = 512
    sample_ratio: float = 0.05
    max_sampled_rows: int | None = 4096
    num_segments: int = 8
    block_size: int = 128
    min_seq_len: int | None = None
    max_density: float | None = None
    sampler: Sampler = "auto"
    backend: BackendChoice = "auto"
    selection: Selection = Selection()

    def __post_init__(self) -> None:
        _check_real("alpha", self.alpha, low=0.0, high=1.0, low_open=True)
        _check_real("sample_ratio", self.sample_ratio, low=0.0, high=1.0, low_open=True)
        _check_int("num_segments", self.num_segments, low=1)
        if self.max_sampled_rows is not None:
            _check_int("max_sampled_rows", self.max_sampled_rows, low=1)
        _check_int("min_window", self.min_window, low=0)
        if self.min_seq_len is not None:
            _check_int("min_seq_len", self.min_seq_len, low=0)
        if self.max_density is not None:
            _check_real("max_density", self.max_density, low=0.0, high=1.0, low_open=True)
        _check_int("block_size", self.block_size, low=16)
        if self.block_size & (self.block_size - 1):
            raise ValueError(
                f"SampleConfig.block_size must be a power of two, got {self.block_size}"
            )
        if self.sampler not in SAMPLERS:
            raise ValueError(
                f"SampleConfig.sampler must be one of {SAMPLERS}, got {self.sampler!r}"
            )
        if self.backend not in BACKENDS:
            raise ValueError(
                f"SampleConfig.backend must be one of {BACKENDS}, got {self.backend!r}"
            )
        if not isinstance(self.selection, Selection):
            raise TypeError(
                f"SampleConfig.selection must be a Selection, got {type(self.selection).__name__}"
            )
        if self.column_alpha > self.alpha:
            raise ValueError(
                f"SampleConfig.selection.column_alpha ({self.selection.column_alpha}) must not "
                f"exceed alpha ({self.alpha})"
            )

    @property
    def column_alpha(self) -> float:
        """The share of the sampled rows' mass the window, columns and row cover keep:
        ``selection.column_alpha``, or ``alpha`` where it is None."""
        chosen = self.selection.column_alpha
        return self.alpha if chosen is None else chosen

    def replace(self, **changes: object) -> SampleConfig:
        """A copy with some fields changed (validated like a new config). Fields of
        :class:`Selection` may be named here too: ``config.replace(row_guarantee=False)``."""
        own = {f.name for f in dataclasses.fields(self)}
        picked = {k: changes.pop(k) for k in list(changes) if k not in own}
        if picked:
            unknown = sorted(set(picked) - {f.name for f in dataclasses.fields(Selection)})
            if unknown:
                raise TypeError(f"SampleConfig has no field {unknown[0]!r}")
            selection = changes.get("selection", self.selection)
            changes["selection"] = dataclasses.replace(selection, **picked)
        return dataclasses.replace(self, **changes)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """SampleConfig's fields and :class:`Selection`'s, by name: what :meth:`replace`
        takes (and :func:`flexsample.presets.config_from_fields`, with ``preset``)."""
        own = [f.name for f in dataclasses.fields(cls) if f.name != "selection"]
        return (*own, *(f.name for f in dataclasses.fields(Selection)))

    @classmethod
    def always_sparse(cls, **changes: object) -> SampleConfig:
        """A config that plans every call sparse (``min_seq_len=0``, ``max_density=1.0``),
        whatever the length and density: for tests and for measuring the sparse path."""
        return cls(min_seq_len=0, max_density=1.0).replace(**changes)

    @classmethod
    def dense_equivalent(cls, **changes: object) -> SampleConfig:
        """A config whose mask keeps every causal pair: ``alpha=1`` and a fixed full window.

        Useful to check plumbing: the output must equal dense causal attention.
        """
        return cls(alpha=1.0, min_seq_len=0, max_density=1.0).replace(window_ratio=1.0, **changes)
