"""The GPU run: Triton sampler and flex_sample_attention on CUDA against SDPA and FlexAttention.

One call does everything and writes ``gpu_<device>.json`` and ``gpu_<device>.md`` into
``--out``:

* correctness: the Triton sampling kernels against the float64 oracle (fp32, bf16, fp16;
  awkward shapes), Triton against the torch sampler at a long length, gathered columns +
  compiled flex against the element-mask oracle on random selections, and
  ``flex_sample_attention`` with a dense-equivalent config against SDPA;
* speed and accuracy, on planted inputs with single-token stripes and on diffuse random
  inputs, for the defaults (the cost model decides dense or sparse), the same selection
  always sparse, 0.2's selection, alpha 0.98, per-head columns and a lower cap on sampled rows:
  each stage, the whole call, the path, density, output error against dense SDPA; SDPA with
  the flash backend, SDPA with cuDNN (expanded K/V, and grouped K/V as they are), dense
  compiled FlexAttention; CUDA-event medians after warm-up; and the counted floor (causal
  FLOPs times density over the measured bf16 matrix rate);
* masks against the per-row oracle (``--frontier``, default 64K and 128K): each
  configuration's density, output error and kept mass beside the oracle's at several
  alphas, in float64 on 256 query rows spread over the sequence;
* optionally (``--profile-plan S``) a torch.profiler table of the default planning.

``--dry-run`` runs the same code on CPU at small sizes (torch sampler, wall clock), to check
the script without a GPU.

    python bench/gpu_run.py --out results/            # on a CUDA machine
    python bench/gpu_run.py --dry-run --out /tmp/x    # anywhere
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import flexsample as fs
from flexsample import graphs
from flexsample.backends import resolve_backend
from flexsample.costs import cost_model
from flexsample.masks import bucketed_shape, pad_sequence
from flexsample.presets import preset
from flexsample.probe import probe_density
from flexsample.provenance import code_commit
from flexsample.sampling import run_sampler, sampled_row_probabilities
from flexsample.synthetic import planted_case, planted_qkv
from flexsample.testing import random_qkv, random_selection, rel_max, rel_rmse
from flexsample.timing import interleaved_medians


def timer(device: torch.device, warmup: int = 2, reps: int = 5, min_total_s: float = 0.2):
    """Median milliseconds of ``fn()``: CUDA events on GPU, perf_counter on CPU."""

    def measure(fn) -> float:
        for _ in range(warmup):
            fn()
        samples: list[float] = []
        spent = 0.0
        while len(samples) < reps or (spent < min_total_s and len(samples) < 50):
            if device.type == "cuda":
                start, end = (
                    torch.cuda.Event(enable_timing=True),
                    torch.cuda.Event(enable_timing=True),
                )
                start.record()
                fn()
                end.record()
                end.synchronize()
                ms = start.elapsed_time(end)
            else:
                t0 = time.perf_counter()
                fn()
                ms = (time.perf_counter() - t0) * 1e3
            samples.append(ms)
            spent += ms / 1e3
        return statistics.median(samples)

    return measure


# ---------------------------------------------------------------------------------------------
# correctness: each check computes one Check; check_correctness composes them


@dataclass
class Check:
    """One correctness check: an error against a reference, and the bound it must meet."""

    check: str
    dtype: str
    shape: str
    error: float
    metric: str
    bound: float

    @property
    def ok(self) -> bool:
        return self.error <= self.bound

    def row(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def check_sampler_vs_oracle(shape, dtype, device, sampler: str) -> Check:
    """The stage-1 sampler against the float64 oracle on random inputs."""
    B, Hq, Hkv, S, D, bs = shape
    cfg = fs.SampleConfig(block_size=bs, num_segments=5, sample_ratio=0.1)
    layout = fs.SampleLayout.create(S, cfg)
    q, k, _ = random_qkv(B, Hq, Hkv, S, D, dtype, device)
    ref = fs.sample_column_scores_reference(q, k, layout, D**-0.5)
    got = fs.sample_column_scores(q, k, cfg.replace(sampler=sampler), scale=D**-0.5)
    return Check(
        f"{sampler} sampler vs float64 oracle",
        str(dtype),
        f"B{B} H{Hq}/{Hkv} S{S} D{D} bs{bs}",
        rel_max(got, ref),
        "rel max",
        1e-4,
    )


def check_sampler_vs_torch(S: int, device, sampler: str) -> Check:
    """At a long length: the sampler against the chunked torch path (both exact float32)."""
    q, k, _, cfg = planted_case(0.1, 1, 32, 8, S, 128, dtype=torch.bfloat16, device=device, seed=1)
    layout = fs.SampleLayout.create(S, cfg)
    got = fs.sample_column_scores(q, k, cfg.replace(sampler=sampler), scale=128**-0.5)
    ref = fs.sample_column_scores_torch(q, k, layout, 128**-0.5)
    shape = f"B1 H32/8 S{S} D128 bs128"
    return Check(
        f"{sampler} sampler vs torch sampler", "torch.bfloat16", shape, rel_max(got, ref),
        "rel max", 1e-4,
    )  # fmt: skip


def check_row_kept_mass(shape, dtype, device, sampler: str, sparse: bool = False) -> Check:
    """Each sampled row's kept mass as the cover measures it (Triton row kernel on CUDA:
    over the missed keys, or with ``sparse`` over the kept ones) against float64 on random
    inputs, windows and columns."""
    B, Hq, Hkv, S, D, bs = shape
    cfg = fs.SampleConfig(block_size=bs, num_segments=5, sample_ratio=0.1).replace(sink_blocks=1)
    layout = fs.SampleLayout.create(S, cfg)
    q, k, _ = random_qkv(B, Hq, Hkv, S, D, dtype, device)
    gen = torch.Generator(device=device).manual_seed(3)
    windows = torch.randint(0, layout.num_blocks + 1, (B, Hq), device=device, generator=gen)
    # Each query head its own columns.
    columns = torch.rand(B, Hq, S, device=device, generator=gen) < 0.2
    rows = layout.sampled_rows(device).flatten()
    p = sampled_row_probabilities(q, k, layout, D**-0.5)
    ref = (p * fs.WindowColumns(windows, columns, layout).keep(rows)).sum(dim=-1)
    if sampler == "triton":
        from flexsample.sampling import triton_kernel

        args = (q, k, layout, D**-0.5, windows, columns)
        if sparse:
            got = triton_kernel.row_kept_mass_sparse_triton(*args).flatten(2)
        else:
            got = triton_kernel.row_kept_mass_triton(*args)[0].flatten(2)
    else:  # the torch cover measures every row; alpha 0 repairs none
        sel = fs.WindowColumns(windows, columns, layout)
        got = fs.cover_rows(q, k, sel, 1e-9, D**-0.5, "torch").row_mass.flatten(2)
    name = f"{sampler} row kept mass{' (kept keys)' if sparse and sampler == 'triton' else ''}"
    return Check(
        f"{name} vs float64", str(dtype), f"B{B} H{Hq}/{Hkv} S{S} D{D} bs{bs}",
        float((got.double() - ref).abs().max()), "max abs", 1e-4,
    )  # fmt: skip


def check_row_cover(S: int, device, sampler: str) -> Check:
    """At a long length: the per-row cover measured by ``sampler`` against the torch one:
    the largest difference in each sampled row's reported kept mass."""
    q, k, _, cfg = planted_case(0.1, 1, 32, 8, S, 128, dtype=torch.bfloat16, device=device, seed=2)
    layout = fs.SampleLayout.create(S, cfg)
    scores = fs.sample_column_scores_torch(q, k, layout, 128**-0.5)
    sel = fs.select_columns(scores, layout, cfg.alpha)
    got = fs.cover_rows(q, k, sel, cfg.alpha, 128**-0.5, sampler)
    ref = fs.cover_rows(q, k, sel, cfg.alpha, 128**-0.5, "torch")
    error = float((got.row_mass - ref.row_mass).abs().max())
    return Check(
        f"{sampler} row cover vs torch row cover", "torch.bfloat16", f"B1 H32/8 S{S} D128",
        error, "max abs kept mass", 1e-4,
    )  # fmt: skip


