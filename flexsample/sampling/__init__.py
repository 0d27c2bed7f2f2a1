"""Stage 1 — query-guided sampling: how much attention each key gets from the sampled rows.

Three implementations share one contract and are held together by tests:

* :func:`sample_column_scores_reference` — dense float64 oracle (small inputs only);
* :func:`sample_column_scores_torch` — chunked torch ops, the CPU path;
* ``sample_column_scores_triton`` — the Triton kernel, the CUDA path (imported lazily).
"""

from __future__ import annotations

import functools

import torch

from ..config import SampleConfig
from ..layout import SampleLayout
from ..validation import check_qk, resolve_scale
from .reference import sample_column_scores_reference, sampled_row_probabilities
from .torch_sampler import sample_column_scores_torch

__all__ = [
    "resolve_sampler",
    "sample_column_scores",
    "sample_column_scores_reference",
    "sample_column_scores_torch",
    "sampled_row_probabilities",
    "triton_available",
]


@functools.cache
def triton_available() -> bool:
    """Whether ``import triton`` works here."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _triton_runs_on(device: torch.device) -> bool:
    import os

    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def resolve_sampler(name: str, device: torch.device) -> str:
    """Turn a config's ``sampler`` (maybe ``"auto"``) into the implementation that will run.

    Raises:
        ValueError: ``"triton"`` was asked for where it cannot run.
    """
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if name == "triton":
        if not triton_available():
            raise ValueError("sampler='triton' needs the triton package: pip install triton")
        if not _triton_runs_on(device):
            raise ValueError(
                f"sampler='triton' needs CUDA tensors (got device {device}); on CPU it runs "
                "only under TRITON_INTERPRET=1, for tests. Use sampler='torch' or 'auto'."
            )
    return name


def sample_column_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    config: SampleConfig | None = None,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Sampled attention mass per query segment and key (stage 1).

    For each segment of the query rows, the last ``rows_per_segment`` rows are sampled; the
    result is the mean of their exact causal softmax probabilities, per key. Memory is
    ``num_segments x S`` per head, never ``sampled rows x S``.

    Args:
        q: ``(B, Hq, S, D)`` queries.
        k: ``(B, Hkv, S, D)`` keys with ``Hq % Hkv == 0``.
        config: the method's settings (``SampleConfig()`` if None); ``config.sampler``
            chooses the implementation.
        scale: softmax scale, ``1/sqrt(D)`` if None.

    Returns:
        ``(B, Hq, num_segments, S)`` float32; each segment's row sums to 1 (up to rounding)
        and is zero after the segment's last sampled row.

    Raises:
        ValueError, TypeError: inputs of the wrong shape, dtype or device (see
            :func:`flexsample.validation.check_qkv`).
    """
    config = config or SampleConfig()
    check_qk(q, k)
    scale = resolve_scale(q, scale)
    layout = SampleLayout.create(q.shape[-2], config)
    return run_sampler(resolve_sampler(config.sampler, q.device), q, k, layout, scale)


def run_sampler(
    name: str, q: torch.Tensor, k: torch.Tensor, layout: SampleLayout, scale: float
) -> torch.Tensor:
    """Run an already-resolved sampler on validated inputs."""
    if name == "triton":
        from .triton_kernel import sample_column_scores_triton

        return sample_column_scores_triton(q, k, layout, scale)
    if name == "torch":
        return sample_column_scores_torch(q, k, layout, scale)
    return sample_column_scores_reference(q, k, layout, scale)


def run_sampler_with_lse(
    name: str, q: torch.Tensor, k: torch.Tensor, layout: SampleLayout, scale: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`run_sampler`, and on Triton the sampled rows' log-sum-exp its first pass
    computed (None for the other samplers), which the per-row cover reuses
    (:func:`flexsample.cover.cover_rows`'s ``row_lse``)."""
    if name == "triton":
        from .triton_kernel import sample_scores_and_lse_triton

        return sample_scores_and_lse_triton(q, k, layout, scale)
    return run_sampler(name, q, k, layout, scale), None
