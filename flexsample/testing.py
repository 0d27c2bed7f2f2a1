"""Error measures and inputs shared by the tests and the benchmarks (one definition of each)."""

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


def random_qkv(
    B: int,
    Hq: int,
    Hkv: int,
    S: int,
    D: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standard normal ``q (B, Hq, S, D)``, ``k, v (B, Hkv, S, D)`` from the global generator
    (the tests seed it per test): diffuse attention, the case sparsity cannot help."""
    return (
        torch.randn(B, Hq, S, D, dtype=dtype, device=device),
        torch.randn(B, Hkv, S, D, dtype=dtype, device=device),
        torch.randn(B, Hkv, S, D, dtype=dtype, device=device),
    )