def check_probe(S: int, device, inputs: str) -> Check:
    """At a long length: the Triton probe's estimate (histogram) against the torch probe's
    (sorted rows), per head, on planted stripes or random q/k (where the verdict says
    dense)."""
    q, k, _ = make_inputs(inputs, 32, 8, S, 128, torch.bfloat16, device)
    layout = fs.SampleLayout.create(S, fs.SampleConfig())
    ref = probe_density(q, k, layout, 0.95, 128**-0.5)
    got = probe_density(q, k, layout, 0.95, 128**-0.5, triton=True)
    return Check(
        f"triton probe vs torch probe ({inputs})", "torch.bfloat16", f"B1 H32/8 S{S} D128",
        float((got - ref).abs().max()), "max abs density", 0.01,
    )  # fmt: skip


def check_graph_replay(S: int, device) -> Check:
    """Selection replayed from CUDA graphs (:mod:`flexsample.graphs`) against the eager search
    on the same scores: the windows and columns of planted and random inputs, each selected
    twice in turn (the second input's first call captures, the next two replay, one of them
    on scores it was not captured on). The count of differing windows and columns."""
    cfg = fs.SampleConfig()
    layout = fs.SampleLayout.create(S, cfg)
    scores = [
        fs.sample_column_scores(*make_inputs(name, 32, 8, S, 128, torch.bfloat16, device)[:2], cfg)
        for name in INPUTS
    ]
    graphs.clear()
    replayed = [fs.select_columns(s, layout, cfg.alpha) for s in scores * 2]
    if graphs.cached_graphs() != 1:
        raise RuntimeError(f"expected one captured graph, found {graphs.cached_graphs()}")
    with graphs.use_graphs(False):
        eager = [fs.select_columns(s, layout, cfg.alpha) for s in scores * 2]
    differ = sum(
        int((a.window_blocks != b.window_blocks).sum() + (a.columns != b.columns).sum())
        for a, b in zip(replayed, eager, strict=True)
    )
    return Check(
        "select_columns: CUDA graph replay vs eager", "torch.bfloat16", f"B1 H32/8 S{S} D128",
        differ, "differing windows + columns", 0,
    )  # fmt: skip


def check_sparse_flex(dtype, device, shared: bool = False, backend: str = "triton") -> Check:
    """Gathered columns + compiled FlexAttention against the float64 element-mask oracle, on
    random windows and columns (one slice per query head, or with ``shared`` one per kv head
    holding the group's union, as the defaults plan). ``backend="flash"``: FlashAttention-4,
    on the mask and tensors padded to their buckets, as :func:`flexsample.run_plan` runs it.

    Bound: twice the error of PyTorch's own computation of the same masked attention in
    ``dtype`` (FlashAttention's rule), fp32 included.
    """
    B, Hq, Hkv, S, D, bs = 2, 8, 2, 1000, 128, 128
    q, k, v = random_qkv(B, Hq, Hkv, S, D, dtype, device)
    gen = torch.Generator(device=device).manual_seed(0)
    sel = random_selection(B, Hq, Hkv, S, bs, shared=shared, device=device, generator=gen)
    lay, windows, group = sel.layout, sel.window_blocks, Hq // Hkv
    gathered = sel.gathered(group)
    if backend == "flash":
        rows, keys = bucketed_shape(lay, gathered.positions.shape[-1])
        bm = fs.build_block_mask(windows, gathered, lay, padded=(rows, keys), static=True)
        got = fs.sparse_attention(
            pad_sequence(q, rows), fs.gather_keys(k, gathered, keys),
            fs.gather_keys(v, gathered, keys), bm, D**-0.5, "flash",
        )[:, :, :S]  # fmt: skip
    else:
        bm = fs.build_block_mask(windows, gathered, lay)
        got = fs.sparse_attention(
            q, fs.gather_keys(k, gathered), fs.gather_keys(v, gathered), bm, D**-0.5
        )
    failed = fs.flash_unavailable(device, dtype, D) if backend == "flash" else None
    cols = sel.columns
    ref = fs.sparse_attention_reference(
        q.double(), k.double(), v.double(), fs.WindowColumns(windows, cols, lay), D**-0.5
    )
    allowed = fs.WindowColumns(windows, cols, lay).keep(torch.arange(S, device=device))
    base = F.scaled_dot_product_attention(
        q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), attn_mask=allowed,
        scale=D**-0.5,
    )  # fmt: skip
    return Check(
        f"gathered columns{' (group union)' if shared else ''} + compiled flex "
        f"({backend}{', FAILED: ' + failed if failed else ''}) vs float64 oracle", str(dtype),
        f"B{B} H{Hq}/{Hkv} S{S} D{D} bs{bs}", math.inf if failed else rel_rmse(got, ref),
        "rel rmse", 2 * rel_rmse(base, ref) + 1e-6,
    )  # fmt: skip


def check_dense_equivalent(dtype, S: int, device, backend: str = "auto") -> Check:
    """The whole call with a dense-equivalent config against SDPA."""
    B, Hq, Hkv, D = 1, 32, 8, 128
    q, k, v = random_qkv(B, Hq, Hkv, S, D, dtype, device)
    cfg = fs.SampleConfig.dense_equivalent(backend=backend)
    out, stats = fs.flex_sample_attention(q, k, v, config=cfg, return_stats=True)
    ref = F.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True
    )
    base = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    bound = 1e-4 if dtype == torch.float32 else 2 * rel_rmse(base, ref) + 1e-6
    return Check(
        f"flex_sample_attention(dense-equivalent, {stats.backend}) vs SDPA", str(dtype),
        f"B{B} H{Hq}/{Hkv} S{S} D{D}", rel_rmse(out, ref), "rel rmse", bound,
    )  # fmt: skip


