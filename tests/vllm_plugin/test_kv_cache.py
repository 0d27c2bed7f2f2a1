"""Reading context back from the paged cache.

Each reader is held to what vLLM's own cache-update op writes, on every CPU attention ISA
this machine runs. vLLM's op for the other ISAs (``amx`` needs AMX tiles) cannot run here:
for those the readers are held to transcriptions of vLLM's writers
(``csrc/cpu/cpu_attn_{vec,amx}.hpp``, ``reshape_and_cache``), and the transcriptions to vLLM's
op wherever it runs.
"""

from __future__ import annotations

import pytest
import torch

from flexsample.integrations.vllm.kv_cache import (
    CPU_LAYOUTS,
    EXPECTED_CPU_LAYOUT,
    read_cpu_amx_context,
    read_cpu_vec_context,
    verified_cpu_layout,
    write_cpu_cache,
)

X86_ISAS = ("vec", "vec16", "amx")


def write_vec_like_vllm(key, value, kv_cache, slots, isa="vec"):
    """vLLM's ``vec`` writer, element by element: per block and head, key element ``d`` of
    token ``o`` at ``d * block + o``, value element ``d`` at ``o * D + d``."""
    nb, H, bs, two_d = kv_cache.shape
    D = two_d // 2
    region = kv_cache.view(nb, H, 2, bs * D)
    for t, slot in enumerate(slots.tolist()):
        block, o = divmod(slot, bs)
        for h in range(H):
            for d in range(D):
                region[block, h, 0, d * bs + o] = key[t, h, d]
                region[block, h, 1, o * D + d] = value[t, h, d]


def write_amx_like_vllm(key, value, kv_cache, slots, isa="amx"):
    """vLLM's ``amx`` writer, element by element (``p = 4 / itemsize`` elements per 4-byte
    word). Keys: token ``o`` of 16-token group ``g``, word ``j``: word ``g*16*(D/p) + j*16 +
    o``. Values: dims in slices of 16 (``i``), tokens in pairs of ``p`` (``s``, ``so``):
    element ``i*block*16 + s*p*16 + j*p + so`` for dim ``16 i + j``."""
    nb, H, bs, two_d = kv_cache.shape
    D = two_d // 2
    p = 4 // kv_cache.element_size()
    region = kv_cache.view(nb, H, 2, bs * D)
    for t, slot in enumerate(slots.tolist()):
        block, off = divmod(slot, bs)
        g, o = divmod(off, 16)
        s, so = divmod(off, p)
        for h in range(H):
            keys, values = region[block, h, 0], region[block, h, 1]
            for j in range(D // p):
                for e in range(p):
                    keys[(g * 16 * (D // p) + j * 16 + o) * p + e] = key[t, h, j * p + e]
            for i in range(D // 16):
                for j in range(16):
                    values[i * bs * 16 + s * p * 16 + j * p + so] = value[t, h, 16 * i + j]


TRANSCRIPTIONS = {"vec": write_vec_like_vllm, "vec16": write_vec_like_vllm}
TRANSCRIPTIONS["amx"] = write_amx_like_vllm


def _vllm_runs(isa: str, dtype: torch.dtype) -> bool:
    _, why = verified_cpu_layout(isa, dtype, 32, 64)
    return why is None or "failed here" not in why


def _case(dtype, seq_len, heads=2, dim=64, block=32, blocks=6):
    generator = torch.Generator().manual_seed(seq_len)
    key = torch.randn(seq_len, heads, dim, generator=generator).to(dtype)
    value = torch.randn(seq_len, heads, dim, generator=generator).to(dtype)
    block_row = torch.tensor([4, 1, 5, 0, 2, 3], dtype=torch.int32)[:blocks]  # out of order
    positions = torch.arange(seq_len)
    slots = block_row[positions // block].long() * block + positions % block
    kv_cache = torch.zeros(blocks, heads, block, 2 * dim, dtype=dtype)
    return key, value, block_row, slots, kv_cache


DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


@pytest.mark.parametrize("isa", X86_ISAS)
@DTYPES
@pytest.mark.parametrize("seq_len", [1, 70, 96])
def test_reader_returns_what_vllms_cache_update_wrote(isa, dtype, seq_len):
    if not _vllm_runs(isa, dtype):
        pytest.skip(f"vLLM's {isa} cache update does not run on this CPU")
    layout, why = verified_cpu_layout(isa, dtype, 32, 64)
    assert layout == EXPECTED_CPU_LAYOUT[isa], why
    key, value, block_row, slots, kv_cache = _case(dtype, seq_len)
    write_cpu_cache(key, value, kv_cache, slots, isa)
    keys, values = CPU_LAYOUTS[layout](kv_cache, block_row, seq_len)
    assert torch.equal(keys, key) and torch.equal(values, value)


@pytest.mark.parametrize("isa", X86_ISAS)
@DTYPES
def test_transcribed_writers_write_what_vllm_writes(isa, dtype):
    if not _vllm_runs(isa, dtype):
        pytest.skip(f"vLLM's {isa} cache update does not run on this CPU")
    key, value, _, slots, ours = _case(dtype, 70)
    theirs = ours.clone()
    TRANSCRIPTIONS[isa](key, value, ours, slots)
    write_cpu_cache(key, value, theirs, slots, isa)
    assert torch.equal(ours, theirs)


def test_some_layout_of_this_machine_runs_vllms_own_op():
    # The tests above must not all skip: vec runs on every x86 CPU vLLM supports.
    assert _vllm_runs("vec", torch.float32)


@pytest.mark.parametrize(
    "dtype, block, dim",
    [(torch.bfloat16, 32, 64), (torch.bfloat16, 64, 128), (torch.float16, 32, 80)],
    ids=["bf16-B32-D64", "bf16-B64-D128", "fp16-B32-D80"],
)
@pytest.mark.parametrize("seq_len", [1, 33, 96])
def test_amx_reader_reads_vllms_amx_layout(dtype, block, dim, seq_len):
    key, value, block_row, slots, kv_cache = _case(dtype, seq_len, dim=dim, block=block, blocks=6)
    write_amx_like_vllm(key, value, kv_cache, slots)
    keys, values = read_cpu_amx_context(kv_cache, block_row, seq_len)
    assert torch.equal(keys, key) and torch.equal(values, value)
    # The vec reader does not read it: the two layouts really differ.
    keys, _ = read_cpu_vec_context(kv_cache, block_row, seq_len)
    assert seq_len == 1 or not torch.equal(keys, key)


def test_the_start_up_check_picks_the_layout_that_reads_back():
    assert verified_cpu_layout("amx", torch.bfloat16, 32, 64, writer=write_amx_like_vllm) == (
        "amx",
        None,
    )
    # An ISA flexsample has no entry for, writing the vec layout: found by trying.
    assert verified_cpu_layout("future", torch.float32, 32, 64, writer=write_vec_like_vllm) == (
        "vec",
        None,
    )


def test_a_layout_nobody_reads_is_refused_with_the_isa_named():
    def scrambled(key, value, kv_cache, slots, isa):
        write_vec_like_vllm(key, value, kv_cache, slots)
        kv_cache.copy_(kv_cache.flip(-1))

    layout, why = verified_cpu_layout("neon", torch.bfloat16, 32, 64, writer=scrambled)
    assert layout is None
    assert "ISA 'neon'" in why and "none flexsample reads (vec, amx)" in why

    def refuses(*args):
        raise RuntimeError("Unsupported CPU attention configuration")

    layout, why = verified_cpu_layout("amx", torch.bfloat16, 32, 64, writer=refuses)
    assert layout is None and "failed here: Unsupported CPU attention" in why
