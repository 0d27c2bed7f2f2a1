"""Which models and layers run SampleAttention, with which config: per-module state.

State lives in weak dictionaries keyed by the modules themselves, not in their ``__dict__``:
enabling flexsample leaves the model's objects untouched, and the state goes with them.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from flexsample import SampleConfig, SampleStats

#: The attention implementation name registered with transformers.
NAME = "flexsample"


@dataclass
class CallRecord:
    """One attention call of one layer.

    Attributes:
        layer: the layer index (``module.layer_idx``), or -1 if the module has none.
        path: ``"sparse"`` or ``"dense"``.
        reason: why the dense path ran (None on the sparse path).
        q_len, kv_len, batch: shapes of the call.
        density: per query head, computed share of causal (query, key) pairs (mean over
            the batch); all ones on the dense path.
        times: seconds per stage (``sample``, ``select``, ``mask``, ``attention``) of this
            call; the first call of a shape includes compilation.
        details: the :class:`~flexsample.SampleStats` of each ``flex_sample_attention`` call
            behind this record (one per batch row when rows were left-padded), with the
            windows, columns and sampled scores; empty on the dense path.
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

    @property
    def is_prefill(self) -> bool:
        """More than one query token: a prefill (or a prefill chunk), not a decode step."""
        return self.q_len > 1


@dataclass
class LayerState:
    """flexsample's settings and records for one attention module.

    Attributes:
        config: the SampleConfig this layer runs with.
        collect_stats: record one :class:`~flexsample.integrations.transformers.CallRecord`
            per attention call (times each stage, synchronising the device).
        records: the recorded calls.
        sparse: False for a layer left out by :func:`enable`'s ``layers``: it runs SDPA.
    """

    config: SampleConfig
    collect_stats: bool = True
    records: list[CallRecord] = field(default_factory=list)
    sparse: bool = True


_LAYERS: weakref.WeakKeyDictionary[torch.nn.Module, LayerState] = weakref.WeakKeyDictionary()
_PREVIOUS: weakref.WeakKeyDictionary[torch.nn.Module, str] = weakref.WeakKeyDictionary()
#: The states :func:`disable` took off: their records stay readable (the last run's) until
#: the model is enabled again.
_DISABLED: weakref.WeakKeyDictionary[torch.nn.Module, LayerState] = weakref.WeakKeyDictionary()


def layer_state(module: torch.nn.Module) -> LayerState:
    """The state of an attention module (default config if the model was loaded with
    ``attn_implementation="flexsample"`` and never :func:`enable`\\ d)."""
    state = _LAYERS.get(module)
    if state is None:
        state = _LAYERS[module] = LayerState(SampleConfig())
    return state


def known_layer_states(model: torch.nn.Module) -> Iterator[LayerState]:
    """States of the model's attention modules that have one, in module order: the enabled
    ones, else (after :func:`disable`) the ones of its last run."""
    for module in attention_modules(model):
        state = _LAYERS.get(module) or _DISABLED.get(module)
        if state is not None:
            yield state


def is_enabled(model: torch.nn.Module) -> bool:
    """Whether any attention module of the model runs flexsample now."""
    return any(module in _LAYERS for module in attention_modules(model))


def attention_modules(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Modules that transformers passes to attention functions (they carry ``layer_idx``)."""
    for module in model.modules():
        if hasattr(module, "layer_idx") and any(
            isinstance(p, torch.nn.Linear) for p in module.children()
        ):
            yield module


def switch_on(model: torch.nn.Module, states: dict[torch.nn.Module, LayerState]) -> None:
    """Give ``model``'s attention modules these states, remembering the attention
    implementation it runs now (see :func:`switch_off`)."""
    current = model.config._attn_implementation
    if current != NAME:
        _PREVIOUS[model] = current
    for module, state in states.items():
        _LAYERS[module] = state
        _DISABLED.pop(module, None)


def switch_off(model: torch.nn.Module) -> str:
    """Take ``model``'s modules off SampleAttention, keeping their records readable, and
    return the attention implementation it had before :func:`switch_on`."""
    for module in attention_modules(model):
        state = _LAYERS.pop(module, None)
        if state is not None:
            _DISABLED[module] = state
    return _PREVIOUS.pop(model, "sdpa")
