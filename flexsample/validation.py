"""Input checks shared by the public functions: clear errors instead of deep torch failures."""

from __future__ import annotations

import math

import torch

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_qkv(q: object, k: object, v: object) -> None:
    """Check ``q (B, Hq, L, D)``, ``k``/``v (B, Hkv, S, D)`` for causal prefill attention.

    ``L <= S``: the queries are the last ``L`` positions (``L = S`` for a whole prompt, less
    for a chunk whose earlier context is in ``k`` and ``v``).

    Raises:
        TypeError: a non-tensor, or a dtype that is not float32/bfloat16/float16, or mixed
            dtypes.
        ValueError: wrong rank, mismatched batch/head-dim, q longer than k, ``Hq % Hkv != 0``, an
            empty batch, sequence or head dim, or tensors on different devices.
        NotImplementedError: an input requires grad while autograd is on: flexsample
            computes the forward pass of inference prefill only (the same at every length,
            also where the dense path would run).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be 4-D (batch, heads, seq_len, head_dim), got shape {tuple(t.shape)}"
            )
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    assert isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor)
    assert isinstance(v, torch.Tensor)
    qs, ks, vs = q.shape, k.shape, v.shape
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.device.type == "meta":
        raise ValueError(
            "q, k, v are meta tensors (shapes without data): flexsample samples the attention "
            "it computes, so it needs real tensors; use dense attention while tracing shapes"
        )
    if ks != vs:
        raise ValueError(f"k and v must have the same shape: {_shapes(q, k, v)}")
    if qs[0] != ks[0]:
        raise ValueError(f"q and k must have the same batch size: {_shapes(q, k, v)}")
    if qs[2] > ks[2]:
        raise ValueError(
            "q must not be longer than k: the queries are the last positions of the keys' "
            f"sequence (the whole prompt, or a chunk after earlier context): {_shapes(q, k, v)}"
        )
    if qs[3] != ks[3]:
        raise ValueError(f"q and k must have the same head_dim: {_shapes(q, k, v)}")
    if qs[1] == 0 or ks[1] == 0:
        raise ValueError(f"q, k, v need at least one head: {_shapes(q, k, v)}")
    if qs[1] % ks[1]:
        raise ValueError(
            f"query heads ({qs[1]}) must be a multiple of key/value heads ({ks[1]}): "
            f"{_shapes(q, k, v)}"
        )
    if qs[2] == 0 or qs[0] == 0 or qs[3] == 0:
        raise ValueError(
            f"q, k, v must not be empty (batch, seq_len and head_dim >= 1): {_shapes(q, k, v)}"
        )
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise NotImplementedError(
            "flexsample computes inference prefill only (no backward pass), but q, k or v "
            "requires grad: call it under torch.no_grad() or torch.inference_mode(), or use "
            "dense attention for training"
        )


def _shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    # Formatted only for an error message: every call checks, few fail.
    return f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"


def check_qk(q: object, k: object) -> None:
    """:func:`check_qkv` for the stages that read only queries and keys."""
    check_qkv(q, k, k)


def resolve_scale(q: torch.Tensor, scale: object) -> float:
    """The softmax scale: ``1/sqrt(head_dim)`` when None, else a finite positive number."""
    if scale is None:
        return q.shape[-1] ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be finite and > 0, got {scale}")
    return float(scale)
