"""The public entry point: :func:`flex_sample_attention`."""

from __future__ import annotations

import torch

from .config import SampleConfig
from .plan import DenseByLength, plan_prefill_unchecked, run_plan, run_plan_unchecked
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
    A NaN or Inf in q, k or v sends the call dense (``stats.reason`` says so): the output
    then has SDPA's NaN rows, where a sparse mask would spread a bad key only into the rows
    that keep it.

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
    compiling = torch.compiler.is_compiling()
    if not return_stats:
        if compiling:
            return run_plan(plan_prefill_unchecked(q, k, config, scale, None), q, k, v)
        return _call(q, k, v, config, scale)
    if not compiling:
        check_qkv(q, k, v)
    timer = StageTimer(q.device, enabled=True)
    plan = plan_prefill_unchecked(q, k, config, scale, timer, v)  # q, k, v checked above
    with timer.stage("attention"):  # the plan was made from these tensors, v seen
        out = run_plan_unchecked(plan, q, k, v)
    return out, SampleStats.from_plan(plan, timer.times)


def _call(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: SampleConfig | None,
    scale: float | None,
) -> torch.Tensor:
    """The call without statistics. A shape that runs dense by its length runs dense on every
    call: after its first call (which checked q, k and v), the same signature goes straight
    to the kernel."""
    signature = _signature(q, k, v, config, scale)
    known = _BY_LENGTH.get(signature) if signature is not None else None
    if known is not None:
        return run_plan_unchecked(known, q, k, v)
    check_qkv(q, k, v)
    plan = plan_prefill_unchecked(q, k, config, scale, None, v)
    if plan.by_length and signature is not None:
        _BY_LENGTH.put(signature, plan)
    return run_plan_unchecked(plan, q, k, v)


#: Call signatures (see :func:`_signature`: v and the checks' inputs too, unlike
#: :func:`~flexsample.plan.plan_prefill`'s key) whose plan is dense by length alone: checking
#: and planning such a call again is a measurable share of a short call (``docs/tuning.md``).
_BY_LENGTH = DenseByLength()


def _signature(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: object, scale: object
) -> tuple | None:
    """What :func:`check_qkv` and the length checks read of a call (shapes, dtypes, devices,
    config, scale), hashable; None where the call must go the long way (inputs needing grad
    with autograd on raise there; a scale or config of another type is checked there)."""
    if not (config is None or type(config) is SampleConfig):
        return None
    if not (scale is None or type(scale) is float):
        return None
    if not (type(q) is type(k) is type(v) is torch.Tensor):
        return None
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return None
    return (
        q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device,
        config, scale,
    )  # fmt: skip
