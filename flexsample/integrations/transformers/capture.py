"""Capture the q/k/v a model's attention layers receive, for studies and benchmarks.

Registers its own attention name (``flexsample_capture``) only while a capture runs: a dense
SDPA forward that keeps a copy of the inputs of the chosen layers.
"""

from __future__ import annotations

import weakref

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .state import attention_modules

CAPTURE_NAME = "flexsample_capture"
_CAPTURES: weakref.WeakKeyDictionary[torch.nn.Module, list] = weakref.WeakKeyDictionary()


def _capture_attention_forward(module, query, key, value, attention_mask, **kwargs):
    store = _CAPTURES.get(module)
    if store is not None and query.shape[2] > 1:
        store.append((query.detach().clone(), key.detach().clone(), value.detach().clone()))
    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)


def capture_attention_inputs(
    model: torch.nn.Module, input_ids: torch.Tensor, layers: list[int] | None = None
) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Run a dense forward pass and return the attention inputs of some layers.

    Useful to study the masks SampleAttention would choose on a real model, or to benchmark
    the operator on real q/k/v.

    Args:
        model: a transformers causal LM.
        input_ids: ``(B, S)`` token ids.
        layers: layer indices to keep (all if None).

    Returns:
        ``{layer: (q, k, v)}`` with q ``(B, Hq, S, D)`` and k, v ``(B, Hkv, S, D)``, after
        rotary embeddings: exactly what the attention function receives.
    """
    AttentionInterface.register(CAPTURE_NAME, _capture_attention_forward)
    AttentionMaskInterface.register(CAPTURE_NAME, sdpa_mask)
    previous = model.config._attn_implementation
    modules = {getattr(m, "layer_idx", -1): m for m in attention_modules(model)}
    wanted = sorted(modules) if layers is None else layers
    missing = [i for i in wanted if i not in modules]
    if missing:
        raise ValueError(f"layers {missing} not in the model (it has {sorted(modules)})")
    for i in wanted:
        _CAPTURES[modules[i]] = []
    model.set_attn_implementation(CAPTURE_NAME)
    try:
        with torch.no_grad():
            # One position's logits: a 262K-token vocabulary over 32K positions would not fit.
            model(input_ids, logits_to_keep=1)
        return {i: _CAPTURES[modules[i]][0] for i in wanted}
    finally:
        model.set_attn_implementation(previous)
        for i in wanted:
            _CAPTURES.pop(modules[i], None)
