"""The backend's parts without an engine: configuration, the batch split, refusals."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.attention.backends.registry import AttentionBackendEnum

import flexsample.integrations.vllm as plugin
from flexsample import SampleConfig
from flexsample.integrations.vllm import backend


def test_register_makes_custom_flexsample_on_cpu():
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.selector import AttentionSelectorConfig

    plugin.register()
    plugin.register()  # every vLLM process may load plugins more than once
    assert AttentionBackendEnum.CUSTOM.get_path() == plugin.BACKEND
    config = AttentionSelectorConfig(64, torch.bfloat16, "auto", 32)
    chosen = CpuPlatform.get_attn_backend_cls(AttentionBackendEnum.CUSTOM, config)
    assert chosen == plugin.BACKEND
    # Everything else is vLLM's own choice, unchanged.
    assert (
        CpuPlatform.get_attn_backend_cls(None, config) == AttentionBackendEnum.CPU_ATTN.get_path()
    )
    assert issubclass(backend.FlexSampleAttentionBackend, backend.Wrapped)


def test_config_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(backend.CONFIG_ENV, raising=False)
    assert backend.load_config() == SampleConfig()
    monkeypatch.setenv(backend.CONFIG_ENV, '{"alpha": 0.98, "min_seq_len": 4096}')
    assert backend.load_config() == SampleConfig(alpha=0.98, min_seq_len=4096)


@pytest.mark.parametrize(
    "text, words",
    [
        ("{alpha: 0.9}", "is not JSON"),
        ("[0.9]", "must be a JSON object"),
        ('{"alfa": 0.9}', "unknown SampleConfig fields ['alfa']"),
        ('{"alpha": 1.5}', "alpha"),
    ],
)
def test_bad_config_names_the_variable(monkeypatch, text, words):
    monkeypatch.setenv(backend.CONFIG_ENV, text)
    with pytest.raises(ValueError, match="FLEXSAMPLE_VLLM_CONFIG") as error:
        backend.load_config()
    assert words in str(error.value)


def _batch() -> CommonAttentionMetadata:
    """Four requests: decode (1 token), a chunk of 5 after 7, a prefill of 6, decode."""
    query_lens = np.array([1, 5, 6, 1])
    seq_lens = torch.tensor([9, 12, 6, 20], dtype=torch.int32)
    qsl = torch.from_numpy(np.concatenate([[0], np.cumsum(query_lens)])).to(torch.int32)
    tokens = int(query_lens.sum())
    return CommonAttentionMetadata(
        query_start_loc=qsl,
        query_start_loc_cpu=qsl.clone(),
        seq_lens=seq_lens,
        num_reqs=4,
        num_actual_tokens=tokens,
        max_query_len=6,
        max_seq_len=20,
        block_table_tensor=torch.arange(16, dtype=torch.int32).view(4, 4),
        slot_mapping=torch.arange(100, 100 + tokens),
        positions=torch.arange(tokens) * 10,
        seq_lens_cpu_upper_bound=seq_lens.clone(),
    )


def test_restrict_keeps_the_chosen_requests_only():
    common = _batch()
    sub, tokens = backend.restrict(common, np.array([0, 3]))
    assert tokens.tolist() == [0, 12]
    assert sub.num_reqs == 2 and sub.num_actual_tokens == 2 and sub.max_query_len == 1
    assert sub.query_start_loc_cpu.tolist() == [0, 1, 2]
    assert sub.seq_lens.tolist() == [9, 20] and sub.max_seq_len == 20
    assert sub.block_table_tensor.tolist() == [[0, 1, 2, 3], [12, 13, 14, 15]]
    assert sub.slot_mapping.tolist() == [100, 112] and sub.positions.tolist() == [0, 120]
    sub, tokens = backend.restrict(common, np.array([1, 2]))
    assert tokens.tolist() == list(range(1, 12)) and sub.query_start_loc_cpu.tolist() == [0, 5, 11]


def test_every_field_of_this_vllms_batch_metadata_is_known():
    # A field restrict() does not know would be passed through unrestricted: the builder
    # refuses to split batches that set one (a newer vLLM's), this vLLM has none.
    known = backend.BATCH_FREE_FIELDS | backend.RESTRICTED_FIELDS
    assert {f.name for f in dataclasses.fields(CommonAttentionMetadata)} == known
    common = _batch()
    assert backend.unrestrictable_fields(common) == []


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"sliding_window": 512}, "sliding-window"),
        ({"logits_soft_cap": 30.0}, "soft-capping"),
        ({"kv_cache_dtype": "fp8"}, "kv_cache_dtype fp8"),
        ({"attn_type": "encoder_only"}, "not causal decoder"),
    ],
)
def test_layers_flexsample_cannot_run_say_why(changes, words):
    arguments = {
        "alibi_slopes": None,
        "sliding_window": None,
        "kv_cache_dtype": "auto",
        "logits_soft_cap": None,
        "attn_type": "decoder",
    }
    assert backend.unsupported_reason(arguments) is None
    assert words in backend.unsupported_reason(arguments | changes)
