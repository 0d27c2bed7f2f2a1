"""The speed runner: flex_sample_attention against the fastest dense kernels, with the
accuracy kept, at the defaults and named configs (GPU; ``--dry-run`` tries it on CPU).

Writes ``gpu_<device>.json``, ``.md`` and ``.png`` into ``--out``:

* speed and accuracy, on planted inputs with single-token stripes, on random q/k/v and on
  regional stripes (``--inputs`` picks), for the defaults (the cost model decides dense or
  sparse), the same selection always sparse, the 0.2 and 0.3 presets, alpha 0.98, the union
  of columns, a lower cap on sampled rows and query-aware tile keys (``--methods`` picks):
  each stage, the whole call, the path, density, output error against dense SDPA; SDPA
  (flash, cuDNN with expanded and grouped K/V), FlexAttention's dense call (Triton and,
  where installed, FlashAttention-4); CUDA-event medians after warm-up; the counted floor
  (causal FLOPs times density over the measured bf16 matrix rate);
* masks against the per-row oracle (``--frontier``, default 64K and 128K): each config's
  density, output error and kept mass beside the oracle's, in float64 on 256 query rows.

Correctness on the GPU is a test suite (``pytest -m cuda tests/cuda``); planning's stages
are profiled by ``bench/plan_stages.py``.

    python bench/speed.py --out bench/results            # on a CUDA machine
    python bench/speed.py --dry-run --out /tmp/x         # anywhere
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import shlex
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import flexsample as fs
from flexsample.backends import resolve_backend
from flexsample.costs import cost_model
from flexsample.presets import preset
from flexsample.provenance import code_commit
from flexsample.synthetic import planted_qkv, single_token_stripes
from flexsample.testing import random_qkv, rel_rmse
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
    # Query-aware selection (not on FlashAttention-4 yet: FlexAttention's Triton kernel).
    "tile keys 256, Triton backend": fs.SampleConfig(backend="triton").replace(tile_keys=256),
}

#: Inputs: planted single-token stripes (as bench/test_frontier.py: sinks, delimiters and
#: needles are single tokens; the planted keys hold all but about 1% of the mass), plain
#: random q/k/v, diffuse attention where sparsity cannot help, and regional stripes
#: (bench/test_frontier.py's: each single-token column read by the queries of one 256-row
#: region after it, what one column set per head misses).
INPUTS = ("single-token stripes", "diffuse (random q/k/v)", "regional stripes")


def bench_shape(dry_run: bool) -> tuple[torch.device, tuple[int, int, int], torch.dtype]:
    """``(device, (Hq, Hkv, D), dtype)`` of the GPU scripts: the Llama-3-8B attention shape
    in bf16 on CUDA, or with ``dry_run`` a small float32 shape on CPU (to try a script)."""
    if dry_run:
        return torch.device("cpu"), (8, 2, 64), torch.float32
    return torch.device("cuda"), (32, 8, 128), torch.bfloat16


def make_inputs(name: str, Hq: int, Hkv: int, S: int, D: int, dtype, device):
    if name == "single-token stripes":
        return single_token_stripes(Hq, Hkv, S, D, dtype, device)
    if name == "regional stripes":
        return planted_qkv(
            1, Hq, Hkv, S, D, stripes=(32, 64), stripe_width=1, stripe_scope=256, locality=3.0,
            local_span=1024, dtype=dtype, device=device, seed=0,
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
    inputs_named: list[str] | None = None,
) -> list[dict]:
    """Every configuration of :data:`METHODS` (or those named in ``methods``) on every input
    of :data:`INPUTS` (or those named in ``inputs_named``), per length: stage times, the
    whole call, path, density, output error against dense SDPA, and the dense kernels'
    times."""
    Hq, Hkv, D = heads
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows: list[dict] = []
    for S in lengths:
        causal_flops = 4 * Hq * D * S * (S + 1) / 2
        for inputs in inputs_named or INPUTS:
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


def _cost_model_line(model: dict | str | None) -> str:
    if not isinstance(model, dict):
        return str(model or "not recorded")
    flex = model.get("flex_dense_pair_s")
    dense = "SDPA" if flex is None else "the faster of SDPA and FlexAttention dense"
    how = "measured on first use" if model.get("automatic") else "calibrated"
    return (
        f"{model['source']} ({how}; sparse call on {model.get('backend', 'triton')}; "
        f"dense: {dense})"
    )


def markdown(meta: dict, rows: list[dict], frontier: list[dict]) -> str:
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
        f"Cost model the defaults used: {_cost_model_line(meta.get('cost_model'))}; "
        f"looking it up took {meta.get('cost_model_s', float('nan')):.1f} s",
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
        "--inputs",
        nargs="+",
        choices=list(INPUTS),
        metavar="NAME",
        default=None,
        help=f"time only these inputs (default: all of them: {', '.join(INPUTS)})",
    )
    p.add_argument(
        "--replot",
        type=Path,
        metavar="JSON",
        help="only redraw the plot of a finished run's JSON into --out (no GPU needed)",
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
        "command": shlex.join(["python3", "bench/speed.py", *(argv or sys.argv[1:])]),
    }
    meta["matmul_tflops"] = matmul_tflops(device, measure)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backend = resolve_backend("auto", device, dtype, heads[2])
    start = time.perf_counter()  # on a machine without its own calibration: the first-use one
    try:
        meta["cost_model"] = cost_model(device, dtype, backend).to_json()
    except LookupError as error:
        meta["cost_model"] = str(error)
    meta["cost_model_s"] = time.perf_counter() - start
    print(json.dumps(meta), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "dry_run" if args.dry_run else meta["device"].replace(" ", "_")
    frontier: list[dict] = []

    def write(rows: list[dict]) -> None:  # after every row: a run cut short keeps its rows
        results = {
            "meta": meta, "speed": rows, "frontier": frontier,
        }  # fmt: skip
        (args.out / f"gpu_{tag}.json").write_text(json.dumps(results, indent=1))
        (args.out / f"gpu_{tag}.md").write_text(markdown(meta, rows, frontier))

    rows = speed(
        device, lengths, heads, measure, meta["matmul_tflops"], on_row=write,
        methods=args.methods, inputs_named=args.inputs,
    )  # fmt: skip
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
    print(markdown(meta, rows, frontier))
    return 0


if __name__ == "__main__":
    sys.exit(main())
