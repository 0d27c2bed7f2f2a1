"""SampleAttention in Hugging Face transformers, through its attention and mask interfaces.

Importing this module registers the name ``"flexsample"`` in transformers'
``AttentionInterface`` and ``AttentionMaskInterface``, so both of these work::

    import flexsample.integrations.transformers as fst

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="flexsample")
    # or, on a loaded model, with a config of its own and per-layer statistics:
    fst.enable(model, SampleConfig(alpha=0.9))
    model.generate(...)
    print(fst.stats_table(model))
    fst.disable(model)  # back to the attention implementation it had

Routing, per attention call:

* causal prefill with no cache offset (``q_len == kv_len``), no padding: SampleAttention;
* the same with left padding (what ``generate()`` makes of a batch of prompts): SampleAttention
  on each row's unpadded tokens, padded query rows output zeros and no real token sees a
  padded key;
* anything else runs transformers' own SDPA attention with the mask SDPA would get, and is
  counted in the statistics with its reason: decode steps, chunked prefill (cache offset),
  sliding-window layers (Gemma 3's local layers), non-causal attention, dropout, soft-capping,
  attention sinks, unrecognised masks (right padding, packed sequences, custom masks).
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from flexsample import SampleConfig, SampleStats, flex_sample_attention

NAME = "flexsample"


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


@dataclass
class CallRecord:
    """One attention call of one layer.

    Attributes:
        layer: the layer index (``module.layer_idx``), or -1 if the module has none.
        path: ``"sparse"`` or ``"dense"``.
        reason: why the dense path ran (None on the sparse path).
        q_len, kv_len, batch: shapes of the call.
        density: per query head, fraction of causal tiles computed (mean over the batch);
            all ones on the dense path.
        times: seconds per stage (``sample``, ``select``, ``mask``, ``attention``).
        details: the :class:`~flexsample.SampleStats` of each ``flex_sample_attention`` call
            behind this record (one per batch row when rows were left-padded), with the
            selected stripes and sampled scores; empty on the dense path.
    """

    layer: int
    path: str
    reason: str | None
    q_len: int
    kv_len: int
    batch: int
    density: list[float]
    times: dict[str, float]
    details: list[SampleStats] = field(default_factory=list)

    @property
    def mean_density(self) -> float:
        """Density averaged over the query heads."""
        return sum(self.density) / len(self.density)


@dataclass
class LayerState:
    """flexsample's settings and records for one attention module."""

    config: SampleConfig
    collect_stats: bool = True
    records: list[CallRecord] = field(default_factory=list)


def _state(module: torch.nn.Module) -> LayerState:
    state = module.__dict__.get("_flexsample")
    if state is None:  # loaded with attn_implementation="flexsample" and never enable()d
        state = module.__dict__["_flexsample"] = LayerState(SampleConfig())
    return state


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
    """First real token of each row if the mask is causal prefill with left padding only."""
    padding = kwargs.get("attention_mask")
    plain_causal = (
        kwargs.get("mask_function", causal_mask_function) is causal_mask_function
        and kwargs.get("local_size") is None
        and kwargs.get("q_offset", 0) == 0
        and kwargs.get("kv_offset", 0) == 0
        and kwargs.get("q_length") == kwargs.get("kv_length")
    )
    if not plain_causal or padding is None or padding.dim() != 2:
        return None
    valid = padding.bool()
    if valid.shape[-1] != kwargs.get("kv_length"):
        return None
    # Left padding: each row is False...False True...True (never True then False again).
    if bool((valid[:, 1:].int() - valid[:, :-1].int()).lt(0).any()) or not bool(valid[:, -1].all()):
        return None
    return (~valid).sum(dim=-1)


