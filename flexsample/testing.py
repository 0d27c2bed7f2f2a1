"""Error measures shared by the tests and the benchmarks (one definition of each)."""

from __future__ import annotations

import torch


def rel_rmse(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative RMS error ``||x - ref|| / ||ref||``, computed in float64."""
    x, ref = x.double(), ref.double()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


def rel_max(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute error relative to the largest ``|ref|``, computed in float64."""
    x, ref = x.double(), ref.double()
    return float((x - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
