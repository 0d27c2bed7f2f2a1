"""Several devices: heads split across ranks, and a model split by layers over GPUs.

``heads``: ``--world-size`` processes (``torch.distributed``: NCCL with one GPU each, or gloo
on CPU), each holding its share of the query heads and of the kv heads (whole GQA groups),
call ``flex_sample_attention`` on their own heads; the outputs are gathered on rank 0 and
compared with the one-process output on the same inputs (``always_sparse`` for the comparison:
the defaults' cost model may decide dense or sparse differently for fewer heads), and each
rank's time (median after warm-up, at the defaults) is reported beside the one-process time.

``layers``: a Llama-3-8B-shaped model (random weights, ``--layers`` decoder layers) whose
layers transformers' ``device_map`` spreads over the visible GPUs; prefill of ``--seq-len``
tokens plus a few greedy tokens, dense SDPA and with flexsample: times, the tokens (the same
or not), and flexsample's stats from every layer with the device it ran on.

Writes ``multi_<mode>_<device>.json`` into ``--out``. NVLink multicast stays off
(``NCCL_NVLS_ENABLE=0`` and friends are set unless already set).

    python bench/multi_gpu.py heads --world-size 2 --out bench/results         # 2 GPUs
    python bench/multi_gpu.py heads --world-size 2 --cpu --seq-len 2048 --out /tmp/x
    python bench/multi_gpu.py layers --out bench/results                       # all GPUs
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import flexsample as fs
from flexsample.synthetic import planted_case
from flexsample.testing import rel_rmse

for _name, _value in (
    ("NCCL_NVLS_ENABLE", "0"),
    ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
    ("NVSHMEM_DISABLE_NVLS", "1"),
):
    os.environ.setdefault(_name, _value)


def _sync(devices: list[torch.device]) -> None:
    for device in devices:
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def _timed(fn, devices: list[torch.device], repeats: int) -> tuple[torch.Tensor, float]:
    """``fn()`` once to warm up, then the median seconds of ``repeats`` calls (every device
    in ``devices`` synchronised around each)."""
    out = fn()
    times = []
    for _ in range(repeats):
        _sync(devices)
        start = time.perf_counter()
        out = fn()
        _sync(devices)
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


def _inputs(args, device: torch.device):
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    q, k, v, _ = planted_case(
        0.1, 1, args.q_heads, args.kv_heads, args.seq_len, args.head_dim,
        dtype=dtype, device=device, seed=args.seed,
    )  # fmt: skip
    return q, k, v


def _heads_worker(rank: int, args, port: int, result: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = not args.cpu
    device = torch.device(f"cuda:{rank}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=args.world_size)
    try:
        q, k, v = _inputs(args, device)  # the same on every rank (seeded)
        ws = args.world_size
        hq, hkv = args.q_heads // ws, args.kv_heads // ws
        mine_q, mine_kv = slice(rank * hq, (rank + 1) * hq), slice(rank * hkv, (rank + 1) * hkv)
        qr, kr, vr = (t[:, s].contiguous() for t, s in ((q, mine_q), (k, mine_kv), (v, mine_kv)))
        with torch.no_grad():
            _, seconds = _timed(
                lambda: fs.flex_sample_attention(qr, kr, vr), [device], args.repeats
            )
            sparse = fs.SampleConfig.always_sparse()
            out, stats = fs.flex_sample_attention(qr, kr, vr, config=sparse, return_stats=True)
        parts = [torch.empty_like(out) for _ in range(ws)]
        dist.all_gather(parts, out.contiguous())
        times = [None] * ws
        dist.all_gather_object(times, seconds)
        densities = [None] * ws
        dist.all_gather_object(densities, stats.mean_density)
        if rank == 0:
            with torch.no_grad():
                whole = fs.flex_sample_attention(q, k, v, config=sparse)
                _, one = _timed(lambda: fs.flex_sample_attention(q, k, v), [device], args.repeats)
                dense = torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, is_causal=True, enable_gqa=True
                )
            gathered = torch.cat(parts, dim=1)
            record = {
                "mode": "heads",
                "device": torch.cuda.get_device_name(device) if cuda else "cpu",
                "backend": "nccl" if cuda else "gloo",
                "world_size": ws,
                "shape": {
                    "q_heads": args.q_heads,
                    "kv_heads": args.kv_heads,
                    "seq_len": args.seq_len,
                    "head_dim": args.head_dim,
                    "dtype": str(q.dtype),
                },
                "gathered_vs_one_process_rel_rmse": rel_rmse(gathered, whole),
                "gathered_equals_one_process": bool(torch.equal(gathered, whole)),
                "one_process_error_vs_dense": rel_rmse(whole, dense),
                "rank_density": densities,
                "rank_seconds_defaults": times,
                "one_process_seconds_defaults": one,
            }
            result.write_text(json.dumps(record, indent=1))
    finally:
        dist.destroy_process_group()


def run_heads(args) -> dict:
    if args.q_heads % args.world_size or args.kv_heads % args.world_size:
        raise SystemExit(
            f"--world-size {args.world_size} must divide both --q-heads {args.q_heads} and "
            f"--kv-heads {args.kv_heads} (each rank holds whole GQA groups)"
        )
    if not args.cpu and torch.cuda.device_count() < args.world_size:
        raise SystemExit(
            f"--world-size {args.world_size} needs as many GPUs (NCCL: one per rank); "
            f"{torch.cuda.device_count()} visible. Use --cpu for gloo processes on CPU."
        )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = args.out / ".heads.json"
    mp.spawn(_heads_worker, args=(args, port, result), nprocs=args.world_size, join=True)
    record = json.loads(result.read_text())
    result.unlink()
    return record


def run_layers(args) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    import flexsample.integrations.transformers as fst

    gpus = torch.cuda.device_count()
    if gpus == 0:
        raise SystemExit("layers needs CUDA GPUs (device_map spreads the layers over them)")
    config = LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
        num_key_value_heads=8, num_hidden_layers=args.layers, vocab_size=32000,
        max_position_embeddings=131072, rope_theta=500000.0,
    )  # fmt: skip
    torch.manual_seed(args.seed)
    per_gpu = -(-args.layers // gpus)
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0}
    device_map |= {f"model.layers.{i}": i // per_gpu for i in range(args.layers)}
    device_map |= {"model.norm": gpus - 1, "lm_head": gpus - 1}
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    from accelerate import dispatch_model

    model = dispatch_model(model.eval(), device_map=device_map)
    ids = torch.randint(
        0, config.vocab_size, (1, args.seq_len), generator=torch.Generator().manual_seed(1)
    )
    ids = ids.to("cuda:0")

    def generate():
        with torch.no_grad():
            return model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False)

    devices = [torch.device(f"cuda:{i}") for i in range(gpus)]
    configs = {
        "dense": None,
        "flexsample": fs.SampleConfig(),
        "flexsample, always sparse": fs.SampleConfig.always_sparse(),
    }
    rows = {}
    for name, config in configs.items():
        if config is not None:
            fst.enable(model, config)
        tokens, seconds = _timed(generate, devices, args.repeats)
        row = {"seconds": seconds, "tokens": tokens[0, args.seq_len :].tolist()}
        if config is not None:
            fst.reset_stats(model)
            generate()
            row["layers"] = {
                record.layer: {
                    "device": str(next(model.model.layers[record.layer].parameters()).device),
                    "path": record.path,
                    "density": record.mean_density,
                    "reason": record.reason,
                }
                for record in fst.layer_stats(model)
                if record.is_prefill
            }
            fst.disable(model)
        rows[name] = row
    dense = rows["dense"]
    return {
        "mode": "layers",
        "device": torch.cuda.get_device_name(0),
        "gpus": gpus,
        "device_map": {k: int(v) for k, v in device_map.items()},
        "seq_len": args.seq_len,
        "new_tokens": args.new_tokens,
        "same_tokens_as_dense": {n: r["tokens"] == dense["tokens"] for n, r in rows.items()},
        "speedup_vs_dense": {n: dense["seconds"] / r["seconds"] for n, r in rows.items()},
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("mode", choices=["heads", "layers"])
    p.add_argument("--out", type=Path, required=True, help="folder for the JSON")
    p.add_argument("--world-size", type=int, default=2, help="heads: ranks")
    p.add_argument("--cpu", action="store_true", help="heads: gloo processes on CPU")
    p.add_argument("--seq-len", type=int, default=32768)
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=4, help="layers: decoder layers of the model")
    p.add_argument("--new-tokens", type=int, default=4, help="layers: greedy tokens")
    p.add_argument("--repeats", type=int, default=3, help="timed calls after one warm-up")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    record = run_heads(args) if args.mode == "heads" else run_layers(args)
    record["command"] = "python bench/multi_gpu.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    slug = record["device"].replace(" ", "_")
    path = args.out / f"multi_{args.mode}_{slug}.json"
    path.write_text(json.dumps(record, indent=1))
    print(json.dumps({k: v for k, v in record.items() if k != "rows"}, indent=1))
    print("wrote", path)


if __name__ == "__main__":
    main()
