"""The defaults against causal SDPA on this CPU, as a machine flexsample has not seen meets it.

    PYTHONPATH=. python3 bench/cpu_defaults.py --out bench/results [--foreign TABLE]

Three parts, written to ``cpu_defaults_<device>.{json,md}``:

* **the defaults vs SDPA**: ``flex_sample_attention`` at the defaults (the cost model
  decides sparse or dense; planning included) against causal SDPA, on random q/k/v (diffuse:
  dense must win) and on two planted inputs (moderate locality with stripes; single-token
  columns), at 4K-32K, GQA 8/2, D 64, float32: medians of interleaved rounds, and the output
  error against SDPA. Each round also times SDPA a second time (an A/A control): the ratio
  of SDPA's two medians is this run's noise floor, printed beside each row. With
  ``--foreign``, the cost tables are those of a machine that never ran flexsample: the
  built-in table replaced by ``TABLE`` (another CPU's), an empty user cache, the first-use
  calibration on, so the first call measures this machine (its time is reported) and every
  decision after it rests on that.
* **the sparse call per computed pair**: the same planted inputs planned always sparse, the
  call alone on FlexAttention's kernel (``"triton"``) and on the gathered products
  (``"gather"``), in seconds per computed pair over SDPA's per causal pair.
* **the fused CPU kernel per pair at tile shapes**: what the gathered products' calls cost
  (query tiles of R rows over K keys, a batch covering 8K queries of 8 heads) in seconds per
  pair over causal SDPA's per causal pair at 8K: the floor of the gathered products.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

import flexsample as fs
from flexsample import costs
from flexsample.backends import resolve_backend
from flexsample.provenance import code_commit
from flexsample.synthetic import planted_qkv, single_token_stripes
from flexsample.testing import random_qkv, rel_rmse
from flexsample.timing import interleaved_medians

HEADS = (8, 2, 64)
INPUTS = ("random", "planted", "stripes")


def inputs(kind: str, S: int) -> tuple[torch.Tensor, ...]:
    Hq, Hkv, D = HEADS
    if kind == "random":
        torch.manual_seed(0)
        return random_qkv(1, Hq, Hkv, S, D)
    if kind == "planted":  # local topics about 1K wide, 8 stripes of 4 keys per kv head
        return planted_qkv(1, Hq, Hkv, S, D, locality=3.0, local_span=1024, seed=1)
    return single_token_stripes(Hq, Hkv, S, D)


def sdpa(q, k, v):
    return fs.dense_causal_attention(q, k, v, q.shape[-1] ** -0.5)


def defaults_vs_sdpa(lengths: list[int], rounds: int) -> list[dict]:
    rows = []
    for S in lengths:
        for kind in INPUTS:
            q, k, v = inputs(kind, S)
            call = functools.partial(fs.flex_sample_attention, q, k, v)
            dense = functools.partial(sdpa, q, k, v)
            # SDPA twice per round: what two identical calls' medians differ by is the noise.
            dense_s, flex_s, control_s = interleaved_medians(
                [dense, call, dense], torch.device("cpu"), rounds
            )
            out, stats = fs.flex_sample_attention(q, k, v, return_stats=True)
            row = {
                "seq_len": S,
                "input": kind,
                "sdpa_ms": dense_s * 1e3,
                "defaults_ms": flex_s * 1e3,
                "speedup": dense_s / flex_s,
                "sdpa_again_ms": control_s * 1e3,
                "control": dense_s / control_s,
                "path": stats.path,
                "backend": stats.backend,
                "density": stats.mean_density,
                "rel_rmse": rel_rmse(out, sdpa(q, k, v)),
                "reason": stats.reason,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def per_pair(lengths: list[int], rounds: int) -> list[dict]:
    rows = []
    config = fs.SampleConfig.always_sparse()
    for S in lengths:
        for kind in ("planted", "stripes"):
            q, k, v = inputs(kind, S)
            plans = {
                b: fs.plan_prefill(q, k, config.replace(backend=b)) for b in ("triton", "gather")
            }
            fns = [functools.partial(sdpa, q, k, v)]
            fns += [functools.partial(fs.run_plan, p, q, k, v) for p in plans.values()]
            dense_s, *sparse_s = interleaved_medians(fns, torch.device("cpu"), rounds)
            density = float(plans["gather"].density.mean())
            row = {"seq_len": S, "input": kind, "density": density, "sdpa_ms": dense_s * 1e3}
            for backend, seconds in zip(plans, sparse_s, strict=True):
                row[f"{backend}_ms"] = seconds * 1e3
                row[f"{backend}_per_pair"] = seconds / (density * dense_s)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


#: ``(rows, keys)`` of the fused kernel's calls timed per pair: the gathered products' window
#: calls are 128-row tiles over (window + 1) blocks.
TILE_SHAPES = ((128, 512), (128, 640), (128, 1024), (256, 768), (768, 1024), (1024, 1536))


def kernel_shapes(rounds: int, shapes=TILE_SHAPES, S: int = 8192) -> list[dict]:
    """Seconds per pair of the fused CPU kernel at tile shapes (enough tiles for ``S``
    queries of every head), over causal SDPA's per causal pair at ``S`` (one interleaved
    measurement)."""
    from flexsample.products import attend_with_lse

    torch.manual_seed(0)
    Hq, Hkv, D = HEADS
    q, k, v = random_qkv(1, Hq, Hkv, S, D)
    fns = [functools.partial(sdpa, q, k, v)]
    for R, K in shapes:
        tiles = [torch.randn(Hq * S // R, 1, n, D) for n in (R, K, K)]
        fns.append(functools.partial(attend_with_lse, *tiles, D**-0.5))
    dense_s, *tile_s = interleaved_medians(fns, torch.device("cpu"), rounds)
    dense_pair = dense_s / (Hq * S * (S + 1) / 2)
    return [
        {"rows": R, "keys": K, "per_pair": seconds / (Hq * S * K) / dense_pair}
        for (R, K), seconds in zip(shapes, tile_s, strict=True)
    ]


def markdown(meta: dict, rows: list[dict], pairs: list[dict], shapes: list[dict] = ()) -> str:
    lines = [
        f"# The defaults vs causal SDPA: {meta['device']}",
        "",
        f"`{meta['command']}` at {meta['commit']}, torch {meta['torch']}, {meta['threads']} "
        f"threads, GQA {HEADS[0]}/{HEADS[1]}, D {HEADS[2]}, float32; medians of "
        f"{meta['rounds']} interleaved rounds after a warm-up call.",
        "",
        f"Cost model: {meta['cost_source']}.",
    ]
    if meta.get("first_use_s") is not None:
        lines.append(
            f"The cost tables were another machine's ({meta['foreign']}); the first call "
            f"measured this one in {meta['first_use_s']:.1f} s (first-use calibration)."
        )
    lines += [
        "",
        "A/A: SDPA's median over its own second median in the same rounds, the noise floor "
        "of the row's speedup.",
        "",
        "| S | input | SDPA ms | defaults ms | speedup | A/A | path | backend | density "
        "| rel. RMSE |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        control = f"{r['control']:.2f}x" if "control" in r else "-"
        lines.append(
            f"| {r['seq_len']} | {r['input']} | {r['sdpa_ms']:.1f} | {r['defaults_ms']:.1f} | "
            f"{r['speedup']:.2f}x | {control} | {r['path']} | {r['backend'] or 'SDPA'} | "
            f"{r['density']:.3f} | {r['rel_rmse']:.2e} |"
        )
    if pairs:
        lines += [
            "",
            "The sparse call alone (planned always sparse), seconds per computed pair over "
            "SDPA's per causal pair:",
            "",
            "| S | input | density | SDPA ms | triton ms | per pair | gather ms | per pair |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in pairs:
            lines.append(
                f"| {r['seq_len']} | {r['input']} | {r['density']:.3f} | {r['sdpa_ms']:.1f} | "
                f"{r['triton_ms']:.1f} | {r['triton_per_pair']:.2f}x | {r['gather_ms']:.1f} | "
                f"{r['gather_per_pair']:.2f}x |"
            )
    if shapes:
        lines += [
            "",
            "PyTorch's fused CPU kernel (the gathered products' calls) at tile shapes, seconds "
            "per pair over causal SDPA's per causal pair at 8K (one interleaved measurement):",
            "",
            "| query rows | keys | per pair |",
            "| --- | --- | --- |",
        ]
        lines += [f"| {r['rows']} | {r['keys']} | {r['per_pair']:.2f}x |" for r in shapes]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the JSON and Markdown")
    p.add_argument(
        "--foreign",
        type=Path,
        default=None,
        metavar="TABLE",
        help="run as a machine without a calibration of its own whose built-in table is "
        "TABLE's (e.g. tests/data/costs_sparse_cheap_cpu.json): the first call measures it",
    )
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    p.add_argument("--pair-lengths", type=int, nargs="*", default=[8192, 16384])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dry-run", action="store_true", help="1K-2K, one round: check the script")
    args = p.parse_args(argv)
    if args.dry_run:
        args.lengths, args.pair_lengths, args.rounds = [1024, 2048], [2048], 1
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    cpu = torch.device("cpu")
    backend = resolve_backend("auto", cpu, torch.float32, HEADS[2])
    meta = {
        "device": costs.device_name(cpu),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "commit": code_commit(),
        "rounds": args.rounds,
        "command": shlex.join(["python3", "bench/cpu_defaults.py", *(argv or sys.argv[1:])]),
        "foreign": None if args.foreign is None else args.foreign.name,
        "first_use_s": None,
    }
    with tempfile.TemporaryDirectory() as cache:
        if args.foreign is not None:
            costs.BUILTIN = args.foreign.resolve()
            os.environ["FLEXSAMPLE_CACHE_DIR"] = cache
            os.environ.pop(costs.FORCED_TABLE_ENV, None)
            os.environ[costs.AUTO_CALIBRATE_ENV] = "1"
            costs.clear_cache()
            start = time.perf_counter()
            model = costs.cost_model(cpu, torch.float32, backend)
            meta["first_use_s"] = time.perf_counter() - start
        else:
            model = costs.cost_model(cpu, torch.float32, backend)
        meta["cost_source"] = model.source
        meta["cost_model"] = model.to_json()
        with torch.no_grad():
            rows = defaults_vs_sdpa(args.lengths, args.rounds)
            pairs = per_pair(args.pair_lengths, args.rounds)
            shapes = (
                kernel_shapes(1, TILE_SHAPES[:1], S=2048)
                if args.dry_run
                else kernel_shapes(args.rounds)
            )
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "dry_run" if args.dry_run else meta["device"].replace(" ", "_")
    results = {"meta": meta, "defaults": rows, "per_pair": pairs, "kernel_shapes": shapes}
    (args.out / f"cpu_defaults_{tag}.json").write_text(json.dumps(results, indent=1))
    (args.out / f"cpu_defaults_{tag}.md").write_text(markdown(meta, rows, pairs, shapes))
    print(markdown(meta, rows, pairs, shapes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