def check_dense_path(dtype, device) -> Check:
    """flexsample's dense path (cuDNN on grouped K/V where it takes them) against float64,
    on an awkward GQA shape, whole prompt and a chunk."""
    B, Hq, Hkv, S, D = 2, 8, 2, 3001, 128
    q, k, v = random_qkv(B, Hq, Hkv, S, D, dtype, device)
    group = Hq // Hkv
    kk, vv = (t.double().repeat_interleave(group, 1) for t in (k, v))
    errors, bounds = [], []
    for L in (S, 1234):
        qq = q[:, :, S - L :]
        allowed = torch.ones(L, S, dtype=torch.bool, device=device).tril(S - L)
        got = fs.dense_causal_attention(qq, k, v, D**-0.5)
        logits = (qq.double() @ kk.transpose(-1, -2)) * D**-0.5
        ref = logits.masked_fill(~allowed, float("-inf")).softmax(-1) @ vv
        base = F.scaled_dot_product_attention(
            qq.float(), k.float(), v.float(), scale=D**-0.5, enable_gqa=True, attn_mask=allowed
        )
        errors.append(rel_rmse(got, ref))
        # the float32 computation's own error and the output's rounding to dtype, twice
        bounds.append(2 * rel_rmse(base.to(dtype), ref) + 1e-5)
    worst = max(range(2), key=lambda i: errors[i] / bounds[i])
    return Check(
        "dense path vs float64 (whole prompt; chunk L1234)", str(dtype),
        f"B{B} H{Hq}/{Hkv} S{S} D{D}", errors[worst], "rel rmse", bounds[worst],
    )  # fmt: skip


def check_flex_dense(dtype, device, backend: str) -> Check:
    """The dense call through FlexAttention (every causal tile, padded to a bucket) against
    float64, on an awkward GQA shape: what the dense path runs where the cost model finds it
    faster than SDPA."""
    B, Hq, Hkv, S, D = 2, 8, 2, 3001, 128
    q, k, v = random_qkv(B, Hq, Hkv, S, D, dtype, device)
    got = fs.flex_dense_attention(q, k, v, D**-0.5, backend)
    group = Hq // Hkv
    kk, vv = (t.double().repeat_interleave(group, 1) for t in (k, v))
    ref = F.scaled_dot_product_attention(q.double(), kk, vv, is_causal=True)
    base = F.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True
    )
    return Check(
        f"flex dense attention ({backend}) vs float64", str(dtype), f"B{B} H{Hq}/{Hkv} S{S} D{D}",
        rel_rmse(got, ref), "rel rmse", 2 * rel_rmse(base.to(dtype), ref) + 1e-5,
    )  # fmt: skip


def check_chunk_sampler(dtype, device, sampler: str) -> Check:
    """A chunk of a chunked prefill (queries the last L of S positions): the sampler against
    float64 probabilities of the same rows read from the whole prompt's queries."""
    B, Hq, Hkv, S, L, D = 2, 8, 2, 3000, 1234, 128
    q, k, _ = random_qkv(B, Hq, Hkv, S, D, dtype, device)
    cfg = fs.SampleConfig(num_segments=5, sample_ratio=0.1)
    layout = fs.SampleLayout.create(S, cfg, query_len=L)
    rows = layout.sampled_rows(device).flatten()
    kk = k.double().repeat_interleave(Hq // Hkv, dim=1)
    logits = (q.double()[:, :, rows] @ kk.transpose(-1, -2)) * D**-0.5
    causal = torch.arange(S, device=device) <= rows[:, None]
    probs = logits.masked_fill(~causal, float("-inf")).softmax(dim=-1)
    ref = probs.view(B, Hq, layout.num_segments, -1, S).mean(dim=3)
    got = run_sampler(sampler, q[:, :, S - L :], k, layout, D**-0.5)
    return Check(
        f"chunk: {sampler} sampler vs float64", str(dtype), f"B{B} H{Hq}/{Hkv} S{S} L{L} D{D}",
        rel_max(got, ref), "rel max", 1e-4,
    )  # fmt: skip


def check_chunk_attention(dtype, device) -> Check:
    """A chunk's whole call (plan, gather, compiled flex with a row offset) against the
    float64 element-mask oracle of the plan's own selection; bound as for
    :func:`check_sparse_flex`, with a floor."""
    B, Hq, Hkv, S, L, D = 2, 8, 2, 3000, 1234, 128
    q_full, k, v, cfg = planted_case(0.1, B, Hq, Hkv, S, D, dtype=dtype, device=device, seed=5)
    q = q_full[:, :, S - L :]
    plan = fs.plan_prefill(q, k, cfg)
    got = fs.run_plan(plan, q, k, v)
    ref = fs.sparse_attention_reference(
        q.double(),
        k.double(),
        v.double(),
        plan.pattern,
        plan.scale,
    )
    rows = torch.arange(S - L, S, device=device)
    allowed = plan.pattern.keep(rows)
    group = Hq // Hkv
    base = F.scaled_dot_product_attention(
        q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), attn_mask=allowed,
        scale=plan.scale,
    )  # fmt: skip
    # fp32: SDPA's own error here is about 1e-6, and the H100 run measured flex at 2.1x it
    # (2.32e-6): a floor of 1e-5 (the dense-equivalent check allows 1e-4 in fp32).
    floor = 1e-5 if dtype == torch.float32 else 1e-6
    return Check(
        f"chunk: plan + run ({plan.path}) vs float64 oracle", str(dtype),
        f"B{B} H{Hq}/{Hkv} S{S} L{L} D{D}", rel_rmse(got, ref), "rel rmse",
        max(2 * rel_rmse(base, ref), floor),
    )  # fmt: skip


def check_correctness(
    device: torch.device,
    dry: bool,
    on_check=None,
    kernels_only: bool = False,
    only: str | None = None,
) -> list[dict]:
    """Every correctness check of the GPU run (fewer shapes with ``dry``), in turn:
    ``on_check(rows)`` after each, so that a run cut short keeps the checks it made (with
    FlashAttention-4 the section takes minutes: each padded shape compiles once).
    ``kernels_only``: the sampler's, the probe's and the row cover's checks alone (no
    attention call). ``only``: the checks whose function's name holds this text (or one of these
    comma-separated texts)."""
    sampler = "triton" if device.type == "cuda" else "torch"
    shapes = [
        (1, 4, 2, 1000, 64, 64),
        (2, 6, 2, 777, 128, 128),
        (1, 32, 8, 2053, 128, 128),
        (1, 3, 3, 517, 80, 32),
    ][: 2 if dry else 4]
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    half = (torch.bfloat16, torch.float16)
    flash = flash_reason(device) is None
    S = 2048 if dry else 4099
    p = functools.partial
    todo = [p(check_sampler_vs_oracle, s, d, device, sampler) for s in shapes for d in dtypes]
    todo.append(p(check_sampler_vs_torch, 4096 if dry else 32768, device, sampler))
    todo += [p(check_row_kept_mass, s, d, device, sampler) for s in shapes for d in dtypes]
    if sampler == "triton":  # the cover's first kernel too, over the kept keys
        kept_keys = p(check_row_kept_mass, sampler=sampler, sparse=True)
        todo += [p(kept_keys, s, d, device) for s in shapes for d in dtypes]
    todo.append(p(check_row_cover, 4096 if dry else 32768, device, sampler))
    if sampler == "triton":
        todo += [p(check_probe, S, device, inputs) for S in (32768, 131072) for inputs in INPUTS]
    if device.type == "cuda":
        todo += [p(check_graph_replay, S, device) for S in (16384, 131072)]
    todo += [p(check_chunk_sampler, d, device, sampler) for d in dtypes]
    if not kernels_only:
        todo += [p(check_sparse_flex, d, device, sh) for sh in (False, True) for d in dtypes]
        if flash:
            todo += [
                p(check_sparse_flex, d, device, sh, "flash") for sh in (False, True) for d in half
            ]
        todo += [p(check_chunk_attention, d, device) for d in (torch.float32, torch.bfloat16)]
        todo += [p(check_dense_equivalent, d, S, device) for d in (torch.float32, torch.bfloat16)]
        if flash:
            todo.append(p(check_dense_equivalent, torch.bfloat16, S, device, "triton"))
        todo += [p(check_dense_path, d, device) for d in dtypes]
        if flash:
            todo += [p(check_flex_dense, d, device, "flash") for d in half]
        elif dry:  # the same check on the Triton backend (the CPU template), to try the script
            todo.append(p(check_flex_dense, torch.bfloat16, device, "triton"))
    if only:
        texts = only.split(",")
        todo = [check for check in todo if any(t in check.func.__name__ for t in texts)]
    rows: list[dict] = []
    for check in todo:
        c = check().row()
        rows.append(c)
        print(
            f"  {'ok ' if c['ok'] else 'BAD'} {c['check']} {c['dtype']} {c['shape']}: "
            f"{c['error']:.2e} <= {c['bound']:.1e}",
            flush=True,
        )
        if on_check:
            on_check(rows)
    return rows


