"""Helpers shared by test modules (imported as ``helpers``: tests/ is on sys.path)."""

from __future__ import annotations

import torch


def rel_rmse(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative RMS error ``||x - ref|| / ||ref||`` computed in float64."""
    x, ref = x.double(), ref.double()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))
