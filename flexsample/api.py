"""The public entry point: :func:`flex_sample_attention`."""

from __future__ import annotations

import logging

import torch

from .attention import dense_causal_attention, sparse_attention
from .config import SampleConfig
from .layout import SampleLayout
from .masks import _block_mask, block_layout, density
from .sampling import resolve_sampler, run_sampler
from .selection import kept_sampled_mass, select_blocks
from .stats import SampleStats, StageTimer
from .validation import check_qkv, resolve_scale

logger = logging.getLogger("flexsample")
_DEFAULT_CONFIG = SampleConfig()
_logged_reasons: set[str] = set()


def flex_sample_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    config: SampleConfig | None = None,
    scale: float | None = None,
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, SampleStats]:
    """Causal attention for long-context prefill with SampleAttention's adaptive sparsity.

    Samples the attention of a few query rows, keeps per head the key blocks that hold
    ``config.alpha`` of their mass (plus a local window and the sink), and runs compiled
    FlexAttention on that block mask. Sequences shorter than ``config.min_seq_len`` run dense
    causal SDPA; ``stats.path`` says which path ran and why.

    Args:
        q: ``(B, Hq, S, D)`` queries; float32, bfloat16 or float16, on CPU or CUDA.
        k: ``(B, Hkv, S, D)`` keys, ``Hq % Hkv == 0`` (grouped-query attention).
        v: ``(B, Hkv, S, D)`` values.
        config: method settings; ``SampleConfig()`` if None.
        scale: softmax scale; ``1/sqrt(D)`` if None.
        return_stats: also return a :class:`~flexsample.stats.SampleStats` (this times
            each stage, synchronising the device between stages).

    Returns:
        ``(B, Hq, S, D)`` in q's dtype, or ``(output, stats)`` when ``return_stats``.

    Raises:
        TypeError: a non-tensor input, a non-float or mixed dtype, a config that is not a
            ``SampleConfig``.
        ValueError: mismatched shapes, ``Hq % Hkv != 0``, tensors on different devices, a
            non-positive scale, or a Triton sampler requested where it cannot run.
    """
    config = _DEFAULT_CONFIG if config is None else config
    if not torch.compiler.is_compiling():
        if not isinstance(config, SampleConfig):
            raise TypeError(f"config must be a SampleConfig, got {type(config).__name__}")
        check_qkv(q, k, v)
    scale = resolve_scale(q, scale)
    B, Hq, S, _ = q.shape
    timer = StageTimer(q.device, enabled=return_stats)

    if S < config.min_seq_len:
        reason = f"seq_len {S} < min_seq_len {config.min_seq_len}"
        _log_dense_once(reason)
        with timer.stage("attention"):
            out = dense_causal_attention(q, k, v, scale)
        stats = SampleStats(
            path="dense", reason=reason, seq_len=S, batch_size=B, num_heads=Hq, times=timer.times
        )
        return (out, stats) if return_stats else out

    layout = SampleLayout.create(S, config)
    sampler = resolve_sampler(config.sampler, q.device)
    with timer.stage("sample"):
        scores = run_sampler(sampler, q, k, layout, scale)
    with timer.stage("select"):
        stripes = select_blocks(scores, config.alpha)
    with timer.stage("mask"):
        keep = block_layout(stripes, layout)
        block_mask = _block_mask(keep, S, layout.block_size)
    with timer.stage("attention"):
        out = sparse_attention(q, k, v, block_mask, scale)
    if not return_stats:
        return out
    stats = SampleStats(
        path="sparse",
        seq_len=S,
        batch_size=B,
        num_heads=Hq,
        sampler=sampler,
        layout=layout,
        density=density(keep),
        stripes=stripes,
        scores=scores,
        sampled_mass=kept_sampled_mass(scores, stripes).amin(dim=-1),
        times=timer.times,
    )
    return out, stats


def _log_dense_once(reason: str) -> None:
    key = reason.split(" ")[0]
    if key not in _logged_reasons:
        _logged_reasons.add(key)
        logger.info("flexsample: dense attention (%s)", reason)
