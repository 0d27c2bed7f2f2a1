"""What one call of :func:`flexsample.flex_sample_attention` did: path, density, mass, time."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from .layout import SampleLayout

if TYPE_CHECKING:  # plan.py imports this module
    from .plan import PrefillPlan

Path = Literal["sparse", "dense"]


@dataclass
class SampleStats:
    """Statistics of one SampleAttention call.

    Attributes:
        path: ``"sparse"`` (SampleAttention ran) or ``"dense"`` (dense causal SDPA ran).
        reason: why the dense path ran; None on the sparse path.
        seq_len: tokens ``S``.
        batch_size, num_heads: ``B`` and ``Hq``.
        sampler: stage-1 implementation that ran (None on the dense path).
        layout: block geometry (None on the dense path).
        density: ``(B, Hq)`` fraction of causal tiles computed (None on the dense path).
        stripes: ``(B, Hq, num_blocks)`` bool, the selected column stripes.
        scores: ``(B, Hq, num_segments, num_blocks)`` sampled block scores (stage 1 output).
        sampled_mass: ``(B, Hq)`` smallest, over query segments, fraction of the sampled rows'
            attention mass that the mask keeps (at least ``alpha`` by construction).
        notes: what about the length and config limited sparsity (e.g. a single tile); empty
            when nothing did.
        times: seconds per stage (``sample``, ``select``, ``mask``, ``attention``), measured
            with device synchronisation; on the dense path only ``attention``.
    """

    path: Path
    seq_len: int
    batch_size: int
    num_heads: int
    reason: str | None = None
    sampler: str | None = None
    layout: SampleLayout | None = None
    density: torch.Tensor | None = None
    stripes: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    sampled_mass: torch.Tensor | None = None
    notes: tuple[str, ...] = ()
    times: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_plan(cls, plan: PrefillPlan, times: dict[str, float]) -> SampleStats:
        """The statistics of a call that ran ``plan``, with the seconds of its stages."""
        return cls(
            path=plan.path,
            reason=plan.reason,
            seq_len=plan.seq_len,
            batch_size=plan.batch_size,
            num_heads=plan.num_heads,
            sampler=plan.sampler,
            layout=plan.layout,
            density=plan.density,
            stripes=plan.stripes,
            scores=plan.scores,
            sampled_mass=plan.kept_sampled_mass(),
            notes=plan.notes,
            times=dict(times),
        )

    @property
    def mean_density(self) -> float:
        """Mean fraction of causal tiles computed over batch and heads (1.0 when dense)."""
        return 1.0 if self.density is None else float(self.density.float().mean())

    def tile_layout(self) -> torch.Tensor | None:
        """``(B, Hq, N, N)`` bool: the tiles computed (None on the dense path)."""
        if self.stripes is None or self.layout is None:
            return None
        from .masks import block_layout

        return block_layout(self.stripes, self.layout)

    @property
    def min_sampled_mass(self) -> float:
        """Smallest kept sampled mass over batch, heads and segments (1.0 when dense)."""
        return 1.0 if self.sampled_mass is None else float(self.sampled_mass.min())

    def summary(self) -> dict[str, object]:
        """A flat, JSON-friendly digest."""
        return {
            "path": self.path,
            "reason": self.reason,
            "seq_len": self.seq_len,
            "sampler": self.sampler,
            "mean_density": round(self.mean_density, 4),
            "min_sampled_mass": round(self.min_sampled_mass, 4),
            "notes": list(self.notes),
            **{f"time_{k}_s": v for k, v in self.times.items()},
        }


class StageTimer:
    """Wall time per stage, synchronising the device so asynchronous work is counted."""

    def __init__(self, device: torch.device, enabled: bool) -> None:
        self.enabled = enabled and not torch.compiler.is_compiling()
        self.device = device
        self.times: dict[str, float] = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def stage(self, name: str):
        if not self.enabled:
            yield
            return
        self._sync()
        start = time.perf_counter()
        yield
        self._sync()
        self.times[name] = time.perf_counter() - start
