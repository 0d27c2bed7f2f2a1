"""Routing of each attention call: SampleAttention where it applies, transformers' SDPA else.

* causal prefill with no cache offset (``q_len == kv_len``), no padding: SampleAttention;
* the same with left padding (what ``generate()`` makes of a batch of prompts): SampleAttention
  on each row's unpadded tokens, padded query rows output zeros and no real token sees a
  padded key;
* a prefill chunk after cached tokens (the queries are the last ``q_len`` of the keys), with
  at most left padding in the cached part: SampleAttention with queries shorter than keys;
* anything else runs transformers' own SDPA attention with the mask SDPA would get, and is
  counted in the statistics with its reason: decode steps, sliding-window layers (Gemma 3's
  local layers), non-causal attention, dropout, soft-capping, attention sinks, unrecognised
  masks (right padding, packed sequences, padding inside a chunk, custom masks), and calls
  under autograd (flexsample has no backward pass).
"""

from __future__ import annotations

import time
import weakref
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from flexsample import flex_sample_attention

from .records import record_calls, record_dense
from .state import NAME, layer_state


class _MaskNotes:
    """What flexsample_mask learned about the masks it made: mask -> (B,) first real token.

    Keyed by identity, not by a WeakKeyDictionary: its lookups may compare tensors with
    ``==``, which is elementwise. An entry leaves when its mask is freed.
    """

    def __init__(self) -> None:
        self._notes: dict[int, tuple[weakref.ref, torch.Tensor]] = {}

    def add(self, mask: torch.Tensor, starts: torch.Tensor) -> None:
        key = id(mask)
        self._notes[key] = (weakref.ref(mask, lambda _: self._notes.pop(key, None)), starts)

    def get(self, mask: torch.Tensor) -> torch.Tensor | None:
        ref, starts = self._notes.get(id(mask), (None, None))
        return starts if ref is not None and ref() is mask else None


_LEFT_PADDING = _MaskNotes()


def flexsample_mask(*args, **kwargs):
    """``AttentionMaskInterface`` entry: SDPA's mask, noting left-padded causal prefill.

    Returns exactly what ``transformers.masking_utils.sdpa_mask`` returns (None for a plain
    causal mask, else a boolean 4-D mask), so every dense fallback keeps SDPA semantics.
    """
    mask = sdpa_mask(*args, **kwargs)
    if isinstance(mask, torch.Tensor):
        starts = _left_padding_starts(kwargs)
        if starts is not None:
            _LEFT_PADDING.add(mask, starts)
    return mask


def _left_padding_starts(kwargs: dict) -> torch.Tensor | None:
    """First real key of each row if the mask is causal prefill (or a prefill chunk: the
    queries are the last positions of the keys) with at most left padding, before the
    queries."""
    padding = kwargs.get("attention_mask")
    q_length, kv_length = kwargs.get("q_length"), kwargs.get("kv_length")
    q_offset = kwargs.get("q_offset", 0)
    plain_causal = (
        kwargs.get("mask_function", causal_mask_function) is causal_mask_function
        and kwargs.get("local_size") is None
        and kwargs.get("kv_offset", 0) == 0
        and isinstance(q_length, int)
        and q_length > 1
        and q_offset + q_length == kv_length
    )
    if not plain_causal:
        return None
    batch = kwargs.get("batch_size", 1)
    if padding is None:  # a chunk without padding (a whole prompt's mask would be None)
        return torch.zeros(batch, dtype=torch.long)
    if padding.dim() != 2:
        return None
    valid = padding.bool()
    if valid.shape[-1] != kv_length:
        return None
    # Left padding: each row is False...False True...True (never True then False again).
    if bool((valid[:, 1:].int() - valid[:, :-1].int()).lt(0).any()) or not bool(valid[:, -1].all()):
        return None
    starts = (~valid).sum(dim=-1)
    if q_offset and bool((starts > q_offset).any()):
        return None  # padding inside a chunk's queries: SDPA
    return starts


def dense_reason(
    module, query, key, value, attention_mask, dropout, is_causal, kwargs
) -> str | None:
    """Why this call cannot run SampleAttention, or None if it can."""
    q_len, kv_len = query.shape[2], key.shape[2]
    if q_len == 1:
        return "decode"
    if q_len != kv_len and attention_mask is None:
        return "cache offset without a mask"
    if kwargs.get("sliding_window") is not None:
        return "sliding-window layer"
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if not causal:
        return "not causal"
    if dropout:
        return "dropout"
    for name in ("softcap", "s_aux", "position_bias"):
        if kwargs.get(name) is not None:
            return f"{name} not supported"
    if kwargs.get("output_attentions"):
        return "output_attentions"
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        return "autograd on (flexsample is inference-only)"
    if attention_mask is not None and _LEFT_PADDING.get(attention_mask) is None:
        return "mask is not left-padded causal"
    return None


def flexsample_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``AttentionInterface`` entry with transformers' signature.

    Args:
        module: the attention layer calling (carries the flexsample state).
        query: ``(B, Hq, q_len, D)``.
        key: ``(B, Hkv, kv_len, D)``.
        value: ``(B, Hkv, kv_len, D)``.
        attention_mask: what :func:`flexsample_mask` returned.
        dropout: attention dropout (non-zero only in training: runs dense).
        scaling: softmax scale of the layer.
        is_causal: the layer's causality, if transformers passes it.
        **kwargs: further arguments of the layer (``sliding_window``, ``softcap``, ...);
            any that the sparse path does not support sends the call to dense SDPA.

    Returns:
        ``(B, q_len, Hq, D)`` attention output and None (no attention weights).
    """
    state = layer_state(module)
    reason = (
        dense_reason(module, query, key, value, attention_mask, dropout, is_causal, kwargs)
        if state.sparse
        else "layer not enabled"
    )
    if reason is not None:
        start = time.perf_counter()
        out = ALL_ATTENTION_FUNCTIONS["sdpa"](
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
        if state.collect_stats:
            seconds = time.perf_counter() - start
            record_dense(state.records, module, query, key, reason, seconds)
        return out

    config, stats = state.config, state.collect_stats
    if attention_mask is None:
        result = flex_sample_attention(
            query, key, value, config=config, scale=scaling, return_stats=stats
        )
        out, call_stats = result if stats else (result, None)
        calls = [call_stats]
    else:  # left padding, or a chunk: each row attends over its own real keys only
        out = query.new_zeros((*query.shape[:3], value.shape[-1]))
        offset = key.shape[2] - query.shape[2]  # keys before the first query (a chunk's)
        calls = []
        for b, first in enumerate(_LEFT_PADDING.get(attention_mask).tolist()):
            q_first = max(0, first - offset)  # padded query rows output zeros
            result = flex_sample_attention(
                query[b : b + 1, :, q_first:],
                key[b : b + 1, :, first:],
                value[b : b + 1, :, first:],
                config=config,
                scale=scaling,
                return_stats=stats,
            )
            row, call_stats = result if stats else (result, None)
            out[b : b + 1, :, q_first:] = row
            calls.append(call_stats)
    if stats:
        record_calls(state.records, module, query, key, calls)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``"flexsample"`` in both transformers interfaces (done at import; idempotent)."""
    AttentionInterface.register(NAME, flexsample_attention_forward)
    AttentionMaskInterface.register(NAME, flexsample_mask)
