"""The public entry point: :func:`flex_sample_attention`."""

from __future__ import annotations

import torch

from .config import SampleConfig
from .plan import plan_prefill_checked, run_plan
from .stats import SampleStats, StageTimer
from .validation import check_qkv


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

    Samples the attention of a few query rows, chooses per head a local window and the key
    columns that with it hold ``config.alpha`` of their mass, gathers each kv head's columns
    in front of its keys, and runs one compiled FlexAttention call over window tiles and
    gathered columns. Sequences shorter than ``config.min_seq_len`` run dense
    causal SDPA; ``stats.path`` says which path ran and why. The same as
    ``run_plan(plan_prefill(q, k, config, scale=scale), q, k, v)``.

    Inference only: inputs that require grad (with autograd on) raise at every length.
    NaN inputs are not detected: where SDPA spreads a NaN key into every later row, the
    sparse path spreads it only into the rows whose mask keeps that key.

    Args:
        q: ``(B, Hq, L, D)`` queries; float32, bfloat16 or float16, on CPU or CUDA. ``L = S``
            for a whole prompt; ``L < S`` for a chunk of a chunked prefill: the queries are
            the last ``L`` positions and k, v hold the earlier context too.
        k: ``(B, Hkv, S, D)`` keys, ``Hq % Hkv == 0`` (grouped-query attention).
        v: ``(B, Hkv, S, D)`` values.
        config: method settings; ``SampleConfig()`` if None.
        scale: softmax scale; ``1/sqrt(D)`` if None.
        return_stats: also return a :class:`~flexsample.stats.SampleStats` (this times
            each stage, synchronising the device between stages).

    Returns:
        ``(B, Hq, L, D)`` in q's dtype, or ``(output, stats)`` when ``return_stats``.

    Raises:
        TypeError: a non-tensor input, a non-float or mixed dtype, a config that is not a
            ``SampleConfig``.
        ValueError: mismatched shapes, q longer than k, ``Hq % Hkv != 0``, empty
            dimensions, tensors on different devices, a non-positive scale, or a Triton
            sampler requested where it cannot run.
        NotImplementedError: an input requires grad (flexsample has no backward pass).
    """
    if not torch.compiler.is_compiling():
        check_qkv(q, k, v)
    if not return_stats:
        return run_plan(plan_prefill_checked(q, k, config, scale, None), q, k, v)
    timer = StageTimer(q.device, enabled=True)
    plan = plan_prefill_checked(q, k, config, scale, timer)  # q, k, v checked above
    with timer.stage("attention"):
        out = run_plan(plan, q, k, v)
    return out, SampleStats.from_plan(plan, timer.times)
