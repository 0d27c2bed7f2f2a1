"""Stage 3 — attention: compiled FlexAttention with the block mask, and its dense twins."""

from __future__ import annotations

import functools
import logging

import torch
import torch.fx.experimental._config
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from .compilation import recompile_policy
from .layout import SampleLayout
from .selection import keep_mask

logger = logging.getLogger("flexsample")


@functools.cache
def compiled_flex_attention():
    """``flex_attention`` compiled once with dynamic shapes.

    Dynamic shapes make one compiled kernel serve every sequence length (and batch sizes
    above one), instead of a recompilation per new prompt length.
    """
    return torch.compile(flex_attention, dynamic=True)


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockMask,
    scale: float,
) -> torch.Tensor:
    """Block-sparse attention through compiled FlexAttention.

    Args:
        q: ``(B, Hq, S, D)``.
        k: ``(B, Hkv, L, D)`` with ``Hq % Hkv == 0``: the keys the mask indexes (for
            SampleAttention, ``[gathered columns | keys]``, see
            :func:`flexsample.masks.gather_keys`).
        v: ``(B, Hkv, L, D)``.
        block_mask: a ``BlockMask`` over ``(B, Hq, S, L)``.
        scale: softmax scale.

    Returns:
        ``(B, Hq, S, D)`` in q's dtype.
    """
    if not torch.is_grad_enabled():
        # FlexAttention refuses CPU inputs that require grad even under no_grad; with autograd
        # off, detaching changes nothing else.
        q, k, v = q.detach(), k.detach(), v.detach()
    kwargs = {
        "block_mask": block_mask,
        "scale": scale,
        "enable_gqa": q.shape[1] != k.shape[1],
    }
    if torch.compiler.is_compiling():  # inside the user's own torch.compile region
        return flex_attention(q, k, v, **kwargs)
    # Past the recompile limit Dynamo would run eager flex_attention: dense and slow. No duck
    # sizing: the mask's lookup tables must not share a symbol with the key length (see
    # flexsample.masks.sample_attention_mask_mod).
    with (
        recompile_policy(fail_on_limit=True),
        torch.fx.experimental._config.patch(use_duck_shape=False),
    ):
        return compiled_flex_attention()(q, k, v, **kwargs)


#: Dense kernels in order of preference on CUDA: cuDNN is the fastest on Hopper (about 1.8x
#: FlashAttention-2 at 128K on an H100); SDPA skips the ones that cannot run a case.
_CUDA_DENSE_ORDER = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]

#: (device index, dtype, head dim, whole prompt) where cuDNN refused grouped K/V: those
#: expand K/V to the query heads instead.
_CUDNN_GQA_REFUSED: set[tuple[int | None, torch.dtype, int, bool]] = set()


def dense_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """Dense causal attention (PyTorch SDPA), the fallback path.

    q ``(B, Hq, L, D)`` holds the last ``L`` positions of k and v's ``S`` (``L = S`` for a
    whole prompt).

    On CUDA it asks SDPA for cuDNN first. cuDNN reads grouped K/V (``Hkv < Hq``) as they
    are; where a build refuses them (fp32, or an older cuDNN), K/V are expanded to the query
    heads, for that case's every later call too (logged once). Elsewhere, and inside the
    user's own ``torch.compile``, SDPA chooses.
    """
    gqa = q.shape[1] != k.shape[1]
    L, S = q.shape[2], k.shape[2]
    # SDPA's is_causal aligns the first query with the first key; a chunk's queries are the
    # last L positions, so its mask is aligned at the bottom right.
    causal = {"is_causal": True} if L == S else {"attn_mask": causal_lower_right(L, S)}
    if q.device.type != "cuda" or torch.compiler.is_compiling():
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa, **causal)
    if gqa:
        key = (q.device.index, q.dtype, q.shape[-1], L == S)
        if key not in _CUDNN_GQA_REFUSED:
            try:
                with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                    return F.scaled_dot_product_attention(
                        q, k, v, scale=scale, enable_gqa=True, **causal
                    )
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as error:  # "No available kernel": this build refuses GQA
                _CUDNN_GQA_REFUSED.add(key)
                logger.info(
                    "flexsample: cuDNN SDPA refused grouped K/V (%s); expanding K/V for it",
                    str(error).splitlines()[0][:200],
                )
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    with sdpa_kernel(_CUDA_DENSE_ORDER, set_priority=True):
        return F.scaled_dot_product_attention(q, k, v, scale=scale, **causal)


def sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window_blocks: torch.Tensor,
    columns: torch.Tensor,
    layout: SampleLayout,
    scale: float,
) -> torch.Tensor:
    """Eager float64 oracle of SampleAttention's sparse path: materialises the element mask.

    Args:
        q: ``(B, Hq, L, D)``, the last ``L = S - layout.query_start`` positions.
        k: ``(B, Hkv, S, D)``, ``Hq % Hkv == 0``.
        v: ``(B, Hkv, S, D)``.
        window_blocks: ``(B, Hq)`` window per head, in blocks.
        columns: ``(B, Hq, S)`` bool, the columns each head attends.
        layout: the geometry.
        scale: softmax scale.

    Returns:
        ``(B, Hq, L, D)`` in q's dtype. Small inputs only (``B * Hq * L * S`` elements).
    """
    Hq, S = q.shape[1], k.shape[2]
    group = Hq // k.shape[1]
    rows = torch.arange(layout.query_start, S, device=q.device)
    allowed = keep_mask(window_blocks, columns, layout, rows)
    kk = k.double().repeat_interleave(group, dim=1)
    vv = v.double().repeat_interleave(group, dim=1)
    logits = (q.double() @ kk.transpose(-1, -2)) * scale
    probs = logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    return (probs @ vv).to(q.dtype)
