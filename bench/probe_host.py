"""What the probe costs the host and the device, per implementation, at one length.

On an H200 the host's work per launch (about 27 microseconds a torch operation) set the
probe's cost at 32K tokens, not the device's: the calibrated model said a fixed 1.1-1.3 ms.
This times, in the Llama-3-8B attention shape (32 query heads on 8 kv heads, D=128, bf16,
planted single-token stripes), each probe implementation's host time per call (calls queued
without synchronising, median of 5 rounds) and its wall time per call (synchronised), a
bare torch operation and a bare Triton launch for scale, and profiles the host side of the
plan's probe (cProfile).

    PYTHONPATH=. python3 bench/probe_host.py --lengths 32768 131072
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import json
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch
from gpu_run import make_inputs
from report import write_rows

import flexsample as fs
from flexsample.probe import probe_density, probe_rows
from flexsample.provenance import provenance
from flexsample.sampling import triton_available


def per_call(fn, sync, calls: int, rounds: int = 5) -> tuple[float, float]:
    """``(host us, wall ms)`` per call: queued without syncs, then one synchronised call at
    a time (medians of ``rounds`` rounds)."""
    fn()
    sync()
    host, wall = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        host.append((time.perf_counter() - start) / calls * 1e6)
        sync()
        start = time.perf_counter()
        for _ in range(max(1, calls // 10)):
            fn()
            sync()
        wall.append((time.perf_counter() - start) / max(1, calls // 10) * 1e3)
    return statistics.median(host), statistics.median(wall)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--dry-run", action="store_true", help="CPU, a small shape, one round")
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    cuda = not args.dry_run
    device = torch.device("cuda" if cuda else "cpu")
    Hq, Hkv, D = (32, 8, 128) if cuda else (4, 2, 32)
    dtype = torch.bfloat16 if cuda else torch.float32
    meta = {**provenance(), "device": torch.cuda.get_device_name() if cuda else "cpu"}
    print(json.dumps(meta), flush=True)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    tiny = torch.zeros(8, device=device)
    fns = {"torch op (tiny add_)": lambda: tiny.add_(1)}
    rows = []
    print("| S | what | host us per call | wall ms per call |")
    print("|---|---|---|---|")
    for S in args.lengths if cuda else [256]:
        q, k, _ = make_inputs("single-token stripes", Hq, Hkv, S, D, dtype, device)
        layout = fs.SampleLayout.create(S, fs.SampleConfig())
        alpha, scale = fs.SampleConfig().alpha, D**-0.5
        args_at = (q, k, layout, fs.SampleConfig().alpha, D**-0.5)
        fns["probe, torch (sorted rows)"] = functools.partial(probe_density, *args_at)
        if triton_available() and (cuda or os.environ.get("TRITON_INTERPRET") == "1"):
            from flexsample.sampling.triton_probe import probe_needs_triton

            plan_probe = functools.partial(probe_density, *args_at, triton=True)
            fns["probe, Triton (histogram; the plan's)"] = plan_probe
            q_, k_, layout_, alpha, scale = args_at
            rows_at = probe_rows(layout, device)
            fns["  its three kernels alone"] = functools.partial(
                probe_needs_triton, q_, k_, layout_, rows_at, alpha, scale
            )
        for name, fn in fns.items():
            host, wall = per_call(fn, sync, *((args.calls, 5) if cuda else (1, 1)))
            rows.append({"S": S, "what": name, "host_us": host, "wall_ms": wall})
            print(f"| {S} | {name} | {host:.1f} | {wall:.3f} |", flush=True)
        if "probe, Triton (histogram; the plan's)" in fns:
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(args.calls if cuda else 1):
                fns["probe, Triton (histogram; the plan's)"]()
            profiler.disable()
            sync()
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(15)
            root = str(Path(__file__).resolve().parents[1]) + os.sep
            print(text.getvalue().replace(root, "").replace(sys.prefix + os.sep, ""))
    if args.json:
        write_rows(args.json, meta, rows)


if __name__ == "__main__":
    main()
