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

from .backends import Backend, kernel_backend, mark_failed
from .compilation import recompile_policy
from .costs import clear_cache as clear_cost_models
from .layout import bucket_length
from .masks import causal_block_mask, pad_sequence
from .patterns import Pattern

logger = logging.getLogger("flexsample")


@functools.cache
def compiled_flex_attention():
    """``flex_attention`` compiled once with dynamic shapes (the ``"triton"`` backend).

    Dynamic shapes make one compiled kernel serve every sequence length (and batch sizes
    above one), instead of a recompilation per new prompt length.
    """
    return torch.compile(flex_attention, dynamic=True)


@functools.cache
def compiled_static_flex_attention():
    """``flex_attention`` compiled per static shape (the ``"flash"`` backend, which has no
    dynamic shapes): callers pad lengths to :func:`~flexsample.bucket_length`, so
    distinct prompt lengths share few compilations."""
    return torch.compile(flex_attention, dynamic=False)


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockMask,
    scale: float,
    backend: Backend = "triton",
    *,
    static_shapes: bool | None = None,
) -> torch.Tensor:
    """Block-sparse attention through compiled FlexAttention.

    Args:
        q: ``(B, Hq, S, D)``.
        k: ``(B, Hkv, L, D)`` with ``Hq % Hkv == 0``: the keys the mask indexes (for
            SampleAttention, ``[gathered columns | keys]``, see
            :func:`flexsample.patterns.window_columns.gather_keys`).
        v: ``(B, Hkv, L, D)``.
        block_mask: a ``BlockMask`` over ``(B, Hq, S, L)``.
        scale: softmax scale.
        backend: ``"triton"`` or ``"flash"`` (see ``SampleConfig.backend``).
        static_shapes: compile per static shape (pad lengths to
            :func:`~flexsample.bucket_length` to share compilations) instead of once
            with dynamic shapes; default: only for ``"flash"``, which needs it.

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
    spec = kernel_backend(backend)
    if spec.kernel_options:
        kwargs["kernel_options"] = dict(spec.kernel_options)
    if torch.compiler.is_compiling():  # inside the user's own torch.compile region
        return flex_attention(q, k, v, **kwargs)
    static = spec.static_shapes if static_shapes is None else static_shapes
    compiled = compiled_static_flex_attention if static else compiled_flex_attention
    # Past the recompile limit Dynamo would run eager flex_attention: dense and slow. No duck
    # sizing: the mask's lookup tables must not share a symbol with the key length (see
    # flexsample.patterns.window_columns.sample_attention_mask_mod).
    with (
        recompile_policy(fail_on_limit=True),
        torch.fx.experimental._config.patch(use_duck_shape=False),
    ):
        try:
            return compiled()(q, k, v, **kwargs)
        except torch.OutOfMemoryError:
            raise
        except Exception as error:
            if spec.fallback is None:
                raise
            # FlashAttention-4 is young: a case it cannot compile runs on its fallback,
            # visibly, and later plans of this kind choose that (unavailable() says why).
            message = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
            mark_failed(
                backend, q.device, q.dtype, q.shape[-1], f"a {backend} call failed ({message})"
            )
            clear_cost_models()  # plans cached on the failed backend's costs are made again
            logger.warning(
                "flexsample: FlexAttention's %s backend failed, this call and later ones run "
                "on its %s backend: %s",
                backend,
                spec.fallback,
                message,
            )
            return sparse_attention(q, k, v, block_mask, scale, spec.fallback)


#: Tile side of :func:`flex_dense_attention`'s mask (FlashAttention-4's tile).
DENSE_BLOCK_SIZE = 128


def flex_dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, backend: Backend = "flash"
) -> torch.Tensor:
    """Dense causal attention of a whole prompt through compiled FlexAttention: every causal
    tile (:func:`~flexsample.masks.causal_block_mask`), static shapes padded to
    :func:`~flexsample.bucket_length` so that prompt lengths share compilations.

    On Hopper with FlashAttention-4 (``backend="flash"``) this can beat cuDNN at long lengths;
    the plan's cost model says where (:meth:`~flexsample.costs.CostModel.dense_kernel`).

    Args:
        q: ``(B, Hq, S, D)``.
        k: ``(B, Hkv, S, D)``, ``Hq % Hkv == 0``.
        v: ``(B, Hkv, S, D)``.
        scale: softmax scale.
        backend: the FlexAttention backend (see ``SampleConfig.backend``).

    Returns:
        ``(B, Hq, S, D)`` in q's dtype.
    """
    S = q.shape[2]
    if k.shape[2] != S:
        raise ValueError(f"flex_dense_attention runs whole prompts: q has {S} rows, k {k.shape[2]}")
    padded = bucket_length(S, DENSE_BLOCK_SIZE)
    mask = causal_block_mask(S, padded, DENSE_BLOCK_SIZE, q.device)
    q, k, v = (pad_sequence(x, padded) for x in (q, k, v))
    out = sparse_attention(q, k, v, mask, scale, backend, static_shapes=True)
    return out[:, :, :S]


#: Dense kernels in order of preference on CUDA: cuDNN is the fastest on Hopper
#: (``docs/tuning.md``); SDPA skips the ones that cannot run a case.
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

    On CUDA a whole prompt in fp16/bf16 runs cuDNN's attention op directly (SDPA's first
    choice there, for half its host time); otherwise it asks SDPA for cuDNN first. cuDNN
    reads grouped K/V (``Hkv < Hq``) as they are; where a build refuses them (fp32, or an
    older cuDNN), K/V are expanded to the query heads, for that case's every later call too
    (logged once). Elsewhere, and inside the user's own ``torch.compile``, SDPA chooses.
    """
    L, S = q.shape[2], k.shape[2]
    cuda = q.device.type == "cuda" and not torch.compiler.is_compiling()
    if cuda and L == S:  # first: at short lengths the host's time before the launch counts
        out = _cudnn_direct(q, k, v, scale)
        if out is not None:
            return out
    gqa = q.shape[1] != k.shape[1]
    # SDPA's is_causal aligns the first query with the first key; a chunk's queries are the
    # last L positions, so its mask is aligned at the bottom right.
    causal = {"is_causal": True} if L == S else {"attn_mask": causal_lower_right(L, S)}
    if not cuda:
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


