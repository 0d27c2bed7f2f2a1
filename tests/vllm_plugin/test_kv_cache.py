"""Reading context back from the paged cache: write with vLLM's own op, read with ours."""

import pytest
import torch

from flexsample.integrations.vllm.kv_cache import CPU_LAYOUT_ISAS, read_cpu_context


@pytest.mark.parametrize("isa", CPU_LAYOUT_ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("seq_len", [1, 70, 96])
def test_cpu_reader_returns_what_the_cache_update_wrote(isa, dtype, seq_len):
    from vllm import _custom_ops as ops

    num_blocks, heads, block, dim = 6, 2, 32, 64
    kv_cache = torch.zeros(num_blocks, heads, block, 2 * dim, dtype=dtype)
    view = kv_cache.view(num_blocks, heads, 2 * block, dim)
    key_cache, value_cache = view.chunk(2, dim=2)  # as CPU_ATTN's forward splits it
    key = torch.randn(seq_len, heads, dim, dtype=dtype)
    value = torch.randn(seq_len, heads, dim, dtype=dtype)
    block_row = torch.tensor([4, 1, 5, 0, 2, 3], dtype=torch.int32)  # out of order
    positions = torch.arange(seq_len)
    slots = block_row[positions // block].long() * block + positions % block
    ops.cpu_attn_reshape_and_cache(
        key,
        value,
        key_cache,
        value_cache,
        slots,
        isa,
        k_scale=1.0,
        v_scale=1.0,
        kv_cache_dtype="auto",
    )
    keys, values = read_cpu_context(kv_cache, block_row, seq_len)
    assert torch.equal(keys, key) and torch.equal(values, value)