def _dense_reason(module, query, key, attention_mask, dropout, is_causal, kwargs) -> str | None:
    """Why this call cannot run SampleAttention, or None if it can."""
    q_len, kv_len = query.shape[2], key.shape[2]
    if q_len == 1:
        return "decode"
    if q_len != kv_len:
        return "cache offset (chunked prefill)"
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
    state = _state(module)
    reason = _dense_reason(module, query, key, attention_mask, dropout, is_causal, kwargs)
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
            _record(
                state,
                module,
                query,
                key,
                "dense",
                reason,
                None,
                {"attention": time.perf_counter() - start},
            )
        return out

    config, stats = state.config, state.collect_stats
    if attention_mask is None:
        result = flex_sample_attention(
            query, key, value, config=config, scale=scaling, return_stats=stats
        )
        out, call_stats = result if stats else (result, None)
        calls = [call_stats]
    else:  # left padding: each row attends over its own real tokens only
        out = query.new_zeros((*query.shape[:3], value.shape[-1]))
        calls = []
        for b, first in enumerate(_LEFT_PADDING.get(attention_mask).tolist()):
            result = flex_sample_attention(
                query[b : b + 1, :, first:],
                key[b : b + 1, :, first:],
                value[b : b + 1, :, first:],
                config=config,
                scale=scaling,
                return_stats=stats,
            )
            row, call_stats = result if stats else (result, None)
            out[b : b + 1, :, first:] = row
            calls.append(call_stats)
    if stats:
        _record_calls(state, module, query, key, calls)
    return out.transpose(1, 2).contiguous(), None


def _record(state, module, query, key, path, reason, density, times, details=()) -> None:
    heads = query.shape[1]
    state.records.append(
        CallRecord(
            layer=getattr(module, "layer_idx", -1),
            path=path,
            reason=reason,
            q_len=query.shape[2],
            kv_len=key.shape[2],
            batch=query.shape[0],
            density=density if density is not None else [1.0] * heads,
            times=times,
            details=list(details),
        )
    )


def _record_calls(state, module, query, key, calls) -> None:
    """One record for the (possibly per-row) flex_sample_attention calls of one layer call."""
    densities = torch.stack(
        [
            s.density.float().mean(dim=0) if s.density is not None else torch.ones(query.shape[1])
            for s in calls
        ]
    )
    times: dict[str, float] = {}
    for s in calls:
        for stage, seconds in s.times.items():
            times[stage] = times.get(stage, 0.0) + seconds
    paths = {s.path for s in calls}
    path = "sparse" if "sparse" in paths else "dense"
    reasons = sorted({s.reason for s in calls if s.reason})
    _record(
        state,
        module,
        query,
        key,
        path,
        "; ".join(reasons) or None,
        densities.mean(dim=0).tolist(),
        times,
        [s for s in calls if s.path == "sparse"],
    )


def register() -> None:
    """Register ``"flexsample"`` in both transformers interfaces (done at import; idempotent)."""
    AttentionInterface.register(NAME, flexsample_attention_forward)
    AttentionMaskInterface.register(NAME, flexsample_mask)