# ---------------------------------------------------------------------------------------------
# speed


def matmul_tflops(device: torch.device, measure) -> float | None:
    if device.type != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = measure(lambda: a @ b)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def dense_sdpa(backend: SDPBackend, q, k, v, *, grouped: bool = False):
    """SDPA restricted to one backend: on K/V expanded to the query heads (made outside the
    timed region: not every backend takes grouped K/V), or on the grouped K/V as they are."""
    if grouped:

        def run():
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        return run
    group = q.shape[1] // k.shape[1]
    k_full, v_full = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)

    def run():
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k_full, v_full, is_causal=True)

    return run


def time_dense(q, k, v, scale, measure, fns: dict | None = None) -> dict[str, float | None]:
    """Dense causal baselines in milliseconds (None where a backend cannot run the case);
    each one's function goes into ``fns`` by name where given."""
    fns = {} if fns is None else fns
    device = q.device
    backends = {
        "sdpa_flash": (SDPBackend.FLASH_ATTENTION, False),
        "sdpa_cudnn": (SDPBackend.CUDNN_ATTENTION, False),
        "sdpa_cudnn_gqa": (SDPBackend.CUDNN_ATTENTION, True),
    }
    if device.type != "cuda":
        backends = {"sdpa_cpu": (SDPBackend.FLASH_ATTENTION, False)}  # PyTorch's CPU flash kernel
    times: dict[str, float | None] = {}
    for name, (backend, grouped) in backends.items():
        try:
            fns[name] = dense_sdpa(backend, q, k, v, grouped=grouped)
            times[name] = measure(fns[name])
        except RuntimeError as e:  # backend unavailable for this shape/dtype
            fns.pop(name)
            print(f"  {name} unavailable: {str(e).splitlines()[0][:120]}")
            times[name] = None
    # Dense causal attention through the same compiled FlexAttention call flexsample makes,
    # on each backend that runs here.
    triton = fs.SampleConfig.dense_equivalent(backend="triton")
    dense_plan = fs.plan_prefill(q, k, triton, scale=scale)
    fns["flex_dense"] = functools.partial(fs.run_plan, dense_plan, q, k, v)
    times["flex_dense"] = measure(fns["flex_dense"])
    times["flex_dense_flash"] = None
    if flash_reason(device) is None:
        flash = fs.plan_prefill(q, k, triton.replace(static=True), scale=scale)
        fns["flex_dense_flash"] = functools.partial(fs.run_plan, flash, q, k, v)
        times["flex_dense_flash"] = measure(fns["flex_dense_flash"])
    return times


#: Seconds of interleaved rounds :func:`head_to_head` spends per (length, input), at least
#: :data:`PAIRED_MIN_ROUNDS` rounds.
PAIRED_BUDGET_S = 2.0
PAIRED_MIN_ROUNDS = 7


def head_to_head(
    q, k, v, cfg: fs.SampleConfig, dense: dict[str, float | None], fns: dict
) -> dict[str, float]:
    """flexsample's call beside the fastest dense kernel and cuDNN on grouped K/V, timed in
    turn within each round (device clock, medians): ratios from one run, robust to the
    drift between separately timed kernels (the fastest of five separately timed kernels
    is biased low by their noise)."""
    fastest = min((n for n, t in dense.items() if t), key=lambda n: dense[n])
    names = [fastest] + [n for n in ("sdpa_cudnn_gqa",) if n in fns and n != fastest]
    calls = [functools.partial(fs.flex_sample_attention, q, k, v, config=cfg)]
    calls += [fns[n] for n in names]
    rounds = max(PAIRED_MIN_ROUNDS, int(PAIRED_BUDGET_S * 1e3 / (2 * dense[fastest])))
    seconds = interleaved_medians(calls, q.device, rounds, clock="device")
    ms = dict(zip(["flexsample", *names], (x * 1e3 for x in seconds), strict=True))
    return {
        "paired_rounds": rounds,
        "paired_fastest": fastest,
        "paired_flexsample_ms": ms["flexsample"],
        "paired_fastest_ms": ms[fastest],
        "paired_cudnn_gqa_ms": ms.get("sdpa_cudnn_gqa"),
        "paired_vs_fastest": ms[fastest] / ms["flexsample"],
        "paired_vs_cudnn_gqa": (
            ms["sdpa_cudnn_gqa"] / ms["flexsample"] if "sdpa_cudnn_gqa" in ms else None
        ),
    }


def flash_reason(device: torch.device) -> str | None:
    """Why FlexAttention's FlashAttention-4 backend cannot run here (bf16, D=128)."""
    return fs.flash_unavailable(device, torch.bfloat16, 128)


def time_flexsample(q, k, v, cfg: fs.SampleConfig, measure) -> dict[str, float]:
    """Each flexsample stage and the whole call, in milliseconds, plus the path and density.

    The stages are timed by :func:`flexsample.plan_prefill`'s own stage timer (the shipped
    code, its host syncs included); ``plan_ms`` is the whole planning call without it. A
    plan that runs dense reports density 1 and its reason. ``plan_peak_mib``: on CUDA, the
    most memory one planning call held beyond its inputs (the plan it returns included),
    beside ``qkv_mib``, the size of q, k and v.
    """
    plan = fs.plan_prefill(q, k, cfg)
    peak = None
    if q.device.type == "cuda":
        del plan
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        plan = fs.plan_prefill(q, k, cfg)
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    stage_ms: dict[str, list[float]] = {stage: [] for stage in fs.PLAN_STAGES}

    def timed_planning():
        timer = fs.StageTimer(q.device, enabled=True)
        fs.plan_prefill(q, k, cfg, timer=timer)
        for stage, seconds in timer.times.items():
            stage_ms[stage].append(seconds * 1e3)

    measure(timed_planning)
    return {
        "sampler": plan.sampler,
        "path": plan.path,
        "backend": plan.backend or "sdpa",
        "plan_peak_mib": peak,
        "qkv_mib": sum(t.numel() * t.element_size() for t in (q, k, v)) / 2**20,
        "reason": plan.reason,
        "density": 1.0 if plan.density is None else float(plan.density.mean()),
        **{f"{stage}_ms": statistics.median(ms) if ms else 0.0 for stage, ms in stage_ms.items()},
        "plan_ms": measure(lambda: fs.plan_prefill(q, k, cfg)),
        "attention_ms": measure(lambda: fs.run_plan(plan, q, k, v)),
        "flexsample_total_ms": measure(lambda: fs.flex_sample_attention(q, k, v, config=cfg)),
    }


