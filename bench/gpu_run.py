"""The GPU run: Triton sampler and flex_sample_attention on CUDA against SDPA and FlexAttention.

One call does everything and writes ``gpu_<device>.json`` and ``gpu_<device>.md`` into
``--out``:

* correctness: the compiled Triton sampling kernel against the float64 oracle (fp32, bf16,
  fp16; awkward shapes), Triton against the torch sampler at a long length, the compiled
  sparse flex path against its eager oracle on random layouts, and ``flex_sample_attention``
  with a dense-equivalent config against SDPA;
* speed, on planted-structure inputs at several densities: each flexsample stage, the whole
  call, SDPA with the flash backend, SDPA with cuDNN, dense compiled FlexAttention; CUDA-event
  medians after warm-up; and the counted floor (causal FLOPs times density over the measured
  bf16 matrix rate).

``--dry-run`` runs the same code on CPU at small sizes (torch sampler, wall clock), to check
the script without a GPU.

    python bench/gpu_run.py --out results/            # on a CUDA machine
    python bench/gpu_run.py --dry-run --out /tmp/x    # anywhere
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask

import flexsample as fs
from flexsample.attention import compiled_flex_attention
from flexsample.layout import SampleLayout
from flexsample.sampling import resolve_sampler, run_sampler
from flexsample.synthetic import planted_case


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


def rel_max(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).abs().max() / ref.double().abs().max())


def rel_rmse(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).norm() / ref.double().norm())


# ---------------------------------------------------------------------------------------------
# correctness


def check_correctness(device: torch.device, dry: bool) -> list[dict]:
    rows: list[dict] = []
    sampler = resolve_sampler("auto", device)
    shapes = [
        (1, 4, 2, 1000, 64, 64),
        (2, 6, 2, 777, 128, 128),
        (1, 32, 8, 2053, 128, 128),
        (1, 3, 3, 517, 80, 32),
    ]
    if dry:
        shapes = shapes[:2]
    for B, Hq, Hkv, S, D, bs in shapes:
        cfg = fs.SampleConfig(
            block_size=bs, min_window=bs, window_ratio=0.05, num_segments=5, sample_ratio=0.1
        )
        layout = SampleLayout.create(S, cfg)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            q = torch.randn(B, Hq, S, D, device=device, dtype=dtype)
            k = torch.randn(B, Hkv, S, D, device=device, dtype=dtype)
            ref = fs.sample_block_scores_reference(q, k, layout, D**-0.5)
            got = run_sampler(sampler, q, k, layout, D**-0.5)
            err = rel_max(got, ref)
            rows.append(
                {
                    "check": f"{sampler} sampler vs float64 oracle",
                    "dtype": str(dtype),
                    "shape": f"B{B} H{Hq}/{Hkv} S{S} D{D} bs{bs}",
                    "error": err,
                    "metric": "rel max",
                    "bound": 1e-4,
                    "ok": err < 1e-4,
                }
            )

    # Long length: the kernel against the chunked torch path (both exact float32 arithmetic).
    S_long = 4096 if dry else 32768
    q, k, _, cfg = planted_case(
        0.1, 1, 32, 8, S_long, 128, dtype=torch.bfloat16, device=device, seed=1
    )
    layout = SampleLayout.create(S_long, cfg)
    got = run_sampler(sampler, q, k, layout, 128**-0.5)
    ref = fs.sample_block_scores_torch(q, k, layout, 128**-0.5)
    err = rel_max(got, ref)
    rows.append(
        {
            "check": f"{sampler} sampler vs torch sampler",
            "dtype": "torch.bfloat16",
            "shape": f"B1 H32/8 S{S_long} D128 bs128",
            "error": err,
            "metric": "rel max",
            "bound": 1e-4,
            "ok": err < 1e-4,
        }
    )

    # Compiled sparse flex against its eager float64 oracle, random layouts.
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        B, Hq, Hkv, S, D, bs = 2, 8, 2, 1000, 128, 128
        q = torch.randn(B, Hq, S, D, device=device, dtype=dtype)
        k = torch.randn(B, Hkv, S, D, device=device, dtype=dtype)
        v = torch.randn(B, Hkv, S, D, device=device, dtype=dtype)
        lay = SampleLayout.create(
            S, fs.SampleConfig(block_size=bs, min_window=bs, window_ratio=0.0)
        )
        keep = fs.block_layout(torch.rand(B, Hq, lay.num_blocks, device=device) < 0.4, lay)
        got = fs.sparse_attention(q, k, v, fs.block_mask_from_layout(keep, S, bs), D**-0.5)
        ref = fs.sparse_attention_reference(q.double(), k.double(), v.double(), keep, bs, D**-0.5)
        tile = torch.arange(S, device=device) // bs
        allowed = (
            keep[:, :, tile][:, :, :, tile]
            & torch.ones(S, S, dtype=torch.bool, device=device).tril()
        )
        base = F.scaled_dot_product_attention(
            q,
            k.repeat_interleave(4, 1),
            v.repeat_interleave(4, 1),
            attn_mask=allowed,
            scale=D**-0.5,
        )
        err, bound = rel_rmse(got, ref), 2 * rel_rmse(base, ref) + 1e-6
        rows.append(
            {
                "check": "compiled sparse flex vs float64 oracle",
                "dtype": str(dtype),
                "shape": f"B{B} H{Hq}/{Hkv} S{S} D{D} bs{bs}",
                "error": err,
                "metric": "rel rmse",
                "bound": bound,
                "ok": err <= bound,
            }
        )

    # The whole call with a dense-equivalent config against SDPA.
    for dtype in (torch.float32, torch.bfloat16):
        B, Hq, Hkv, S, D = 1, 32, 8, 2048 if dry else 4099, 128
        q = torch.randn(B, Hq, S, D, device=device, dtype=dtype)
        k = torch.randn(B, Hkv, S, D, device=device, dtype=dtype)
        v = torch.randn(B, Hkv, S, D, device=device, dtype=dtype)
        out = fs.flex_sample_attention(q, k, v, config=fs.SampleConfig.dense_equivalent())
        ref = F.scaled_dot_product_attention(
            q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True
        )
        base = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        err = rel_rmse(out, ref)
        bound = 1e-4 if dtype == torch.float32 else 2 * rel_rmse(base, ref) + 1e-6
        rows.append(
            {
                "check": "flex_sample_attention(dense-equivalent) vs SDPA",
                "dtype": str(dtype),
                "shape": f"B{B} H{Hq}/{Hkv} S{S} D{D}",
                "error": err,
                "metric": "rel rmse",
                "bound": bound,
                "ok": err <= bound,
            }
        )
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


def dense_sdpa(backend: SDPBackend, q, k, v):
    group = q.shape[1] // k.shape[1]
    # Not every backend takes enable_gqa: give it expanded K/V, made outside the timed region.
    k_full, v_full = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)

    def run():
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k_full, v_full, is_causal=True)

    return run


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def causal_block_mask(seq_len: int, block_size: int, device: torch.device) -> BlockMask:
    """Dense causal BlockMask from tile indices (create_block_mask materialises S x S)."""
    n = math.ceil(seq_len / block_size)
    rows = torch.arange(n, device=device, dtype=torch.int32)
    full_idx = rows.expand(n, n).contiguous()[None, None]  # tiles 0..i-1 are full for row i
    diag_idx = torch.zeros(1, 1, n, n, dtype=torch.int32, device=device)
    diag_idx[0, 0, :, 0] = rows
    return BlockMask.from_kv_blocks(
        torch.ones(1, 1, n, dtype=torch.int32, device=device),
        diag_idx,
        rows[None, None].clone(),
        full_idx,
        BLOCK_SIZE=block_size,
        mask_mod=causal,
        seq_lengths=(seq_len, seq_len),
    )


def time_dense(q, k, v, scale, measure) -> dict[str, float | None]:
    """Dense causal baselines in milliseconds (None where a backend cannot run the case)."""
    device = q.device
    backends = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION}
    if device.type != "cuda":
        backends = {"sdpa_cpu": SDPBackend.FLASH_ATTENTION}  # PyTorch's CPU flash kernel
    times: dict[str, float | None] = {}
    for name, backend in backends.items():
        try:
            times[name] = measure(dense_sdpa(backend, q, k, v))
        except RuntimeError as e:  # backend unavailable for this shape/dtype
            print(f"  {name} unavailable: {str(e).splitlines()[0][:120]}")
            times[name] = None
    flex = compiled_flex_attention()
    mask = causal_block_mask(q.shape[2], 128, device)
    times["flex_dense"] = measure(
        lambda: flex(q, k, v, block_mask=mask, scale=scale, enable_gqa=True)
    )
    return times


def time_flexsample(q, k, v, cfg: fs.SampleConfig, measure) -> dict[str, float]:
    """Each flexsample stage and the whole call, in milliseconds, plus the density reached."""
    S, scale = q.shape[2], q.shape[-1] ** -0.5
    layout = SampleLayout.create(S, cfg)
    sampler = resolve_sampler(cfg.sampler, q.device)
    scores = run_sampler(sampler, q, k, layout, scale)
    stripes = fs.select_blocks(scores, cfg.alpha)
    keep = fs.block_layout(stripes, layout)
    mask = fs.block_mask_from_layout(keep, S, cfg.block_size)
    return {
        "density": float(fs.density(keep).mean()),
        "sample_ms": measure(lambda: run_sampler(sampler, q, k, layout, scale)),
        "select_ms": measure(lambda: fs.select_blocks(scores, cfg.alpha)),
        "mask_ms": measure(
            lambda: fs.block_mask_from_layout(fs.block_layout(stripes, layout), S, cfg.block_size)
        ),
        "attention_ms": measure(lambda: fs.sparse_attention(q, k, v, mask, scale)),
        "flexsample_total_ms": measure(lambda: fs.flex_sample_attention(q, k, v, config=cfg)),
    }


def tune_sampler(device: torch.device, measure) -> list[dict]:
    """Time the Triton sampler's launch configurations on one long planted case."""
    if device.type != "cuda":
        return []
    from flexsample.sampling.triton_kernel import sample_block_scores_triton

    S = 65536
    q, k, _, cfg = planted_case(0.1, 1, 32, 8, S, 128, dtype=torch.bfloat16, device=device, seed=0)
    layout = SampleLayout.create(S, cfg)
    rows = []
    for block_m, block_n, warps in [
        (64, 64, 4),
        (64, 128, 4),
        (64, 128, 8),
        (128, 64, 8),
        (128, 128, 8),
        (32, 64, 4),
    ]:
        ms = measure(
            lambda bm=block_m, bn=block_n, w=warps: sample_block_scores_triton(
                q, k, layout, 128**-0.5, block_m=bm, block_n=bn, num_warps=w
            )
        )
        rows.append(
            {
                "seq_len": S,
                "block_m": block_m,
                "block_n": block_n,
                "num_warps": warps,
                "sample_ms": ms,
            }
        )
        print(
            f"  sampler block_m={block_m} block_n={block_n} warps={warps}: {ms:.3f} ms", flush=True
        )
    return rows


