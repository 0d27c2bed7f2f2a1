"""Switching a model to SampleAttention and back: :func:`enable`, :func:`disable`,
:func:`enabled`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch

from flexsample import SampleConfig

from .routing import register
from .state import NAME, LayerState, attention_modules, switch_off, switch_on


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
    states = {
        module: LayerState(
            config, collect_stats=collect_stats, sparse=chosen is None or module.layer_idx in chosen
        )
        for module in modules
    }
    switch_on(model, states)
    model.set_attn_implementation(NAME)
    return model


def disable(model: torch.nn.Module) -> torch.nn.Module:
    """Return a model to the attention implementation it had before :func:`enable`.

    The calls recorded so far stay readable (``stats_table`` says they are the last run's)
    until :func:`enable` or :func:`~flexsample.integrations.transformers.reset_stats`.
    """
    model.set_attn_implementation(switch_off(model))
    return model


@contextlib.contextmanager
def enabled(model: torch.nn.Module, config: SampleConfig | None = None, **kwargs):
    """``with enabled(model, config): ...`` runs the block with SampleAttention."""
    enable(model, config, **kwargs)
    try:
        yield model
    finally:
        disable(model)
