"""Reading a request's earlier keys and values back from vLLM's paged KV cache.

A prefill chunk after earlier context (chunked prefill, prefix caching) attends to keys that
only the paged cache holds. Each platform backend lays its cache out its own way; a reader
returns the first ``seq_len`` keys and values of one request, ``(seq_len, Hkv, D)`` each, from
the request's row of the block table.

On CPU the layout depends on the attention ISA vLLM chose for the machine and dtype (``vec``,
``vec16``, ``amx``, ``neon``, ...), and it is vLLM's C++ that writes it. So the layout is not
taken on trust: :func:`cache_reader` writes a small scratch cache with vLLM's own cache-update
op for the ISA, block size, head size and dtype the engine runs, and uses the first known
layout that reads it back exactly; where none does, chunks after earlier context stay with
vLLM's backend (counted and logged by the backend). ``tests/vllm_plugin/test_kv_cache.py``
holds each reader to vLLM's op on every ISA this machine runs, and to a transcription of
vLLM's writer for the others.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Reader = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


def _gather_blocks(
    kv_cache: torch.Tensor, block_row: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The request's cache blocks, ``(n, Hkv, block * D)`` for keys and for values (copies).

    Every CPU layout splits a ``(num_blocks, Hkv, block, 2 D)`` cache the same way (vLLM's
    ``CPUAttentionBackendImpl`` views it as ``(num_blocks, Hkv, 2 block, D)`` and takes the
    two halves): per block and head, ``block * D`` key elements, then ``block * D`` value
    elements; only their order inside differs.
    """
    nb, H, bs, two_d = kv_cache.shape
    n = -(-seq_len // bs)
    blocks = block_row[:n].to(device=kv_cache.device, dtype=torch.long)
    kv = kv_cache.view(nb, H, 2, bs * (two_d // 2))[blocks]  # (n, H, 2, bs * D)
    return kv[:, :, 0], kv[:, :, 1]


def read_cpu_vec_context(
    kv_cache: torch.Tensor, block_row: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``CPU_ATTN``'s ``vec``/``vec16`` layout (also ``neon`` outside bfloat16): per block and
    head the keys transposed, ``(D, block)``, then the values, ``(block, D)``."""
    _, H, bs, two_d = kv_cache.shape
    D = two_d // 2
    keys, values = _gather_blocks(kv_cache, block_row, seq_len)
    n = keys.shape[0]
    keys = keys.view(n, H, D, bs).permute(0, 3, 1, 2).reshape(n * bs, H, D)
    values = values.view(n, H, bs, D).transpose(1, 2).reshape(n * bs, H, D)
    return keys[:seq_len], values[:seq_len]


#: AMX tiles take rows of 64 bytes; the ``amx`` layout packs keys and values for them.
_AMX_ROW_BYTES = 64


def read_cpu_amx_context(
    kv_cache: torch.Tensor, block_row: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``CPU_ATTN``'s ``amx`` layout (bfloat16 on CPUs with AMX tiles), per block and head.

    Keys: groups of ``64 / 4 = 16`` tokens; inside a group, for each 4-byte word of the head
    dimension (``p = 4 / itemsize`` consecutive elements), the 16 tokens' words side by side:
    ``(block / 16, D / p, 16, p)``. Values: 16-element slices of the head dimension; inside
    one, pairs of ``p`` tokens interleaved element by element: ``(D / 16, block / p, 16, p)``.
    """
    _, H, bs, two_d = kv_cache.shape
    D = two_d // 2
    p = 4 // kv_cache.element_size()
    tokens = _AMX_ROW_BYTES // 4  # per key group
    dims = _AMX_ROW_BYTES // 4  # per value group
    if bs % tokens or D % dims or D % p:
        raise ValueError(
            f"the amx cache layout needs block size % {tokens} == 0 and head size % {dims} == 0, "
            f"got block {bs}, head size {D}"
        )
    keys, values = _gather_blocks(kv_cache, block_row, seq_len)
    n = keys.shape[0]
    keys = keys.view(n, H, bs // tokens, D // p, tokens, p)
    keys = keys.permute(0, 2, 4, 1, 3, 5).reshape(n * bs, H, D)
    values = values.view(n, H, D // dims, bs // p, dims, p)
    values = values.permute(0, 3, 5, 1, 2, 4).reshape(n * bs, H, D)
    return keys[:seq_len], values[:seq_len]


def read_flash_context(
    kv_cache: torch.Tensor, block_row: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``FLASH_ATTN``'s cache: ``(num_blocks, Hkv, block, 2 D)``, keys then values per token."""
    _, H, bs, two_d = kv_cache.shape
    D = two_d // 2
    n = -(-seq_len // bs)
    blocks = block_row[:n].to(device=kv_cache.device, dtype=torch.long)
    kv = kv_cache[blocks].transpose(1, 2).reshape(n * bs, H, two_d)[:seq_len]
    return kv[..., :D], kv[..., D:]


#: The CPU cache layouts flexsample reads, by name; for each ISA, the one vLLM's source writes
#: is tried first (:data:`EXPECTED_CPU_LAYOUT`), then the others.
CPU_LAYOUTS: dict[str, Reader] = {"vec": read_cpu_vec_context, "amx": read_cpu_amx_context}
#: The layout each CPU attention ISA of vLLM 0.32 writes, from its ``csrc/cpu/cpu_attn_*.hpp``
#: (``neon`` in bfloat16 may use BFMMLA kernels with a layout of their own: verified at start).
EXPECTED_CPU_LAYOUT = {
    "vec": "vec",
    "vec16": "vec",
    "amx": "amx",
    "neon": "vec",
    "vxe": "vec",
    "vsx": "vec",
    "rvv": "vec",
}


def write_cpu_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slots: torch.Tensor,
    isa: str,
) -> None:
    """Write ``key``/``value`` ``(T, Hkv, D)`` into ``kv_cache`` at ``slots`` ``(T,)`` with
    vLLM's own CPU cache-update op, split as vLLM's CPU backend splits the cache."""
    from vllm import _custom_ops as ops

    nb, H, bs, two_d = kv_cache.shape
    key_cache, value_cache = kv_cache.view(nb, H, 2 * bs, two_d // 2).chunk(2, dim=2)
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


def verified_cpu_layout(
    isa: str,
    dtype: torch.dtype,
    block_size: int,
    head_size: int,
    writer: Callable[..., None] = write_cpu_cache,
) -> tuple[str | None, str | None]:
    """The layout (a key of :data:`CPU_LAYOUTS`) that reads back what ``writer`` wrote for
    ``isa``, or ``(None, why not)``.

    Writes two blocks of one head, ``block_size + 5`` tokens of random keys and values in
    ``dtype``, the second block first in the block table, and reads them back with each
    candidate; a reader must return them exactly.
    """
    generator = torch.Generator().manual_seed(0)
    tokens = block_size + 5
    key = torch.randn(tokens, 1, head_size, generator=generator).to(dtype)
    value = torch.randn(tokens, 1, head_size, generator=generator).to(dtype)
    block_row = torch.tensor([1, 0], dtype=torch.int32)
    positions = torch.arange(tokens)
    slots = block_row[positions // block_size].long() * block_size + positions % block_size
    kv_cache = torch.zeros(2, 1, block_size, 2 * head_size, dtype=dtype)
    try:
        writer(key, value, kv_cache, slots, isa)
    except Exception as error:  # vLLM's op refuses this ISA/shape on this machine
        return None, f"vLLM's cache update for ISA {isa!r} failed here: {error}"
    expected = EXPECTED_CPU_LAYOUT.get(isa)
    order = sorted(CPU_LAYOUTS, key=lambda name: name != expected)
    for name in order:
        try:
            keys, values = CPU_LAYOUTS[name](kv_cache, block_row, tokens)
        except ValueError:  # the layout cannot hold this shape
            continue
        if torch.equal(keys, key) and torch.equal(values, value):
            return name, None
    return None, (
        f"the CPU attention cache layout of ISA {isa!r} ({dtype}, block {block_size}, head "
        f"size {head_size}) is none flexsample reads ({', '.join(CPU_LAYOUTS)})"
    )


def cache_reader(builder: object) -> tuple[Reader | None, str | None]:
    """The reader for the wrapped backend's cache, or ``(None, why not)``.

    ``builder`` is the wrapped backend's metadata builder: on CPU its ``isa``, ``dtype``,
    ``block_size`` and ``head_dim`` say what vLLM's cache update writes.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return read_flash_context, None
    isa = getattr(builder, "isa", None)
    if getattr(builder, "kv_cache_dtype", "auto") not in ("auto", None):
        return None, f"a quantised KV cache ({builder.kv_cache_dtype})"
    layout, why_not = verified_cpu_layout(
        str(isa), builder.dtype, builder.block_size, builder.head_dim
    )
    return (None, why_not) if layout is None else (CPU_LAYOUTS[layout], None)
