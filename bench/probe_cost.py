"""What the probe costs: ``flexsample.probe.probe_density`` against the sampling stage, per length.

The probe decides dense or sparse before sampling; it must cost a small part of what it saves.
This times it (wall clock with device syncs, median of interleaved rounds) beside
``run_sampler`` (stage 1, which the probe precedes) at the defaults' layout, on planted
single-token stripes and on random q/k, in the Llama-3-8B attention shape (32 query heads, 8
kv heads, D=128, bf16) on CUDA, or a small shape on CPU (``--dry-run``).

    PYTHONPATH=. python3 bench/probe_cost.py --lengths 32768 131072

With ``--vs-selection`` it prints, instead of times, the probe's estimate beside the density
the default selection reaches (planned always sparse) on the frontier benchmark's planted
structures and random q/k (8 query heads on 2 kv heads, D=64, float32, CPU):

    PYTHONPATH=. python3 bench/probe_cost.py --vs-selection --lengths 2048 8192
"""

from __future__ import annotations

import argparse
import functools
import json
import math

import torch
from gpu_run import bench_shape

import flexsample as fs
from flexsample.probe import probe_density
from flexsample.provenance import code_commit
from flexsample.sampling import resolve_sampler, run_sampler
from flexsample.synthetic import planted_qkv
from flexsample.testing import random_qkv
from flexsample.timing import interleaved_medians


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--dry-run", action="store_true", help="CPU, a small shape")
    p.add_argument(
        "--vs-selection",
        action="store_true",
        help="CPU: the estimate beside the selection's density on planted structures",
    )
    args = p.parse_args(argv)
    if args.vs_selection:
        estimate_vs_selection(args.lengths)
        return
    device, (Hq, Hkv, D), dtype = bench_shape(args.dry_run)
    config = fs.SampleConfig()
    sampler = resolve_sampler(config.sampler, device)
    print(json.dumps({"commit": code_commit(), "torch": torch.__version__, "device": str(device)}))
    for S in args.lengths:
        layout = fs.SampleLayout.create(S, config)
        inputs = {
            "single-token stripes": planted_qkv(
                1, Hq, Hkv, S, D, stripes=(16, 32), stripe_width=1, seed=0, dtype=dtype,
                device=device, signal=max(10.0, math.log(100 * S / 64)),
            ),
            "random q/k": random_qkv(1, Hq, Hkv, S, D, dtype, device),
        }  # fmt: skip
        for name, (q, k, _) in inputs.items():
            calls = [
                functools.partial(probe_density, q, k, layout, config.alpha, D**-0.5),
                functools.partial(run_sampler, sampler, q, k, layout, D**-0.5),
            ]
            probe_s, sample_s = interleaved_medians(calls, device, args.rounds)
            estimate = float(probe_density(q, k, layout, config.alpha, D**-0.5).mean())
            print(
                f"S={S} {name}: probe {probe_s * 1e3:.2f} ms (estimate {estimate:.3f}), "
                f"sampling {sample_s * 1e3:.2f} ms ({sampler})",
                flush=True,
            )


def estimate_vs_selection(lengths: list[int]) -> None:
    """The probe's estimate and the default selection's density, per planted structure."""
    from test_frontier import STRUCTURES  # bench/ is the script's directory

    D = 64
    config = fs.SampleConfig.always_sparse()
    print(json.dumps({"commit": code_commit(), "torch": torch.__version__, "device": "cpu"}))
    for S in lengths:
        cases = {name: planted_qkv(1, 8, 2, S, D, seed=1, **kw) for name, kw in STRUCTURES.items()}
        torch.manual_seed(0)
        cases["random q/k"] = random_qkv(1, 8, 2, S, D)
        for name, (q, k, _) in cases.items():
            plan = fs.plan_prefill(q, k, config)
            estimate = float(probe_density(q, k, plan.layout, config.alpha, D**-0.5).mean())
            selected = float(plan.density.mean())
            print(
                f"S={S} {name}: estimate {estimate:.3f}, selection {selected:.3f} "
                f"({estimate / selected:.2f}x)",
                flush=True,
            )


if __name__ == "__main__":
    main()