def tune_sampler(device: torch.device, measure) -> list[dict]:
    """Time the Triton sampler's launch configurations on one long planted case.

    The package's table (``flexsample.sampling.triton_kernel.LAUNCH_CONFIGS``) holds the
    fastest of these per GPU architecture; each row says whether it is the one in use here.
    """
    if device.type != "cuda":
        return []
    from flexsample.sampling.triton_kernel import launch_config, sample_column_scores_triton

    S = 65536
    q, k, _, cfg = planted_case(0.1, 1, 32, 8, S, 128, dtype=torch.bfloat16, device=device, seed=0)
    layout = fs.SampleLayout.create(S, cfg)
    in_use = launch_config(device)
    rows = []
    candidates = [
        (32, 64, 4), (64, 32, 4), (64, 64, 4), (64, 64, 8), (64, 128, 4), (64, 128, 8),
        (128, 32, 4), (128, 64, 4), (128, 64, 8), (128, 128, 8),
    ]  # fmt: skip
    for candidate in candidates:
        block_m, block_n, warps = candidate
        ms = measure(
            lambda bm=block_m, bn=block_n, w=warps: sample_column_scores_triton(
                q, k, layout, 128**-0.5, block_m=bm, block_n=bn, num_warps=w
            )
        )
        rows.append(
            {
                "seq_len": S, "block_m": block_m, "block_n": block_n, "num_warps": warps,
                "sample_ms": ms, "in_use": candidate == in_use,
            }
        )  # fmt: skip
        print(f"  sampler {candidate}{' (in use)' if candidate == in_use else ''}: {ms:.3f} ms")
    return rows


#: Configurations timed and scored at every length and input: the defaults (the cost model
#: decides dense or sparse), the same selection always run sparse (what the sparse path
#: costs where the defaults run dense), 0.2's selection (no per-row cover), 0.3's selection
#: (a kv head's query heads reading their union of columns, a 128-token window floor), the
#: defaults with the union (``group_union=True``), alpha 0.98, and the sampled rows capped
#: at 2048 (what fewer rows cost in accuracy at 64K-128K; the default cap, 4096, binds from
#: 80K on). The defaults run the sparse call on
#: FlashAttention-4 where it is installed; "alpha 0.98, Triton backend" times FlexAttention's
#: Triton kernel beside it at a density where the call's kernel matters.
METHODS = {
    "defaults": fs.SampleConfig(),
    "defaults, always sparse": fs.SampleConfig.always_sparse(),
    "0.2 selection (no row cover), always sparse": preset("0.2").replace(
        min_seq_len=0, max_density=1.0
    ),
    "0.3 selection (group union, min_window=128)": preset("0.3"),
    "group union (group_union=True)": fs.SampleConfig().replace(group_union=True),
    "alpha 0.98": fs.SampleConfig(alpha=0.98),
    "alpha 0.98, Triton backend": fs.SampleConfig(alpha=0.98, backend="triton"),
    "defaults, at most 2048 sampled rows": fs.SampleConfig(max_sampled_rows=2048),
}

#: Inputs: planted single-token stripes (as bench/test_frontier.py: sinks, delimiters and
#: needles are single tokens; the planted keys hold all but about 1% of the mass), and plain
#: random q/k/v, diffuse attention where sparsity cannot help.
INPUTS = ("single-token stripes", "diffuse (random q/k/v)")


def bench_shape(dry_run: bool) -> tuple[torch.device, tuple[int, int, int], torch.dtype]:
    """``(device, (Hq, Hkv, D), dtype)`` of the GPU scripts: the Llama-3-8B attention shape
    in bf16 on CUDA, or with ``dry_run`` a small float32 shape on CPU (to try a script)."""
    if dry_run:
        return torch.device("cpu"), (8, 2, 64), torch.float32
    return torch.device("cuda"), (32, 8, 128), torch.bfloat16


def make_inputs(name: str, Hq: int, Hkv: int, S: int, D: int, dtype, device):
    if name == "single-token stripes":
        return planted_qkv(
            1, Hq, Hkv, S, D, stripes=(16, 32), stripe_width=1,
            signal=max(10.0, math.log(100 * S / 64)), dtype=dtype, device=device, seed=0,
        )  # fmt: skip
    return random_qkv(1, Hq, Hkv, S, D, dtype, device)


def speed(
    device: torch.device,
    lengths: list[int],
    heads: tuple,
    measure,
    tflops,
    on_row=None,
    methods: list[str] | None = None,
) -> list[dict]:
    """Every configuration of :data:`METHODS` (or those named in ``methods``) on every input
    of :data:`INPUTS`, per length: stage times, the whole call, path, density, output error
    against dense SDPA, and the dense kernels' times."""
    Hq, Hkv, D = heads
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows: list[dict] = []
    for S in lengths:
        causal_flops = 4 * Hq * D * S * (S + 1) / 2
        for inputs in INPUTS:
            q, k, v = make_inputs(inputs, Hq, Hkv, S, D, dtype, device)
            dense_fns: dict = {}
            dense = time_dense(q, k, v, D**-0.5, measure, dense_fns)
            fastest = min((t for t in dense.values() if t), default=None)
            reference = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            for name in methods or METHODS:
                cfg = METHODS[name]
                row = {
                    "seq_len": S,
                    "inputs": inputs,
                    "heads": f"{Hq}/{Hkv}",
                    "head_dim": D,
                    "dtype": str(dtype),
                    "method": name,
                    **time_flexsample(q, k, v, cfg, measure),
                    **{f"{kernel}_ms": t for kernel, t in dense.items()},
                    "fastest_dense_ms": fastest,
                }
                if name == "defaults" and fastest:
                    row.update(head_to_head(q, k, v, cfg, dense, dense_fns))
                out = fs.flex_sample_attention(q, k, v, config=cfg)
                row["output_error"] = rel_rmse(out, reference)
                row["floor_ms"] = causal_flops * row["density"] / (tflops * 1e9) if tflops else None
                overhead = sum(row[f"{stage}_ms"] for stage in fs.PLAN_STAGES)
                ref = dense.get("sdpa_flash") or dense.get("sdpa_cpu")
                if ref:
                    row["speedup_vs_sdpa"] = ref / row["flexsample_total_ms"]
                if dense.get("sdpa_cudnn"):
                    row["speedup_vs_cudnn"] = dense["sdpa_cudnn"] / row["flexsample_total_ms"]
                if fastest:
                    row["speedup_vs_fastest"] = fastest / row["flexsample_total_ms"]
                    row["overhead_vs_fastest"] = overhead / fastest
                rows.append(row)
                if on_row:
                    on_row(rows)
                print(
                    "  "
                    + " ".join(
                        f"{key}={val:.3f}" if isinstance(val, float) else f"{key}={val}"
                        for key, val in row.items()
                    ),
                    flush=True,
                )
                del out
            del q, k, v, reference
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