def speed(
    device: torch.device,
    lengths: list[int],
    densities: list[float],
    heads: tuple,
    measure,
    tflops: float | None,
) -> list[dict]:
    Hq, Hkv, D = heads
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows: list[dict] = []
    for S in lengths:
        causal_flops = 4 * Hq * D * S * (S + 1) / 2
        q, k, v, _ = planted_case(0.1, 1, Hq, Hkv, S, D, dtype=dtype, device=device, seed=0)
        dense = time_dense(q, k, v, D**-0.5, measure)
        for target in densities:
            q, k, v, cfg = planted_case(
                target, 1, Hq, Hkv, S, D, dtype=dtype, device=device, seed=0
            )
            row = {
                "seq_len": S,
                "heads": f"{Hq}/{Hkv}",
                "head_dim": D,
                "dtype": str(dtype),
                "target_density": target,
                "sampler": resolve_sampler(cfg.sampler, device),
                **time_flexsample(q, k, v, cfg, measure),
                **{f"{name}_ms": t for name, t in dense.items()},
            }
            row["floor_ms"] = causal_flops * row["density"] / (tflops * 1e9) if tflops else None
            ref = dense.get("sdpa_flash") or dense.get("sdpa_cpu")
            if ref:
                row["speedup_vs_sdpa"] = ref / row["flexsample_total_ms"]
                overhead = row["sample_ms"] + row["select_ms"] + row["mask_ms"]
                row["overhead_vs_sdpa"] = overhead / ref
            rows.append(row)
            print(
                "  "
                + " ".join(
                    f"{key}={val:.3f}" if isinstance(val, float) else f"{key}={val}"
                    for key, val in row.items()
                ),
                flush=True,
            )
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def markdown(meta: dict, checks: list[dict], rows: list[dict]) -> str:
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
        "### Speed (ms, median; planted inputs)",
        "",
        "| S | target | density | sample | select | mask | attention | flexsample | "
        "SDPA flash | SDPA cuDNN | flex dense | floor | speedup vs flash | "
        "overhead/flash |",
        "|" + "---|" * 14,
    ]

    def f(x):
        return "n/a" if x is None else f"{x:.2f}"

    for r in rows:
        out.append(
            f"| {r['seq_len']} | {r['target_density']:.2f} | {r['density']:.3f} | "
            f"{f(r['sample_ms'])} | {f(r['select_ms'])} | {f(r['mask_ms'])} | "
            f"{f(r['attention_ms'])} | {f(r['flexsample_total_ms'])} | "
            f"{f(r.get('sdpa_flash_ms') or r.get('sdpa_cpu_ms'))} | "
            f"{f(r.get('sdpa_cudnn_ms'))} | {f(r['flex_dense_ms'])} | {f(r['floor_ms'])} | "
            f"{f(r.get('speedup_vs_sdpa'))}x | {100 * r.get('overhead_vs_sdpa', 0):.1f}% |"
        )
    return "\n".join(out) + "\n"


