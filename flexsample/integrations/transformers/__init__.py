"""SampleAttention in Hugging Face transformers, through its attention and mask interfaces.

Importing this package registers the name ``"flexsample"`` in transformers'
``AttentionInterface`` and ``AttentionMaskInterface``, so both of these work::

    import flexsample.integrations.transformers as fst

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="flexsample")
    # or, on a loaded model, with a config of its own and per-layer statistics:
    fst.enable(model, SampleConfig(alpha=0.9))
    model.generate(...)
    print(fst.stats_table(model))
    fst.disable(model)  # back to the attention implementation it had

One module per job, each importing only those before it: :mod:`.state` (per-layer configs
and call records), :mod:`.records` (the per-layer report), :mod:`.routing` (which calls run
sparse, the interface entries), :mod:`.switch` (enable/disable), :mod:`.capture` (q/k/v of
a dense forward, for studies and benchmarks).
"""

from .capture import capture_attention_inputs
from .records import (
    layer_stats,
    mean_prefill_density,
    prefill_density,
    reset_stats,
    stats_report,
    stats_table,
    summarize,
)
from .routing import flexsample_attention_forward, flexsample_mask, register
from .state import NAME, CallRecord, LayerState, attention_modules, layer_state
from .switch import disable, enable, enabled

__all__ = [
    "NAME",
    "CallRecord",
    "LayerState",
    "attention_modules",
    "capture_attention_inputs",
    "disable",
    "enable",
    "enabled",
    "flexsample_attention_forward",
    "flexsample_mask",
    "layer_state",
    "layer_stats",
    "mean_prefill_density",
    "prefill_density",
    "register",
    "reset_stats",
    "stats_report",
    "stats_table",
    "summarize",
]

register()
