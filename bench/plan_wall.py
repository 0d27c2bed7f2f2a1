"""Wall time of one ``flexsample.plan_prefill`` call, eager and with CUDA-graph replay.

Planning always sparse (``min_seq_len=0, max_density=1.0``) on planted single-token stripes
and random q/k in the Llama-3-8B attention shape (32 query heads, 8 kv heads, D=128, bf16):
per length and input, the median wall clock of ``--calls`` plans (the device synchronised
before and after each, after two warm-up plans that capture the graphs), first with
``FLEXSAMPLE_CUDA_GRAPHS=0``, then with graphs, in turn within one run.

    PYTHONPATH=. python3 bench/plan_wall.py --lengths 16384 32768 131072
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from gpu_run import INPUTS, bench_shape, make_inputs
from report import write_rows

import flexsample as fs
from flexsample import graphs
from flexsample.provenance import code_commit

CONFIG = fs.SampleConfig(min_seq_len=0, max_density=1.0)


def plan_ms(q: torch.Tensor, k: torch.Tensor, calls: int, use_graphs: bool) -> float:
    """Median wall milliseconds of a plan, with or without graph replay (CPU: both eager)."""
    cuda = q.device.type == "cuda"
    with graphs.use_graphs(use_graphs):
        samples = []
        for i in range(2 + calls):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            fs.plan_prefill(q, k, CONFIG)
            if cuda:
                torch.cuda.synchronize()
            if i >= 2:
                samples.append((time.perf_counter() - start) * 1e3)
        return statistics.median(samples)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768, 131072])
    p.add_argument("--calls", type=int, default=10, help="timed plans per row (median)")
    p.add_argument("--dry-run", action="store_true", help="CPU, a small shape (no graphs)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    device, (Hq, Hkv, D), dtype = bench_shape(args.dry_run)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    meta = {"commit": code_commit(), "torch": torch.__version__, "device": name}
    print(json.dumps(meta))
    print("| S | input | eager plan ms | graphs plan ms | eager / graphs |")
    print("|---|---|---|---|---|")
    rows = []
    for S in args.lengths:
        for name in INPUTS:
            q, k, _ = make_inputs(name, Hq, Hkv, S, D, dtype, device)
            eager = plan_ms(q, k, args.calls, use_graphs=False)
            replayed = plan_ms(q, k, args.calls, use_graphs=True)
            rows.append({"S": S, "input": name, "eager_ms": eager, "graphs_ms": replayed})
            print(f"| {S} | {name} | {eager:.3f} | {replayed:.3f} | {eager / replayed:.2f}x |")
    if args.json:
        write_rows(args.json, meta, rows)


if __name__ == "__main__":
    main()