def _attention_modules(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Modules that transformers passes to attention functions (they carry ``layer_idx``)."""
    for module in model.modules():
        if hasattr(module, "layer_idx") and any(
            isinstance(p, torch.nn.Linear) for p in module.children()
        ):
            yield module


def enable(
    model: torch.nn.Module, config: SampleConfig | None = None, *, collect_stats: bool = True
) -> torch.nn.Module:
    """Switch a loaded transformers model to SampleAttention with its own config.

    Two models in one process can carry different configs. Statistics collect per layer
    (see :func:`layer_stats`) unless ``collect_stats`` is False; collecting times each
    stage and synchronises the device between stages.

    Args:
        model: a ``PreTrainedModel``.
        config: settings for every layer of this model; ``SampleConfig()`` if None.
        collect_stats: record one :class:`CallRecord` per attention call.

    Returns:
        The model (switched in place).

    Raises:
        TypeError: ``model`` is not a transformers model or ``config`` not a SampleConfig.
    """
    if not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"expected a transformers PreTrainedModel, got {type(model).__name__}")
    config = SampleConfig() if config is None else config
    if not isinstance(config, SampleConfig):
        raise TypeError(f"config must be a SampleConfig, got {type(config).__name__}")
    register()
    current = model.config._attn_implementation
    if current != NAME:
        model.__dict__["_flexsample_previous"] = current
    for module in _attention_modules(model):
        module.__dict__["_flexsample"] = LayerState(config, collect_stats=collect_stats)
    model.set_attn_implementation(NAME)
    return model


def disable(model: torch.nn.Module) -> torch.nn.Module:
    """Return a model to the attention implementation it had before :func:`enable`."""
    previous = model.__dict__.pop("_flexsample_previous", "sdpa")
    model.set_attn_implementation(previous)
    for module in _attention_modules(model):
        module.__dict__.pop("_flexsample", None)
    return model


@contextlib.contextmanager
def enabled(model: torch.nn.Module, config: SampleConfig | None = None, **kwargs):
    """``with enabled(model, config): ...`` runs the block with SampleAttention."""
    enable(model, config, **kwargs)
    try:
        yield model
    finally:
        disable(model)


def layer_stats(model: torch.nn.Module) -> list[CallRecord]:
    """Every recorded attention call of the model, in layer order."""
    records = [
        r
        for module in _attention_modules(model)
        if "_flexsample" in module.__dict__
        for r in module.__dict__["_flexsample"].records
    ]
    return sorted(records, key=lambda r: r.layer)


def prefill_density(model: torch.nn.Module) -> float | None:
    """Mean density of the recorded prefill calls (``q_len > 1``), None if there were none.

    Dense fallbacks count with density 1: this is the fraction of attention tiles the
    prefills actually computed.
    """
    prefill = [r.mean_density for r in layer_stats(model) if r.q_len > 1]
    return sum(prefill) / len(prefill) if prefill else None


def reset_stats(model: torch.nn.Module) -> None:
    """Forget the recorded calls (keeps the configs)."""
    for module in _attention_modules(model):
        if "_flexsample" in module.__dict__:
            module.__dict__["_flexsample"].records.clear()


def summarize(model: torch.nn.Module) -> list[dict[str, object]]:
    """Per layer: calls, sparse calls, mean density, time per stage, fallback reasons."""
    rows: dict[int, dict[str, object]] = {}
    for r in layer_stats(model):
        row = rows.setdefault(r.layer, {
            "layer": r.layer, "calls": 0, "sparse": 0, "density": [],
            "sample_s": 0.0, "select_s": 0.0, "mask_s": 0.0, "attention_s": 0.0,
            "fallbacks": {},
        })  # fmt: skip
        row["calls"] += 1
        if r.path == "sparse":
            row["sparse"] += 1
            row["density"].append(r.mean_density)
        else:
            row["fallbacks"][r.reason] = row["fallbacks"].get(r.reason, 0) + 1
        for stage, seconds in r.times.items():
            row[f"{stage}_s"] += seconds
    for row in rows.values():
        dens = row["density"]
        row["density"] = sum(dens) / len(dens) if dens else None
    return [rows[k] for k in sorted(rows)]


def stats_table(model: torch.nn.Module) -> str:
    """:func:`summarize` as a fixed-width text table."""
    header = (
        f"{'layer':>5} {'calls':>5} {'sparse':>6} {'density':>8} {'sample s':>9} "
        f"{'select s':>9} {'mask s':>8} {'attn s':>8}  fallbacks"
    )
    lines = [header, "-" * len(header)]
    for row in summarize(model):
        density = "-" if row["density"] is None else f"{row['density']:.3f}"
        fallbacks = ", ".join(f"{k} x{v}" for k, v in row["fallbacks"].items())
        lines.append(
            f"{row['layer']:>5} {row['calls']:>5} {row['sparse']:>6} {density:>8} "
            f"{row['sample_s']:>9.4f} {row['select_s']:>9.4f} {row['mask_s']:>8.4f} "
            f"{row['attention_s']:>8.4f}  {fallbacks}"
        )
    return "\n".join(lines)


CAPTURE_NAME = "flexsample_capture"


def _capture_attention_forward(module, query, key, value, attention_mask, **kwargs):
    store = module.__dict__.get("_flexsample_capture")
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
    modules = {getattr(m, "layer_idx", -1): m for m in _attention_modules(model)}
    wanted = sorted(modules) if layers is None else layers
    missing = [i for i in wanted if i not in modules]
    if missing:
        raise ValueError(f"layers {missing} not in the model (it has {sorted(modules)})")
    for i in wanted:
        modules[i].__dict__["_flexsample_capture"] = []
    model.set_attn_implementation(CAPTURE_NAME)
    try:
        with torch.no_grad():
            model(input_ids)
        return {i: modules[i].__dict__["_flexsample_capture"][0] for i in wanted}
    finally:
        model.set_attn_implementation(previous)
        for i in wanted:
            modules[i].__dict__.pop("_flexsample_capture", None)


register()
