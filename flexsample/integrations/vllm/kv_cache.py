"""Reading a request's earlier keys and values back from vLLM's paged KV cache.

A prefill chunk after earlier context (chunked prefill, prefix caching) attends to keys that
only the paged cache holds. Each platform backend lays its cache out its own way; a reader
returns the first ``seq_len`` keys and values of one request, ``(seq_len, Hkv, D)`` each, from
the request's row of the block table. ``tests/vllm_plugin/test_kv_cache.py`` writes with vLLM's own
cache-update op and reads back with these.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from vllm.platforms import current_platform

Reader = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]

#: CPU attention ISAs whose cache layout :func:`read_cpu_context` reads (checked in tests).
CPU_LAYOUT_ISAS = ("vec", "vec16")


def read_cpu_context(
    kv_cache: torch.Tensor, block_row: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``CPU_ATTN``'s cache (``vec`` kernels): ``(num_blocks, Hkv, block, 2 D)``.

    Per block and head, the block's keys are stored transposed, ``(D, block)``, followed by
    its values, ``(block, D)``.
    """
    nb, H, bs, two_d = kv_cache.shape
    D = two_d // 2
    n = -(-seq_len // bs)
    blocks = block_row[:n].to(device=kv_cache.device, dtype=torch.long)
    kv = kv_cache.view(nb, H, 2, bs * D)[blocks]  # (n, H, 2, bs * D), a copy
    keys = kv[:, :, 0].view(n, H, D, bs).permute(0, 3, 1, 2).reshape(n * bs, H, D)
    values = kv[:, :, 1].view(n, H, bs, D).transpose(1, 2).reshape(n * bs, H, D)
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


def cache_reader(builder: object) -> tuple[Reader | None, str | None]:
    """The reader for the wrapped backend's cache, or ``(None, why not)``."""
    if current_platform.is_cpu():
        isa = getattr(builder, "isa", None)
        if isa in CPU_LAYOUT_ISAS:
            return read_cpu_context, None
        return None, (
            f"the CPU attention cache layout of ISA {isa!r} is not one flexsample reads "
            f"({', '.join(CPU_LAYOUT_ISAS)})"
        )
    return read_flash_context, None