#: Results of the optional sections (``--host-overhead``, ``--buckets``) for the report.
EXTRA: dict = {}

#: Query rows :func:`frontier_rows` scores.
FRONTIER_ROWS = 256
#: Oracle alphas of :func:`frontier_rows`.
ORACLE_ALPHAS = (0.95, 0.98, 0.99, 0.995)


def frontier_rows(
    device: torch.device, S: int, heads: tuple, rows: int = FRONTIER_ROWS
) -> list[dict]:
    """On single-token stripes at length ``S``: density, output error and kept mass of each
    :data:`METHODS` plan and of the per-row oracle (:data:`ORACLE_ALPHAS`), scored in float64
    on ``rows`` query rows spread evenly over the sequence (the whole S x S is too large)."""
    from flexsample.oracle import evaluate_plan, oracle_frontier

    Hq, Hkv, D = heads
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = make_inputs(INPUTS[0], Hq, Hkv, S, D, dtype, device)
    positions = torch.linspace(0, S - 1, rows + 1, device=device)[1:].round().long()
    out = []
    for name, cfg in METHODS.items():
        plan = fs.plan_prefill(q, k, cfg)
        quality = evaluate_plan(q, k, v, plan, chunk=64, rows=positions)
        out.append({"seq_len": S, "mask": name, "path": plan.path, **asdict(quality)})
    oracle = oracle_frontier(q, k, v, ORACLE_ALPHAS, chunk=64, rows=positions)
    for alpha, quality in oracle.items():
        out.append({"seq_len": S, "mask": f"per-row oracle, alpha {alpha}", **asdict(quality)})
    for row in out:
        print(
            f"  frontier S={S} {row['mask']}: density {row['density']:.4f}, "
            f"error {row['output_error']:.2e}, kept p1 {row['kept_mass_p1']:.4f}",
            flush=True,
        )
    return out


def profile_plan(device: torch.device, S: int, heads: tuple, calls: int = 3) -> str:
    """torch.profiler tables of ``calls`` default plans (after a warm-up) at length ``S``."""
    from torch.profiler import ProfilerActivity, profile

    Hq, Hkv, D = heads
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, _ = make_inputs(INPUTS[0], Hq, Hkv, S, D, dtype, device)
    plan = fs.plan_prefill(q, k)
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fs.plan_prefill(q, k)
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages()
    device_sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel"))
    return "\n".join([
        f"{calls} plans of S={S}, heads {Hq}/{Hkv}, D={D}, {dtype}, path {plan.path}",
        f"kernel launches per plan: {launches / calls:.0f}",
        "",
        "by device time:",
        events.table(sort_by=device_sort, row_limit=40),
        "by host time:",
        events.table(sort_by="self_cpu_time_total", row_limit=25),
    ])  # fmt: skip


def host_overhead(device: torch.device, heads: tuple, S: int = 8192, calls: int = 200) -> dict:
    """Host microseconds per call on the dense path, which the GPU waits for at short lengths.

    Each function is called ``calls`` times without synchronising (its GPU work queues
    behind), timed on the host: SDPA on cuDNN with grouped K/V (the baseline), flexsample's
    ``dense_causal_attention``, ``run_plan`` of a dense plan, ``plan_prefill`` deciding dense
    by length, and the whole ``flex_sample_attention``; plus a cProfile table of the last.
    """
    import cProfile
    import io
    import pstats

    Hq, Hkv, D = heads
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    q, k, v = random_qkv(1, Hq, Hkv, S, D, dtype, device)
    cfg = fs.SampleConfig(min_seq_len=10 * S)  # dense by length, as the defaults at 8K
    baseline = SDPBackend.CUDNN_ATTENTION if cuda else SDPBackend.FLASH_ATTENTION  # CPU: dry run
    plan = fs.plan_prefill(q, k, cfg)
    fns = {
        "sdpa_cudnn_gqa": dense_sdpa(baseline, q, k, v, grouped=True),
        "dense_causal_attention": lambda: fs.dense_causal_attention(q, k, v, D**-0.5),
        "run_plan_dense": lambda: fs.run_plan(plan, q, k, v),
        "plan_prefill_dense": lambda: fs.plan_prefill(q, k, cfg),
        "flex_sample_attention": lambda: fs.flex_sample_attention(q, k, v, config=cfg),
    }
    out: dict = {"seq_len": S, "calls": calls}
    for name, fn in fns.items():
        samples = []
        for _ in range(5):
            fn()
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            samples.append((time.perf_counter() - start) / calls * 1e6)
            if cuda:
                torch.cuda.synchronize()
        out[f"{name}_us"] = statistics.median(samples)
        print(f"  host {name}: {out[f'{name}_us']:.1f} us per call", flush=True)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fns["flex_sample_attention"]()
    profiler.disable()
    if cuda:
        torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(20)
    # File names relative to the repository and the interpreter's folders, not this machine's.
    root = str(Path(__file__).resolve().parents[1]) + os.sep
    out["profile"] = text.getvalue().replace(root, "").replace(sys.prefix + os.sep, "")
    return out


#: Prompt lengths of :func:`bucket_compilations`: ten distinct lengths from 5000 to 12000.
BUCKET_LENGTHS = (5000, 5500, 6000, 6200, 7000, 7700, 8000, 9000, 11000, 12000)