def _git_commit() -> str | None:
    import subprocess

    try:
        return subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"], text=True, stderr=subprocess.DEVNULL
        ).strip()
    except (OSError, subprocess.CalledProcessError):
        return None


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
        help="sequence lengths (default 8K 32K 64K 128K; dry run 2K 4K)",
    )
    p.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.5])
    p.add_argument("--skip-correctness", action="store_true")
    args = p.parse_args(argv)

    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device; use --dry-run to check the script on CPU")
    lengths = args.lengths or ([2048, 4096] if args.dry_run else [8192, 32768, 65536, 131072])
    heads = (8, 2, 64) if args.dry_run else (32, 8, 128)
    measure = timer(device, warmup=1 if args.dry_run else 2, reps=3 if args.dry_run else 5)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    meta = {
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "python": sys.version.split()[0],
        "heads": heads,
        "dry_run": args.dry_run,
        # A device machine may get the working tree without .git: FLEXSAMPLE_COMMIT names it.
        "commit": _git_commit() or os.environ.get("FLEXSAMPLE_COMMIT"),
        "command": "python3 bench/gpu_run.py " + " ".join(argv or sys.argv[1:]),
    }
    meta["matmul_tflops"] = matmul_tflops(device, measure)
    print(json.dumps(meta), flush=True)
    checks = [] if args.skip_correctness else check_correctness(device, args.dry_run)
    for c in checks:
        print(
            f"  {'ok ' if c['ok'] else 'BAD'} {c['check']} {c['dtype']} {c['shape']}: "
            f"{c['error']:.2e} <= {c['bound']:.1e}",
            flush=True,
        )
    tuning = tune_sampler(device, measure)
    rows = speed(device, lengths, args.densities, heads, measure, meta["matmul_tflops"])
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "dry_run" if args.dry_run else meta["device"].replace(" ", "_")
    (args.out / f"gpu_{tag}.json").write_text(
        json.dumps(
            {"meta": meta, "correctness": checks, "sampler_tuning": tuning, "speed": rows},
            indent=1,
        )
    )
    (args.out / f"gpu_{tag}.md").write_text(markdown(meta, checks, rows))
    print(markdown(meta, checks, rows))
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
