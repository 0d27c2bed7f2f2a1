"""The kernels a sparse call can run on, and what each can do.

``"triton"`` is FlexAttention's own kernel (Triton on CUDA, inductor's C++ template on CPU),
compiled once for every length. ``"flash"`` is its FlashAttention-4 backend (CuTe DSL
kernels: CUDA compute capability 9.0 and later, fp16 and bf16, ``pip install
"flexsample[flash]"``), compiled per static shape, and fast enough to run dense prompts too.
``"gather"`` (CPU) needs no ``BlockMask``: the pattern runs as dense products over the keys
each head reads (:meth:`~flexsample.patterns.Pattern.attend`), on the fused CPU attention
kernel SDPA uses, which on the CPU costs less per computed pair than FlexAttention's
(``docs/tuning.md``). Code asks a :class:`KernelBackend` what it can do; it does not branch
on names.
"""

from __future__ import annotations

import functools
import importlib
import logging
from dataclasses import dataclass, field
from typing import Literal

import torch

logger = logging.getLogger("flexsample")

#: The names of the backends, as ``SampleConfig.backend``, plans and statistics give them.
Backend = Literal["triton", "flash", "gather"]


@dataclass(frozen=True)
class KernelBackend:
    """One backend of the sparse call and its capabilities.

    Attributes:
        name: ``"triton"``, ``"flash"`` or ``"gather"``.
        block_mask: runs FlexAttention over the pattern's ``BlockMask`` (planning compiles
            one); False: the pattern's own products (:meth:`Pattern.attend`).
        static_shapes: compiled per static shape: calls are padded to
            :func:`~flexsample.bucket_length` so that lengths share compilations, and the
            ``mask_mod`` holds its numbers as Python constants.
        kernel_options: FlexAttention's ``kernel_options`` that select it.
        dense_prompts: the dense path may run a whole prompt through it, where the cost
            model measured that faster than SDPA.
        fallback: the backend a call runs on where this one fails to compile it.
    """

    name: Backend
    block_mask: bool = True
    static_shapes: bool = False
    kernel_options: dict[str, object] = field(default_factory=dict, hash=False)
    dense_prompts: bool = False
    fallback: Backend | None = None

    def unavailable(self, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
        """Why this backend cannot run such a call here (None: it can)."""
        if self.name == "flash":
            return flash_unavailable(device, dtype, head_dim)
        if self.name == "gather" and device.type != "cpu":
            return f"runs on the CPU only, got {device.type}"
        return None

    def __str__(self) -> str:
        return self.name


TRITON = KernelBackend("triton")
FLASH = KernelBackend(
    "flash",
    static_shapes=True,
    kernel_options={"BACKEND": "FLASH"},
    dense_prompts=True,
    fallback="triton",
)
GATHER = KernelBackend("gather", block_mask=False)
_BACKENDS = {b.name: b for b in (TRITON, FLASH, GATHER)}
#: What ``"auto"`` tries, first the one it prefers: FlashAttention-4 where it runs (CUDA),
#: the gathered products on the CPU, else FlexAttention's Triton kernel.
_AUTO_ORDER = (FLASH, GATHER, TRITON)


def kernel_backend(name: str) -> KernelBackend:
    """The backend of this name."""
    try:
        return _BACKENDS[name]
    except KeyError:
        known = list(_BACKENDS)
        raise ValueError(f"unknown backend {name!r}: one of {known}") from None


def resolve_backend(
    requested: str, device: torch.device, dtype: torch.dtype, head_dim: int
) -> Backend:
    """The backend a sparse call runs: ``"auto"`` picks the first of ``"flash"``,
    ``"gather"``, ``"triton"`` that can run here (on CUDA the reason FlashAttention-4
    cannot is logged once).

    Raises:
        ValueError: a backend requested where it cannot run (the message says why).
    """
    if requested != "auto":
        reason = kernel_backend(requested).unavailable(device, dtype, head_dim)
        if reason is not None:
            raise ValueError(f"SampleConfig.backend={requested!r} cannot run here: {reason}")
        return requested  # type: ignore[return-value]
    for candidate in _AUTO_ORDER:
        reason = candidate.unavailable(device, dtype, head_dim)
        if reason is None:
            return candidate.name
        if device.type == "cuda" and candidate is FLASH and reason not in _logged_reasons:
            _logged_reasons.add(reason)
            logger.info("flexsample: not FlexAttention's %s backend (%s)", candidate, reason)
    return TRITON.name


_logged_reasons: set[str] = set()


def mark_failed(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int, error: str):
    """Remember that a call of ``backend`` failed here: ``"auto"`` plans such calls on
    another backend from then on (:meth:`KernelBackend.unavailable` says why)."""
    if backend == FLASH.name:
        _FLASH_FAILED[(device.index, dtype, head_dim)] = error


#: Head dims FlashAttention-4's forward kernels are built for.
_FLASH_HEAD_DIMS = (64, 96, 128, 192, 256)


@functools.cache
def _flash_import_error() -> str | None:
    try:
        importlib.import_module("flash_attn.cute")
    except Exception as error:  # ImportError, or a broken CUDA/CuTe install underneath
        return f"flash_attn.cute does not import ({type(error).__name__}: {error})"
    return None


def flash_unavailable(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why FlexAttention's FlashAttention-4 backend cannot run this call (None: it can).

    It needs CUDA compute capability 9.0 or later, fp16 or bf16, a head dim FlashAttention-4
    is built for, and ``flash_attn.cute`` (``pip install "flexsample[flash]"``).
    """
    if device.type != "cuda":
        return f"needs a CUDA device, got {device.type}"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"needs float16 or bfloat16, got {dtype}"
    if head_dim not in _FLASH_HEAD_DIMS:
        return f"head_dim {head_dim} is not one of {_FLASH_HEAD_DIMS}"
    major, minor = _capability(device.index)
    if major < 9:
        return f"needs compute capability 9.0 or later, got {major}.{minor}"
    return _flash_import_error() or _FLASH_FAILED.get((device.index, dtype, head_dim))


#: (device index, dtype, head dim) where a FlashAttention-4 call failed, and its error.
_FLASH_FAILED: dict[tuple[int | None, torch.dtype, int], str] = {}


@functools.cache
def _capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)
