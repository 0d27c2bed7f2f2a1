"""Where planning's time goes: per stage, wall time, device busy time, launches and syncs.

Each stage of ``flexsample.plan_prefill`` (probe, sample, select, cover, mask) is named for
torch.profiler by the plan's ``StageTimer``; this profiles ``--calls`` plans per length and
input (after a warm-up plan) and attributes to every stage:

* wall: the stage's wall clock (the timer synchronises the device around it);
* device: the time the device was busy with its kernels (where that is far below wall, the
  stage is bound by the host: launches, syncs, Python), and its most expensive kernels;
* launches: kernel launches (CUDA), or ATen operators on CPU (``--dry-run``);
* syncs: calls that wait for the device (stream/device synchronisations and device-to-host
  copies such as ``.item()``, ``nonzero``, ``int(tensor)``).

Inputs: ``bench/speed.py``'s (planted single-token stripes, random q/k, regional stripes;
``--inputs`` picks) in the Llama-3-8B attention shape (32 query heads, 8 kv heads, D=128,
bf16), planned at the defaults, always sparse (where the defaults choose dense attention the
later stages do not run) and always sparse with query-aware tile keys (``--configs`` picks).

    PYTHONPATH=.:bench python3 bench/plan_stages.py --lengths 8192 32768 131072
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections import defaultdict

import torch
from report import write_rows
from speed import INPUTS, bench_shape, make_inputs
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import flexsample as fs
from flexsample import graphs
from flexsample.provenance import code_commit
from flexsample.timing import StageTimer

#: Host calls that wait for the device.
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
LAUNCH_EVENTS = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")

#: Kernels listed per stage, by device time (on CPU: operators, by host time).
TOP_OPS = 6

CONFIGS = {
    "defaults": fs.SampleConfig(),
    "always sparse": fs.SampleConfig(min_seq_len=0, max_density=1.0),
    "always sparse, tile keys 256": fs.SampleConfig.always_sparse(backend="triton").replace(
        tile_keys=256
    ),
}


def _short(name: str) -> str:
    """A kernel's name without its template arguments."""
    return name.split("<", 1)[0].split("(", 1)[0][:60]


def _descendants(event):
    for child in event.cpu_children:
        yield child
        yield from _descendants(child)


def _device_time_per_range(prof) -> dict[tuple[str, int], tuple[float, dict[str, float]]]:
    """Per ``(range name, occurrence)``: the device's busy ms within it (the union of its
    kernels' intervals) and ms per kernel name, from the profiler's raw activity list (each
    kernel once). The stage syncs the device before and inside its range, so the kernels that
    ran within it are its own."""
    raw = prof.profiler.kineto_results.events()  # torch 2.11 and 2.13
    ranges: list[tuple[str, int, int]] = []
    kernels: dict[object, tuple[str, int, int]] = {}
    for e in raw:
        start, end = e.start_ns(), e.start_ns() + e.duration_ns()
        if e.name().startswith("flexsample::"):  # user annotation (CPU) or its GPU twin
            if e.device_type() == DeviceType.CPU:
                ranges.append((e.name(), start, end))
        elif e.device_type() == DeviceType.CUDA:
            kernels.setdefault((e.correlation_id(), e.name()), (e.name(), start, end))
    ordered = sorted(kernels.values(), key=lambda k: k[1])
    out: dict[tuple[str, int], tuple[float, dict[str, float]]] = {}
    seen: dict[str, int] = defaultdict(int)
    for name, start, end in sorted(ranges, key=lambda r: r[1]):
        busy_ns, busy_until, per_kernel = 0, start, defaultdict(float)
        for kernel, k_start, k_end in ordered:
            if k_start < start or k_end > end:
                continue
            busy_ns += max(0, k_end - max(k_start, busy_until))
            busy_until = max(busy_until, k_end)
            per_kernel[_short(kernel)] += (k_end - k_start) / 1e6
        out[(name, seen[name])] = (busy_ns / 1e6, dict(per_kernel))
        seen[name] += 1
    return out


