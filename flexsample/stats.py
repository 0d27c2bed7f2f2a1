"""What one call of :func:`flexsample.flex_sample_attention` did: path, density, mass, time."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .layout import SampleLayout
from .patterns import Pattern, TileKeys, WindowColumns
from .plan import CallPath, PrefillPlan
from .timing import StageTimer

__all__ = ["PLAN_STAGES", "STAGES", "SampleStats", "StageTimer"]

#: Stages of a plan, in order (``probe`` only where the density check is on, see
#: :mod:`flexsample.probe`; ``cover`` only with ``Selection.row_guarantee``; ``tiles`` only
#: with ``Selection.tile_keys``), and of a whole call.
PLAN_STAGES: tuple[str, ...] = ("probe", "sample", "select", "cover", "tiles", "mask")
STAGES: tuple[str, ...] = (*PLAN_STAGES, "attention")


@dataclass
class SampleStats:
    """Statistics of one SampleAttention call.

    Attributes:
        path: ``"sparse"`` (SampleAttention ran) or ``"dense"`` (dense causal SDPA ran).
        reason: why the dense path ran; None on the sparse path.
        seq_len: tokens ``S`` (keys).
        query_len: queries ``L``, the last ``L`` positions (``S`` unless a chunk of a
            chunked prefill).
        batch_size, num_heads: ``B`` and ``Hq``.
        sampler: stage-1 implementation that ran (None on the dense path).
        backend: the FlexAttention backend that ran the call, ``"triton"`` or ``"flash"``;
            on the dense path ``"flash"`` where the dense call ran on FlexAttention's
            FlashAttention-4 kernel (faster than SDPA there, by the cost model), None where
            SDPA ran (cuDNN first on CUDA).
        layout: block geometry (None on the dense path).
        density: ``(B, Hq)`` computed (query, key) pairs over causal pairs (None on the dense
            path): window, sink and gathered columns.
        window: ``(B, Hq)`` local window per head, in tokens (whole blocks).
        column_mask: ``(B, Hq, S)`` bool, the key columns each head reads beyond its window
            (its own selection: query heads sharing a kv head read only their own columns).
        scores: ``(B, Hq, num_segments, S)`` sampled column scores (stage 1 output).
        sampled_mass: ``(B, Hq)`` smallest, over query segments, fraction of the sampled rows'
            attention mass that the mask keeps (at least ``alpha`` by construction).
        row_mass: ``(B, Hq, R)`` kept share of each of the ``R`` sampled rows' own attention
            mass (a lower bound, at least ``alpha``); None without
            ``config.selection.row_guarantee``.
        notes: what about the length and config limited sparsity (e.g. a single tile); empty
            when nothing did.
        times: seconds per stage (:data:`STAGES`: ``probe``, ``sample``, ``select``,
            ``cover``, ``mask``, ``attention``; ``probe`` only where the density check is on,
            ``cover`` only with ``config.selection.row_guarantee``), measured with device
            synchronisation; on a path decided dense before sampling, ``attention`` and
            perhaps ``probe``.
        pattern: what each head read (:mod:`flexsample.patterns`); None on the dense path.
    """

    path: CallPath
    seq_len: int
    batch_size: int
    num_heads: int
    query_len: int | None = None
    reason: str | None = None
    sampler: str | None = None
    backend: str | None = None
    layout: SampleLayout | None = None
    density: torch.Tensor | None = None
    window: torch.Tensor | None = None
    column_mask: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    sampled_mass: torch.Tensor | None = None
    row_mass: torch.Tensor | None = None
    notes: tuple[str, ...] = ()
    times: dict[str, float] = field(default_factory=dict)
    pattern: Pattern | None = None

    @classmethod
    def from_plan(cls, plan: PrefillPlan, times: dict[str, float]) -> SampleStats:
        """The statistics of a call that ran ``plan``, with the seconds of its stages."""
        pattern = plan.pattern
        window = column_mask = None
        base = pattern.base if isinstance(pattern, TileKeys) else pattern
        if isinstance(base, WindowColumns):
            window = base.window_blocks * base.layout.block_size
            column_mask = base.columns
        return cls(
            path=plan.path,
            reason=plan.reason,
            seq_len=plan.seq_len,
            query_len=plan.query_len,
            batch_size=plan.batch_size,
            num_heads=plan.num_heads,
            sampler=plan.sampler,
            backend=plan.backend,
            layout=plan.layout,
            density=plan.density,
            window=window,
            column_mask=column_mask,
            scores=plan.scores,
            sampled_mass=plan.kept_sampled_mass(),
            row_mass=None if plan.row_mass is None else plan.row_mass.flatten(2),
            notes=plan.notes,
            times=dict(times),
            pattern=pattern,
        )

    @property
    def mean_density(self) -> float:
        """Mean computed share of causal (query, key) pairs over batch and heads (1.0 if dense)."""
        return 1.0 if self.density is None else float(self.density.float().mean())

    @property
    def columns(self) -> torch.Tensor | None:
        """``(B, Hq)`` number of key columns each head reads (None when dense)."""
        return None if self.column_mask is None else self.column_mask.sum(dim=-1)

    def tile_coverage(self) -> torch.Tensor | None:
        """``(B, Hq, N, N)`` share of each tile's keys read, for pictures (None when dense).

        Computed on demand: it is ``N x N`` per head, too large to build on every call.
        """
        return None if self.pattern is None else self.pattern.tile_coverage()

    @property
    def mean_window(self) -> float | None:
        """Mean window in tokens over batch and heads (None when dense)."""
        return None if self.window is None else float(self.window.float().mean())

    @property
    def min_sampled_mass(self) -> float:
        """Smallest kept sampled mass over batch, heads and segments (1.0 when dense)."""
        return 1.0 if self.sampled_mass is None else float(self.sampled_mass.min())

    def row_mass_quantile(self, q: float) -> float | None:
        """The ``q`` quantile of the sampled rows' kept mass over batch, heads and rows
        (``q=0``: the smallest; ``0.01``: the 1st percentile); None unless rows were covered."""
        if self.row_mass is None:
            return None
        return float(torch.quantile(self.row_mass.flatten().float(), q))

    def summary(self) -> dict[str, object]:
        """A flat, JSON-friendly digest."""
        return {
            "path": self.path,
            "reason": self.reason,
            "seq_len": self.seq_len,
            "query_len": self.query_len,
            "sampler": self.sampler,
            "backend": self.backend,
            "mean_density": round(self.mean_density, 4),
            "mean_window": None if self.mean_window is None else round(self.mean_window),
            "mean_columns": None
            if self.columns is None
            else round(float(self.columns.float().mean()), 1),
            "min_sampled_mass": round(self.min_sampled_mass, 4),
            **{
                key: None if value is None else round(value, 4)
                for key, value in (
                    ("min_row_mass", self.row_mass_quantile(0.0)),
                    ("p1_row_mass", self.row_mass_quantile(0.01)),
                )
            },
            "notes": list(self.notes),
            **{f"time_{k}_s": v for k, v in self.times.items()},
        }