_HALF = (torch.float16, torch.bfloat16)

#: (device index, dtype, head dim, grouped) where cuDNN's op refused a direct call.
_CUDNN_DIRECT_REFUSED: set[tuple[int | None, torch.dtype, int, bool]] = set()


def _cudnn_direct(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor | None:
    """A whole prompt's causal attention on cuDNN's ATen op, without SDPA's dispatch: the
    same kernel SDPA picks first, for about half the host time (``docs/tuning.md``).

    Only where SDPA would run cuDNN too (fp16/bf16, head dim a multiple of 8 up to 128, unit
    stride in the head dim); None where not, or where the op refuses the case (remembered).
    """
    D = q.shape[-1]
    if (
        q.dtype not in _HALF
        or D % 8
        or D > 128
        or q.stride(-1) != 1
        or k.stride(-1) != 1
        or v.stride(-1) != 1
    ):
        return None
    key = (q.device.index, q.dtype, D, q.shape[1] != k.shape[1])
    if _CUDNN_DIRECT_REFUSED and key in _CUDNN_DIRECT_REFUSED:
        return None
    try:
        return torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, False, 0.0, True, False, scale=scale
        )[0]
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as error:
        _CUDNN_DIRECT_REFUSED.add(key)
        logger.info(
            "flexsample: cuDNN's attention op refused a direct call (%s); using SDPA",
            str(error).splitlines()[0][:200],
        )
        return None


def sparse_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, scale: float
) -> torch.Tensor:
    """Eager float64 oracle of the sparse path: materialises the pattern's element mask
    (:meth:`~flexsample.patterns.Pattern.keep`).

    Args:
        q: ``(B, Hq, L, D)``, the last ``L = S - pattern.layout.query_start`` positions.
        k: ``(B, Hkv, S, D)``, ``Hq % Hkv == 0``.
        v: ``(B, Hkv, S, D)``.
        pattern: what each head reads.
        scale: softmax scale.

    Returns:
        ``(B, Hq, L, D)`` in q's dtype. Small inputs only (``B * Hq * L * S`` elements).
    """
    Hq, S = q.shape[1], k.shape[2]
    group = Hq // k.shape[1]
    rows = torch.arange(pattern.layout.query_start, S, device=q.device)
    allowed = pattern.keep(rows)
    kk = k.double().repeat_interleave(group, dim=1)
    vv = v.double().repeat_interleave(group, dim=1)
    logits = (q.double() @ kk.transpose(-1, -2)) * scale
    probs = logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    return (probs @ vv).to(q.dtype)
