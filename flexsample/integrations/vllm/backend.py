"""The vLLM attention backend: the platform's backend, with long prefills run by flexsample.

Three classes subclass the wrapped backend's (``CPU_ATTN`` on CPU, ``FLASH_ATTN`` on CUDA):

* :class:`FlexSampleMetadataBuilder` splits each step's requests. A request goes to
  flexsample when :func:`flexsample.dense_before_sampling` has no objection to its prefill
  (its query tokens against its whole context, per the device's cost model or the
  configured ``min_seq_len``); the wrapped builder builds its usual metadata for the rest,
  from the same batch description restricted to them. A step with nothing for flexsample
  gets the wrapped metadata unchanged: decode steps are vLLM's own, bit for bit.
* :class:`FlexSampleAttentionImpl` computes the wrapped backend's share (only those
  tokens), then each flexsample request: the new tokens' keys and values come from the
  layer's inputs; a chunk after earlier context (chunked prefill, prefix caching) reads its
  whole context back from the paged cache through the block table
  (:mod:`flexsample.integrations.vllm.kv_cache`), samples its own rows against all of it and
  attends sparsely (:func:`flexsample.plan_prefill` with queries shorter than keys).
* :class:`FlexSampleAttentionBackend` names them.

Heads are whatever the layer holds: under tensor parallelism each rank plans its own heads,
and SampleAttention's choices are per head, so nothing crosses ranks.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from vllm.config import get_layers_from_vllm_config
from vllm.logger import init_logger
from vllm.model_executor.layers.attention import Attention
from vllm.platforms import current_platform
from vllm.v1.attention.backend import AttentionType, CommonAttentionMetadata

from flexsample import SampleConfig, dense_before_sampling, plan_prefill, run_plan
from flexsample.presets import config_from_fields

from .kv_cache import Reader, cache_reader

logger = init_logger("vllm.flexsample")

#: Environment variable holding a JSON object of SampleConfig fields.
CONFIG_ENV = "FLEXSAMPLE_VLLM_CONFIG"


def _wrapped_backend() -> type:
    if current_platform.is_cpu():
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        return CPUAttentionBackend
    if current_platform.is_cuda():
        from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend

        return FlashAttentionBackend
    raise RuntimeError(
        "flexsample's vLLM backend wraps CPU_ATTN (CPU) or FLASH_ATTN (CUDA); platform "
        f"{current_platform.device_name!r} has neither: leave --attention-backend unset"
    )


Wrapped = _wrapped_backend()


def load_config() -> SampleConfig:
    """The :class:`~flexsample.SampleConfig` from ``FLEXSAMPLE_VLLM_CONFIG`` (defaults if unset).

    Raises:
        ValueError: the variable is not a JSON object of SampleConfig fields with valid
            values (the message names the variable and the field).
    """
    text = os.environ.get(CONFIG_ENV, "").strip()
    if not text:
        return SampleConfig()
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{CONFIG_ENV} is not JSON ({error}): {text!r}") from None
    if not isinstance(fields, dict):
        raise ValueError(f"{CONFIG_ENV} must be a JSON object of SampleConfig fields: {text!r}")
    try:
        return config_from_fields(fields)
    except ValueError as error:
        raise ValueError(f"{CONFIG_ENV}: {error}") from None


@dataclass
class Totals:
    """Running totals of one process (thread-safe); :func:`~flexsample.integrations.vllm.stats`
    reads them.

    Attributes:
        sparse_requests: prefills (or prefill chunks) that flexsample planned.
        sparse_tokens: their query tokens.
        wrapped_tokens: tokens of the same steps that the wrapped backend computed.
        layer_calls: flexsample attention calls (requests x layers).
        dense_layer_calls: of those, calls whose plan came out dense (too dense to pay).
        density_sum: sum over sparse calls of the mean computed share of causal pairs.
        unread_context_requests: prefill chunks after earlier context left to the wrapped
            backend because flexsample cannot read this cache's layout (logged once).
    """

    sparse_requests: int = 0
    sparse_tokens: int = 0
    wrapped_tokens: int = 0
    layer_calls: int = 0
    dense_layer_calls: int = 0
    density_sum: float = 0.0
    unread_context_requests: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: float) -> None:
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.repr}
        sparse_calls = out["layer_calls"] - out["dense_layer_calls"]
        out["mean_density"] = out["density_sum"] / sparse_calls if sparse_calls else 1.0
        return out


TOTALS = Totals()


@dataclass(frozen=True)
class SparseRequest:
    """One request's prefill tokens that flexsample computes in this step.

    Attributes:
        start, stop: its tokens in the step's flattened batch.
        seq_len: its keys: context plus these tokens.
        block_row: its row of the block table (its cache blocks, read when it has context).
    """

    start: int
    stop: int
    seq_len: int
    block_row: torch.Tensor

    @property
    def context(self) -> int:
        return self.seq_len - (self.stop - self.start)


@dataclass
class StepLog:
    """What flexsample did in one step of one KV cache group, logged once at the next build."""

    requests: tuple[SparseRequest, ...]
    wrapped_tokens: int
    layers: int = 0
    dense_layers: int = 0
    density_sum: float = 0.0
    seconds: float = 0.0

    def line(self) -> str:
        tokens = sum(r.stop - r.start for r in self.requests)
        context = sum(r.context for r in self.requests)
        sparse = self.layers - self.dense_layers
        density = f"{self.density_sum / sparse:.3f}" if sparse else "-"
        return (
            f"flexsample: {len(self.requests)} prefill(s), {tokens} tokens"
            + (f" after {context} context tokens" if context else "")
            + f": {sparse}/{self.layers} layer calls sparse, mean density {density}, "
            f"{self.seconds:.2f} s; {self.wrapped_tokens} tokens to "
            f"{Wrapped.get_name()}"
        )


@dataclass
class FlexSampleMetadata:
    """A step with flexsample requests: theirs, and the wrapped metadata for the rest."""

    num_actual_tokens: int
    requests: tuple[SparseRequest, ...]
    wrapped: object | None  # the wrapped backend's metadata for the other requests
    wrapped_tokens: torch.Tensor | None  # (T_rest,) their token indices
    read_context: Reader | None  # reads a request's context from the paged cache
    config: SampleConfig  # the builder's, which chose the requests: the impl plans with it
    log: StepLog


def restrict(common: CommonAttentionMetadata, reqs: np.ndarray) -> tuple:
    """``common`` restricted to requests ``reqs`` (ascending): ``(metadata, token indices)``."""
    qsl = common.query_start_loc_cpu.numpy()
    starts, stops = qsl[:-1][reqs], qsl[1:][reqs]
    lens = stops - starts
    tokens_np = np.concatenate([np.arange(a, b) for a, b in zip(starts, stops, strict=True)])
    dev = common.query_start_loc.device
    tokens = torch.from_numpy(tokens_np).to(dev)
    idx = torch.from_numpy(reqs).to(dev)
    qsl_cpu = torch.from_numpy(np.concatenate([[0], np.cumsum(lens)])).to(
        common.query_start_loc_cpu.dtype
    )

    def rows(t):
        return None if t is None else t[idx.to(t.device)]

    seq_cpu = common.seq_lens_cpu_upper_bound
    changes = {
        "query_start_loc": qsl_cpu.to(dev, non_blocking=True),
        "query_start_loc_cpu": qsl_cpu,
        "seq_lens": rows(common.seq_lens),
        "num_reqs": len(reqs),
        "num_actual_tokens": int(lens.sum()),
        "max_query_len": int(lens.max()),
        "max_seq_len": int(common.seq_lens.max()) if seq_cpu is None else int(seq_cpu[reqs].max()),
        "block_table_tensor": rows(common.block_table_tensor),
        "slot_mapping": common.slot_mapping[tokens.to(common.slot_mapping.device)],
        "positions": None if common.positions is None else common.positions[tokens],
        "is_prefilling": rows(common.is_prefilling),
        "seq_lens_cpu_upper_bound": None if seq_cpu is None else seq_cpu[reqs],
        "dcp_local_seq_lens": rows(common.dcp_local_seq_lens),
        "dcp_local_seq_lens_cpu_upper_bound": None
        if common.dcp_local_seq_lens_cpu_upper_bound is None
        else common.dcp_local_seq_lens_cpu_upper_bound[reqs],
        "req_idx": None if common.req_idx is None else common.req_idx[reqs],
        "encoder_seq_lens": rows(common.encoder_seq_lens),
        "encoder_seq_lens_cpu": None
        if common.encoder_seq_lens_cpu is None
        else common.encoder_seq_lens_cpu[reqs],
        "rswa_prefix_lens": rows(common.rswa_prefix_lens),
        "replayssm_decode_base_cpu": None
        if common.replayssm_decode_base_cpu is None
        else common.replayssm_decode_base_cpu[reqs],
        "mm_req_doc_ranges": None
        if common.mm_req_doc_ranges is None
        else {
            new: common.mm_req_doc_ranges[int(old)]
            for new, old in enumerate(reqs)
            if int(old) in common.mm_req_doc_ranges
        },
        "logits_indices_padded": None,
        "num_logits_indices": None,
        "max_logits_per_req": None,
        "_num_computed_tokens_cache": None,
        "_token_to_req_indices_cache": None,
    }
    fields = {f.name for f in dataclasses.fields(common)}
    return dataclasses.replace(common, **{k: v for k, v in changes.items() if k in fields}), tokens


#: Fields of CommonAttentionMetadata that do not depend on which requests are in the batch.
BATCH_FREE_FIELDS = {"causal"}
#: Fields :func:`restrict` restricts (every other field must be None for it to be right).
RESTRICTED_FIELDS = {
    "query_start_loc", "query_start_loc_cpu", "seq_lens", "num_reqs", "num_actual_tokens",
    "max_query_len", "max_seq_len", "block_table_tensor", "slot_mapping", "positions",
    "is_prefilling", "seq_lens_cpu_upper_bound", "dcp_local_seq_lens",
    "dcp_local_seq_lens_cpu_upper_bound", "req_idx", "encoder_seq_lens", "encoder_seq_lens_cpu",
    "rswa_prefix_lens", "replayssm_decode_base_cpu", "mm_req_doc_ranges",
    "logits_indices_padded", "num_logits_indices", "max_logits_per_req",
    "_num_computed_tokens_cache", "_token_to_req_indices_cache",
}  # fmt: skip


def unrestrictable_fields(common: CommonAttentionMetadata) -> list[str]:
    """Set fields of ``common`` that :func:`restrict` does not know (a newer vLLM's): a batch
    carrying any cannot be split safely."""
    known = BATCH_FREE_FIELDS | RESTRICTED_FIELDS
    return sorted(
        f.name
        for f in dataclasses.fields(common)
        if f.name not in known and getattr(common, f.name) is not None
    )


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


class FlexSampleMetadataBuilder(Wrapped.get_builder_cls()):
    """The wrapped builder, splitting each step between flexsample and the wrapped backend."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.flex_config = load_config()
        model = vllm_config.model_config
        layers = get_layers_from_vllm_config(vllm_config, Attention, layer_names)
        impls = [layer.impl for layer in layers.values()]
        # flex_* names: the wrapped builder has attributes of its own (num_heads, dtype, ...).
        self.flex_heads = (
            impls[0].num_heads
            if impls
            else model.get_num_attention_heads(vllm_config.parallel_config)
        )
        self.flex_head_size = kv_cache_spec.head_size
        self.flex_kv_heads = getattr(kv_cache_spec, "num_kv_heads", None)
        self.flex_dtype = model.dtype
        self.flex_device = torch.device(device)
        # Every layer of the group must be one flexsample can run: the split is per step.
        reasons = sorted({r for impl in impls if (r := getattr(impl, "unsupported", None))})
        self.reason = "; ".join(reasons) if reasons else None
        if self.reason:
            _warn_once(
                f"flexsample: layers {sorted(layers)[:3]}... run {Wrapped.get_name()} "
                f"unchanged: {self.reason}"
            )
        self.read_cache, why_not = cache_reader(self)
        if why_not:
            _warn_once(
                f"flexsample: prefill chunks after earlier context run "
                f"{Wrapped.get_name()}: {why_not}"
            )
        self._last: StepLog | None = None

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
        if self._last is not None:  # the previous step's summary, once all layers ran
            if self._last.layers:
                logger.info(self._last.line())
            self._last = None
        common = common_attn_metadata
        if self.reason is not None or common.causal is not True:
            return super().build(common_prefix_len, common, fast_build)
        qsl = common.query_start_loc_cpu.numpy()
        query_lens = qsl[1:] - qsl[:-1]
        if query_lens.max(initial=0) <= 1:  # decode only
            return super().build(common_prefix_len, common, fast_build)
        seq_lens = (
            common.seq_lens_cpu_upper_bound
            if common.seq_lens_cpu_upper_bound is not None
            else common.seq_lens.cpu()
        ).numpy()
        candidates = query_lens > 1
        if common.is_prefilling is not None:  # not speculative-decoding rows (several tokens)
            candidates &= common.is_prefilling.cpu().numpy().astype(bool)
        chosen = []
        unread = 0
        for i in np.flatnonzero(candidates):
            S, L = int(seq_lens[i]), int(query_lens[i])
            if L < S and self.read_cache is None:
                unread += 1  # context in a cache layout flexsample cannot read (warned once)
                continue
            reason = dense_before_sampling(
                self.flex_config,
                S,
                L,
                self.flex_heads,
                self.flex_head_size,
                self.flex_device,
                self.flex_dtype,
                self.flex_kv_heads,
            )
            if reason is None:
                chosen.append(int(i))
        if unread:
            TOTALS.add(unread_context_requests=unread)
        if not chosen:
            return super().build(common_prefix_len, common, fast_build)
        requests = tuple(
            SparseRequest(
                start=int(qsl[i]),
                stop=int(qsl[i + 1]),
                seq_len=int(seq_lens[i]),
                block_row=common.block_table_tensor[i],
            )
            for i in chosen
        )
        rest = np.setdiff1d(np.arange(common.num_reqs), chosen)
        wrapped = tokens = None
        if rest.size and (unknown := unrestrictable_fields(common)):
            _warn_once(
                f"flexsample: batch metadata fields {unknown} are unknown to this version of "
                f"the plugin; steps that mix flexsample's requests with others run "
                f"{Wrapped.get_name()} whole"
            )
            return super().build(common_prefix_len, common, fast_build)
        if rest.size:
            sub, tokens = restrict(common, rest)
            wrapped = super().build(0, sub, fast_build)
        log = StepLog(requests=requests, wrapped_tokens=0 if tokens is None else len(tokens))
        TOTALS.add(
            sparse_requests=len(requests),
            sparse_tokens=sum(r.stop - r.start for r in requests),
            wrapped_tokens=log.wrapped_tokens,
        )
        self._last = log
        return FlexSampleMetadata(
            num_actual_tokens=common.num_actual_tokens,
            requests=requests,
            wrapped=wrapped,
            wrapped_tokens=tokens,
            read_context=self.read_cache,
            config=self.flex_config,
            log=log,
        )


def unsupported_reason(arguments: dict) -> str | None:
    """Why flexsample cannot compute a layer built with these impl arguments (None: it can).

    Causal decoder self-attention with none of: a sliding window, ALiBi, logit soft-capping,
    learned sinks, a quantised KV cache, KV shared with another layer.
    """
    problems = []
    attn_type = arguments.get("attn_type") or AttentionType.DECODER
    if attn_type != AttentionType.DECODER:
        problems.append(f"attention type {attn_type} (not causal decoder)")
    if arguments.get("sliding_window") is not None:
        problems.append("sliding-window layers")
    if arguments.get("alibi_slopes") is not None:
        problems.append("ALiBi")
    if arguments.get("logits_soft_cap"):
        problems.append("logit soft-capping")
    if arguments.get("sinks") is not None or arguments.get("kwargs", {}).get("sinks") is not None:
        problems.append("learned attention sinks")
    if arguments.get("kv_cache_dtype") not in ("auto", None):
        problems.append(f"kv_cache_dtype {arguments['kv_cache_dtype']}")
    if arguments.get("kv_sharing_target_layer_name") is not None:
        problems.append("KV sharing across layers")
    return ", ".join(problems) or None


class FlexSampleAttentionImpl(Wrapped.get_impl_cls()):
    """The wrapped implementation; flexsample computes the requests the builder chose."""

    def __init__(self, num_heads, head_size, scale, num_kv_heads, *args, **kwargs) -> None:
        super().__init__(num_heads, head_size, scale, num_kv_heads, *args, **kwargs)
        bound = inspect.signature(super().__init__).bind(
            num_heads, head_size, scale, num_kv_heads, *args, **kwargs
        )
        bound.apply_defaults()
        #: Why flexsample leaves this layer to the wrapped backend (None: it can run it).
        self.unsupported = unsupported_reason(bound.arguments)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        if not isinstance(attn_metadata, FlexSampleMetadata):
            return super().forward(
                layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs
            )
        meta = attn_metadata
        if meta.wrapped is not None:  # the other requests, through the wrapped kernel only
            idx = meta.wrapped_tokens
            rest = output.new_empty((idx.numel(), *output.shape[1:]))
            super().forward(
                layer,
                query[idx],
                key[idx],
                value[idx],
                kv_cache,
                meta.wrapped,
                rest,
                *args,
                **kwargs,
            )
            output[idx] = rest
        started = time.perf_counter()
        for request in meta.requests:
            self._prefill(request, query, key, value, kv_cache, output, meta)
        meta.log.seconds += time.perf_counter() - started
        return output

    def _prefill(self, request, query, key, value, kv_cache, output, meta) -> None:
        a, b = request.start, request.stop
        q = query[a:b].view(b - a, self.num_heads, self.head_size).transpose(0, 1)[None]
        if request.context == 0:
            k, v = key[a:b], value[a:b]
        else:
            k, v = meta.read_context(kv_cache, request.block_row, request.seq_len)
        k = k.view(-1, self.num_kv_heads, self.head_size).transpose(0, 1)[None]
        v = v.view(-1, self.num_kv_heads, self.head_size).transpose(0, 1)[None]
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        plan = plan_prefill(q, k, meta.config, scale=self.scale)
        out = run_plan(plan, q, k, v)
        output[a:b] = out[0].transpose(0, 1).reshape(output[a:b].shape)
        log = meta.log
        log.layers += 1
        if plan.path == "dense":
            log.dense_layers += 1
            TOTALS.add(layer_calls=1, dense_layer_calls=1)
        else:
            density = float(plan.density.mean())
            log.density_sum += density
            TOTALS.add(layer_calls=1, density_sum=density)


class FlexSampleAttentionBackend(Wrapped):
    """``CUSTOM``: the platform's attention backend with flexsample's sparse prefill."""

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls():
        return FlexSampleAttentionImpl

    @staticmethod
    def get_builder_cls():
        return FlexSampleMetadataBuilder
