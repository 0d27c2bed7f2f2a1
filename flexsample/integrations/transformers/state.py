"""Which models and layers run SampleAttention, with which config: per-module state.

State lives in weak dictionaries keyed by the modules themselves, not in their ``__dict__``:
enabling flexsample leaves the model's objects untouched, and the state goes with them.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from flexsample import SampleConfig

if TYPE_CHECKING:
    from .records import CallRecord

#: The attention implementation name registered with transformers.
NAME = "flexsample"


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


def enable(
    model: torch.nn.Module,
    config: SampleConfig | None = None,
    *,
    collect_stats: bool = True,
    layers: Iterable[int] | None = None,
) -> torch.nn.Module:
    """Switch a loaded transformers model to SampleAttention with its own config.

    Two models in one process can carry different configs. Statistics collect per layer
    (see :func:`~flexsample.integrations.transformers.layer_stats`) unless
    ``collect_stats`` is False; collecting times each stage and synchronises the device
    between stages.

    Args:
        model: a ``PreTrainedModel``.
        config: settings for every layer of this model; ``SampleConfig()`` if None.
        collect_stats: record one call record per attention call.
        layers: the layer indices (``module.layer_idx``) that run SampleAttention; the
            others run SDPA, recorded as dense with the reason "layer not enabled". None:
            every layer.

    Returns:
        The model (switched in place).

    Raises:
        TypeError: ``model`` is not a transformers model or ``config`` not a SampleConfig.
        ValueError: ``layers`` names a layer the model does not have.
    """
    from .routing import register

    if not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"expected a transformers PreTrainedModel, got {type(model).__name__}")
    config = SampleConfig() if config is None else config
    if not isinstance(config, SampleConfig):
        raise TypeError(f"config must be a SampleConfig, got {type(config).__name__}")
    modules = list(attention_modules(model))
    chosen = None if layers is None else set(layers)
    if chosen is not None and chosen - {m.layer_idx for m in modules}:
        known = sorted(m.layer_idx for m in modules)
        raise ValueError(f"layers {sorted(chosen)} not all among the model's {known}")
    register()
    current = model.config._attn_implementation
    if current != NAME:
        _PREVIOUS[model] = current
    for module in modules:
        sparse = chosen is None or module.layer_idx in chosen
        _LAYERS[module] = LayerState(config, collect_stats=collect_stats, sparse=sparse)
        _DISABLED.pop(module, None)
    model.set_attn_implementation(NAME)
    return model


def disable(model: torch.nn.Module) -> torch.nn.Module:
    """Return a model to the attention implementation it had before :func:`enable`.

    The calls recorded so far stay readable (``stats_table`` says they are the last run's)
    until :func:`enable` or :func:`~flexsample.integrations.transformers.reset_stats`.
    """
    model.set_attn_implementation(_PREVIOUS.pop(model, "sdpa"))
    for module in attention_modules(model):
        state = _LAYERS.pop(module, None)
        if state is not None:
            _DISABLED[module] = state
    return model


@contextlib.contextmanager
def enabled(model: torch.nn.Module, config: SampleConfig | None = None, **kwargs):
    """``with enabled(model, config): ...`` runs the block with SampleAttention."""
    enable(model, config, **kwargs)
    try:
        yield model
    finally:
        disable(model)