def stage_anatomy(q, k, config, calls: int) -> tuple[str, dict[str, dict]]:
    """Profile ``calls`` plans; per stage: wall, device and host ms, launches, syncs (means)."""
    cuda = q.device.type == "cuda"
    for _ in range(1 + graphs.EAGER_CALLS):  # warm-up: compilation, caches, CUDA graphs
        fs.plan_prefill(q, k, config)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    walls: dict[str, float] = defaultdict(float)
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        for _ in range(calls):
            timer = StageTimer(q.device, enabled=True)
            plan = fs.plan_prefill(q, k, config, timer=timer)
            for name, seconds in timer.times.items():
                walls[name] += seconds
    events = prof.events()
    busy = _device_time_per_range(prof) if cuda else {}
    seen: dict[str, int] = defaultdict(int)
    stages: dict[str, dict] = {}
    for event in events:
        if not event.name.startswith("flexsample::"):
            continue
        row = stages.setdefault(
            event.name.split("::", 1)[1],
            {"device_ms": 0.0, "launches": 0, "syncs": 0, "memcpys": 0, "top": defaultdict(float)},
        )
        occurrence = (event.name, seen[event.name])
        seen[event.name] += 1
        device_ms, per_kernel = busy.get(occurrence, (0.0, {}))
        row["device_ms"] += device_ms
        for kernel, ms in per_kernel.items():
            row["top"][kernel] += ms
        for child in _descendants(event):
            if not cuda and child.name.startswith("aten::"):
                row["top"][child.name] += child.self_cpu_time_total / 1e3
            if child.name in LAUNCH_EVENTS or (not cuda and child.name.startswith("aten::")):
                row["launches"] += 1
            elif child.name in SYNC_EVENTS:
                row["syncs"] += 1
            elif child.name in ("cudaMemcpyAsync", "cudaMemcpy") and cuda:
                row["memcpys"] += 1  # most read a scalar back: a sync too
    out = {}
    for name, row in stages.items():
        top = sorted(row.pop("top").items(), key=lambda item: -item[1])[:TOP_OPS]
        out[name] = {
            "wall_ms": round(walls[name] * 1e3 / calls, 3),
            **{key: round(value / calls, 3) for key, value in row.items()},
            "top_ops_ms": {op: round(ms / calls, 3) for op, ms in top},
        }
    return plan.path, out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    p.add_argument("--calls", type=int, default=3, help="profiled plans per row (means)")
    p.add_argument("--dry-run", action="store_true", help="CPU, a small shape")
    p.add_argument("--inputs", nargs="+", choices=INPUTS, default=INPUTS, metavar="NAME")
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    device, (Hq, Hkv, D), dtype = bench_shape(args.dry_run)
    meta = {"commit": code_commit(), "torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        meta["device"] = torch.cuda.get_device_name()
    print(json.dumps(meta), flush=True)
    print(
        "| S | input | config | path | stage | wall ms | device ms | launches | syncs | memcpys |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for S in args.lengths:
        for name in args.inputs:
            q, k, _ = make_inputs(name, Hq, Hkv, S, D, dtype, device)
            for label in args.configs:
                config = CONFIGS[label]
                path, stages = stage_anatomy(q, k, config, args.calls)
                for stage, r in stages.items():
                    rows.append({"S": S, "input": name, "config": label, "stage": stage, **r})
                    print(
                        f"| {S} | {name} | {label} | {path} | {stage} | {r['wall_ms']:.2f} | "
                        f"{r['device_ms']:.2f} | {r['launches']:.0f} | {r['syncs']:.0f} | "
                        f"{r['memcpys']:.0f} |",
                        flush=True,
                    )
                    if r["top_ops_ms"]:
                        ops = ", ".join(f"{op} {ms:.2f}" for op, ms in r["top_ops_ms"].items())
                        print(f"|  |  |  |  | ({stage}: {ops}) |  |  |  |  |  |", flush=True)
    if args.json:
        configs = {k: dataclasses.asdict(c) for k, c in CONFIGS.items()}
        write_rows(args.json, meta, rows, configs=configs)


if __name__ == "__main__":
    main()