def bucket_compilations(
    device: torch.device, heads: tuple, lengths: tuple[int, ...] = BUCKET_LENGTHS
) -> list[dict]:
    """Ten prompt lengths through ``flex_sample_attention`` (every layer sparse, default
    backend) after a Dynamo reset: per length, the backend, the padded shape, the first
    call's seconds (compilation included) and the number of compiled FlexAttention
    variants so far (Dynamo's cache entries)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    from torch.nn.attention.flex_attention import flex_attention

    Hq, Hkv, D = heads
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = fs.SampleConfig.always_sparse()
    torch._dynamo.reset()
    rows = []
    for S in lengths:
        q, k, v = make_inputs(INPUTS[0], Hq, Hkv, S, D, dtype, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        plan = fs.plan_prefill(q, k, cfg)
        fs.run_plan(plan, q, k, v)
        if device.type == "cuda":
            torch.cuda.synchronize()
        row = {
            "seq_len": S, "backend": plan.backend, "padded": plan.padded,
            "first_call_s": time.perf_counter() - start,
            "flex_compilations": len(_debug_get_cache_entry_list(flex_attention.__code__)),
        }  # fmt: skip
        rows.append(row)
        print(f"  bucket {row}", flush=True)
    return rows


def _cost_model_line(model: dict | str | None) -> str:
    if not isinstance(model, dict):
        return str(model or "not recorded")
    flex = model.get("flex_dense_pair_s")
    dense = "SDPA" if flex is None else "the faster of SDPA and FlexAttention dense"
    return f"{model['source']} (sparse call on {model.get('backend', 'triton')}; dense: {dense})"


def markdown(meta: dict, checks: list[dict], rows: list[dict], frontier: list[dict]) -> str:
    out = [
        f"## GPU run on {meta['device']}",
        "",
        f"torch {meta['torch']}, triton {meta['triton']}, bf16 matmul "
        f"{meta['matmul_tflops']:.0f} TFLOP/s measured"
        if meta["matmul_tflops"]
        else f"torch {meta['torch']} (dry run)",
        "",
        f"code at commit {meta.get('commit') or 'unknown'}; command: `{meta['command']}`",
        "",
        f"FlexAttention's FlashAttention-4 backend: {meta.get('flash', 'not checked')}",
        "",
        f"Cost model the defaults used: {_cost_model_line(meta.get('cost_model'))}",
        "",
        "### Correctness",
        "",
        "| check | dtype | shape | error | bound | ok |",
        "|---|---|---|---|---|---|",
    ]
    for c in checks:
        out.append(
            f"| {c['check']} | {c['dtype'].replace('torch.', '')} | {c['shape']} | "
            f"{c['error']:.2e} ({c['metric']}) | {c['bound']:.1e} | "
            f"{'yes' if c['ok'] else '**NO**'} |"
        )
    out += [
        "",
        "### Speed and accuracy (ms, median)",
        "",
        "Output error: relative RMS error against dense SDPA in the same dtype. Path: what "
        "the call ran (the defaults' cost model may choose dense). Overhead: probe + sample + "
        "select + cover + mask over the fastest dense kernel's time. SDPA flash and SDPA cuDNN "
        "read K/V expanded to the query heads (expanded outside the timed region); cuDNN GQA "
        "reads the grouped K/V as they are. Flex dense: the same compiled FlexAttention call "
        "with every causal tile, on its Triton backend and (where installed) FlashAttention-4. "
        "Kernel: what ran the call (sdpa: SDPA's dense path; flash on the dense path: "
        "FlexAttention's FlashAttention-4 with every causal tile). vs fastest: the fastest of "
        "these dense kernels over flexsample's whole call.",
        "",
        "| S | input | configuration | path | kernel | density | output error | probe | sample | "
        "select | cover | mask | attention | flexsample | SDPA flash | SDPA cuDNN | cuDNN GQA | "
        "flex dense | flex dense FA4 | floor | vs flash | vs fastest | overhead |",
        "|" + "---|" * 23,
    ]

    def f(x, unit=""):
        return "n/a" if x is None else f"{x:.2f}{unit}"

    for r in rows:
        out.append(
            f"| {r['seq_len']} | {r['inputs']} | {r['method']} | {r['path']} | "
            f"{r.get('backend', 'n/a')} | {r['density']:.3f} | {r['output_error']:.2e} | "
            f"{f(r.get('probe_ms'))} | {f(r['sample_ms'])} | {f(r['select_ms'])} | "
            f"{f(r['cover_ms'])} | "
            f"{f(r['mask_ms'])} | {f(r['attention_ms'])} | {f(r['flexsample_total_ms'])} | "
            f"{f(r.get('sdpa_flash_ms') or r.get('sdpa_cpu_ms'))} | "
            f"{f(r.get('sdpa_cudnn_ms'))} | {f(r.get('sdpa_cudnn_gqa_ms'))} | "
            f"{f(r['flex_dense_ms'])} | {f(r.get('flex_dense_flash_ms'))} | {f(r['floor_ms'])} | "
            f"{f(r.get('speedup_vs_sdpa'), 'x')} | {f(r.get('speedup_vs_fastest'), 'x')} | "
            f"{100 * r.get('overhead_vs_fastest', 0):.1f}% |"
        )
    paired = [r for r in rows if r.get("paired_rounds")]
    if paired:
        out += [
            "",
            "### The defaults head to head (ms, interleaved rounds)",
            "",
            "flexsample's call at the defaults, the fastest dense kernel of the table above "
            "and cuDNN on grouped K/V, called in turn within each round (device clock, "
            "medians): the ratios of one run.",
            "",
            "| S | input | path | rounds | flexsample | fastest dense | kernel | vs fastest | "
            "cuDNN GQA | vs cuDNN GQA |",
            "|" + "---|" * 10,
        ]
        for r in paired:
            out.append(
                f"| {r['seq_len']} | {r['inputs']} | {r['path']} | {r['paired_rounds']} | "
                f"{f(r['paired_flexsample_ms'])} | {f(r['paired_fastest_ms'])} | "
                f"{r['paired_fastest']} | {f(r['paired_vs_fastest'], 'x')} | "
                f"{f(r.get('paired_cudnn_gqa_ms'))} | {f(r.get('paired_vs_cudnn_gqa'), 'x')} |"
            )
    always = "defaults, always sparse"
    planned = [r for r in rows if r["method"] == always and r.get("plan_peak_mib")]
    if planned:
        out += [
            "",
            "### Planning memory",
            "",
            "The most device memory one planning call (defaults, always sparse) held beyond "
            "its inputs, the plan it returns included, beside the size of q, k and v.",
            "",
            "| S | input | planning peak (MiB) | q + k + v (MiB) | ratio |",
            "|---|---|---|---|---|",
        ]
        for r in planned:
            out.append(
                f"| {r['seq_len']} | {r['inputs']} | {r['plan_peak_mib']:.0f} | "
                f"{r['qkv_mib']:.0f} | {r['plan_peak_mib'] / r['qkv_mib']:.2f} |"
            )
    if frontier:
        out += [
            "",
            "### Masks against the per-row oracle (single-token stripes)",
            "",
            f"Scored in float64 on {FRONTIER_ROWS} query rows spread evenly over the sequence "
            "(their own causal pairs, output error and kept mass); the oracle keeps for each "
            "row the fewest keys holding alpha of its exact mass.",
            "",
            "| S | mask | density | output error | kept mass min | kept mass 1st pct |",
            "|---|---|---|---|---|---|",
        ]
        for r in frontier:
            out.append(
                f"| {r['seq_len']} | {r['mask']} | {r['density']:.4f} | "
                f"{r['output_error']:.2e} | {r['kept_mass_min']:.4f} | {r['kept_mass_p1']:.4f} |"
            )
    host = EXTRA.get("host_overhead")
    if host:
        out += [
            "",
            f"### Host time per call on the dense path (S={host['seq_len']}, microseconds)",
            "",
            f"Median of 5 rounds of {host['calls']} calls without synchronising (the GPU work "
            "queues behind): what the GPU waits for where attention itself is short.",
            "",
            "| SDPA cuDNN GQA | dense_causal_attention | run_plan (dense) | plan_prefill "
            "(dense by length) | flex_sample_attention |",
            "|---|---|---|---|---|",
            f"| {host['sdpa_cudnn_gqa_us']:.1f} | {host['dense_causal_attention_us']:.1f} | "
            f"{host['run_plan_dense_us']:.1f} | {host['plan_prefill_dense_us']:.1f} | "
            f"{host['flex_sample_attention_us']:.1f} |",
        ]
    buckets = EXTRA.get("buckets")
    if buckets:
        out += [
            "",
            "### Compilations over ten prompt lengths (every layer sparse, default backend)",
            "",
            "After a Dynamo reset; first call's seconds include planning and compilation.",
            "",
            "| S | kernel | padded (rows, keys) | first call (s) | compiled flex variants |",
            "|---|---|---|---|---|",
        ]
        for r in buckets:
            out.append(
                f"| {r['seq_len']} | {r['backend']} | {r['padded']} | "
                f"{r['first_call_s']:.2f} | {r['flex_compilations']} |"
            )
    reasons = sorted({r["reason"] for r in rows if r["reason"]})
    if reasons:
        out += ["", "Why calls ran dense:", ""] + [f"- {reason}" for reason in reasons]
    return "\n".join(out) + "\n"


def plot(rows: list[dict], path: Path) -> Path | None:
    """flexsample's whole call over the fastest dense kernel, per length, configuration and
    input (log-log); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    inputs = list(dict.fromkeys(r["inputs"] for r in rows))
    fig, axes = plt.subplots(1, len(inputs), figsize=(6 * len(inputs), 4), squeeze=False)
    for ax, name in zip(axes[0], inputs, strict=True):
        for method in dict.fromkeys(r["method"] for r in rows):
            pts = [r for r in rows if r["inputs"] == name and r["method"] == method]
            pts = [r for r in pts if r.get("speedup_vs_fastest")]
            ax.plot(
                [r["seq_len"] for r in pts], [r["speedup_vs_fastest"] for r in pts],
                marker="o", label=method,
            )  # fmt: skip
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_ylabel("speed vs fastest dense kernel (x)")
        ax.set_title(name)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, required=True, help="folder for the JSON and Markdown")
    p.add_argument("--dry-run", action="store_true", help="CPU, small sizes: check the script")
    p.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        default=None,
        help="sequence lengths (default 4K 8K 16K 32K 64K 128K; dry run 2K 4K)",
    )
    p.add_argument("--skip-correctness", action="store_true")
    p.add_argument(
        "--methods",
        nargs="+",
        choices=list(METHODS),
        metavar="NAME",
        default=None,
        help="time only these configurations (default: all of them; 'defaults' alone gives "
        "the head to head at every length in one device call)",
    )
    p.add_argument(
        "--kernel-checks",
        action="store_true",
        help="only the sampler's, the probe's and the row cover's checks against float64 and "
        "torch, then stop",
    )
    p.add_argument(
        "--checks",
        metavar="TEXT",
        help="only the correctness checks whose function's name holds TEXT, or one of "
        "several comma-separated (e.g. probe,row_cover,graph; all of them take more than one "
        "device call), then stop",
    )
    p.add_argument(
        "--replot",
        type=Path,
        metavar="JSON",
        help="only redraw the plot of a finished run's JSON into --out (no GPU needed)",
    )
    p.add_argument(
        "--tune-sampler",
        action="store_true",
        help="time the Triton sampler's launch configurations (CUDA); the fastest per GPU "
        "architecture belongs in flexsample/sampling/triton_kernel.py's LAUNCH_CONFIGS",
    )
    p.add_argument(
        "--frontier",
        type=int,
        nargs="*",
        metavar="S",
        default=None,
        help="lengths at which to score every configuration's mask and the per-row oracle on "
        f"{FRONTIER_ROWS} rows in float64 (default, and with no lengths: 64K and 128K; dry "
        "run 2K)",
    )
    p.add_argument("--no-frontier", action="store_true", help="skip the masks' scoring")
    p.add_argument(
        "--host-overhead",
        action="store_true",
        help="time the host's work per call on the dense path at 8K (and cProfile it)",
    )
    p.add_argument(
        "--buckets",
        action="store_true",
        help="run ten prompt lengths (5000-12000) every layer sparse after a Dynamo reset and "
        "count FlexAttention compilations (FlashAttention-4 compiles per padded shape)",
    )
    p.add_argument(
        "--profile-plan",
        type=int,
        metavar="S",
        help="also profile the default planning at length S on single-token stripes "
        "(torch.profiler: the top operators by device and host time, and the launches) into "
        "--out/profile_plan_<S>_<device>.txt",
    )
    args = p.parse_args(argv)
    if args.replot:
        rows = json.loads(args.replot.read_text())["speed"]
        print(plot(rows, args.out / (args.replot.stem + ".png")))
        return 0

    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device; use --dry-run to check the script on CPU")
    lengths = args.lengths or (
        [2048, 4096] if args.dry_run else [4096, 8192, 16384, 32768, 65536, 131072]
    )
    heads = bench_shape(args.dry_run)[1]
    measure = timer(device, warmup=1 if args.dry_run else 2, reps=3 if args.dry_run else 5)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    meta = {
        "flash": flash_reason(device) or "FlashAttention-4 available",
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "python": sys.version.split()[0],
        "heads": heads,
        "dry_run": args.dry_run,
        "commit": code_commit(),
        "command": shlex.join(["python3", "bench/gpu_run.py", *(argv or sys.argv[1:])]),
    }
    meta["matmul_tflops"] = matmul_tflops(device, measure)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backend = resolve_backend("auto", device, dtype, heads[2])
    try:
        meta["cost_model"] = cost_model(device, dtype, backend).to_json()
    except LookupError as error:
        meta["cost_model"] = str(error)
    print(json.dumps(meta), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "dry_run" if args.dry_run else meta["device"].replace(" ", "_")
    checks: list[dict] = []
    tuning: list[dict] = []
    frontier: list[dict] = []

    def write(rows: list[dict]) -> None:  # after every row: a run cut short keeps its rows
        results = {
            "meta": meta, "correctness": checks, "sampler_tuning": tuning, "speed": rows,
            "frontier": frontier, **EXTRA,
        }  # fmt: skip
        (args.out / f"gpu_{tag}.json").write_text(json.dumps(results, indent=1))
        (args.out / f"gpu_{tag}.md").write_text(markdown(meta, checks, rows, frontier))

    def record(done: list[dict]) -> None:  # after every check: a run cut short keeps them
        checks[:] = done
        write([])

    if args.kernel_checks or args.checks:
        done = check_correctness(
            device, args.dry_run, on_check=record, kernels_only=True, only=args.checks
        )
        return 0 if all(c["ok"] for c in done) else 1
    if not args.skip_correctness:
        check_correctness(device, args.dry_run, on_check=record)
    tuning = tune_sampler(device, measure) if args.tune_sampler else []
    if args.profile_plan:
        text = profile_plan(device, args.profile_plan, heads)
        (args.out / f"profile_plan_{args.profile_plan}_{tag}.txt").write_text(text)
        print(text)
    if args.host_overhead:
        EXTRA["host_overhead"] = host_overhead(device, heads, *((512, 20) if args.dry_run else ()))
        print(EXTRA["host_overhead"]["profile"])
    if args.buckets:
        several = tuple(n // 4 for n in BUCKET_LENGTHS[:4]) if args.dry_run else BUCKET_LENGTHS
        EXTRA["buckets"] = bucket_compilations(device, heads, several)
    rows = speed(
        device, lengths, heads, measure, meta["matmul_tflops"], on_row=write, methods=args.methods
    )
    frontier_lengths = args.frontier
    if not frontier_lengths:  # omitted, or given without lengths (which once meant: skip)
        frontier_lengths = [2048] if args.dry_run else [65536, 131072]
    if args.no_frontier:
        frontier_lengths = []
    for S in frontier_lengths:
        frontier += frontier_rows(device, S, heads)
        write(rows)
    write(rows)
    plot(rows, args.out / f"gpu_{tag}.png")
    print(markdown(meta, checks, rows, frontier))
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
