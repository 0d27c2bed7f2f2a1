"""Error measures and inputs shared by the tests and the benchmarks (one definition of each)."""

from __future__ import annotations

import torch

from .config import SampleConfig
from .layout import SampleLayout
from .patterns import WindowColumns


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


def random_selection(
    B: int,
    Hq: int,
    Hkv: int,
    S: int,
    block_size: int,
    *,
    shared: bool = False,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> WindowColumns:
    """Random windows (0 to all blocks) and columns (each key with probability 0.1) per head:
    masks of every shape for checking the attention call against its element-mask oracle.
    ``shared``: each GQA group reads its union (as ``SampleConfig.group_union``)."""
    layout = SampleLayout.create(S, SampleConfig(block_size=block_size))
    draw = {"device": device, "generator": generator}
    windows = torch.randint(0, layout.num_blocks + 1, (B, Hq), **draw)
    selection = WindowColumns(windows, torch.rand(B, Hq, S, **draw) < 0.1, layout)
    return selection.shared_by_group(Hq // Hkv) if shared else selection
