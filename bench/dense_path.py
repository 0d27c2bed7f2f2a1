"""The dense path at short lengths: flexsample against the dense kernels it calls, one run.

Where the cost model sends a call to dense attention (short prompts), flexsample must cost no
more than calling the kernel yourself. This times, in turn within each round (interleaved
medians, :func:`flexsample.timing.interleaved_medians`), on random q/k/v in the Llama-3-8B
attention shape (32 query heads, 8 kv heads, D=128, bf16; with ``--cpu`` on this machine's
CPU, 8 on 2, D=64, fp32; ``--input diffuse-background`` for the frontier benchmark's planted
structure over diffuse attention instead):

* ``sdpa_cudnn_gqa``: SDPA restricted to cuDNN, grouped K/V as they are (``bench/speed.py``'s
  baseline);
* ``sdpa``: SDPA with its own choice of kernel;
* ``cudnn_op``: cuDNN's ATen op called directly, as ``flexsample.dense_causal_attention`` does;
* ``dense_causal_attention``: flexsample's dense fallback;
* ``flex_sample_attention``: the whole call at the defaults (its path and reason are printed);
* ``plan_prefill`` and ``run_plan``: its two halves (the plan alone: on diffuse inputs past
  the length verdict, the probe and its verdict; the planned call alone);
* ``flex_dense_flash``: dense causal attention through FlexAttention on FlashAttention-4,
  where it is installed (the dense path's other kernel), from 32K tokens on: below, its
  launch (0.6-0.9 ms of host work at 2K-8K on an H200, longer than the kernel) left the GPU
  idle and slowed whichever call followed it in the round by tens of microseconds.

on two clocks: ``device`` (CUDA events around the call: the host's work before the first
launch counts, as in speed.py's tables) and ``wall`` (the call and a device sync), each in the
listed order and reversed. Ratios are against ``sdpa_cudnn_gqa`` (``sdpa`` on CPU).

    PYTHONPATH=. python3 bench/dense_path.py --lengths 2048 4096 8192 16384
    PYTHONPATH=. python3 bench/dense_path.py --cpu --input diffuse-background --lengths 16384
    PYTHONPATH=. python3 bench/dense_path.py --dry-run     # CPU, a small shape, to try it
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json

import torch
import torch.nn.functional as F
from report import write_rows
from torch.nn.attention import SDPBackend, sdpa_kernel

import flexsample as fs
from flexsample.provenance import code_commit
from flexsample.synthetic import planted_qkv
from flexsample.testing import random_qkv
from flexsample.timing import interleaved_medians

#: Seconds of rounds per length and clock (at least :data:`MIN_ROUNDS` rounds).
BUDGET_S = 3.0
MIN_ROUNDS = 20
#: Shortest length at which ``flex_dense_flash`` is timed (see the module's docstring).
FLEX_DENSE_FROM = 32768


def _sdpa(q, k, v, backends=None):
    if backends is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    with sdpa_kernel(backends):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def _cudnn_op(q, k, v, scale):
    return torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, False, 0.0, True, False, scale=scale
    )[0]


def _diffuse_background(Hq, Hkv, S, D, dtype, device):
    # bench/test_frontier.py's "diffuse background": weak stripes over spread-out attention.
    return planted_qkv(
        1, Hq, Hkv, S, D, stripes=(4, 8), stripe_width=1, signal=3.0, locality=2.0,
        dtype=dtype, device=device, seed=0,
    )  # fmt: skip


#: The inputs, by name: ``(Hq, Hkv, S, D, dtype, device) -> (q, k, v)``.
INPUTS = {
    "random": lambda Hq, Hkv, S, D, dtype, device: random_qkv(1, Hq, Hkv, S, D, dtype, device),
    "diffuse-background": _diffuse_background,
}


def calls(q, k, v, plan: fs.PrefillPlan) -> dict:
    """The functions to time, by name (``sdpa_cudnn_gqa`` and ``cudnn_op`` only on CUDA,
    ``flex_dense_flash`` only where FlashAttention-4 runs); ``run_plan`` runs ``plan``, the
    defaults' plan of q and k."""
    scale = q.shape[-1] ** -0.5
    fns = {
        "sdpa_cudnn_gqa": functools.partial(_sdpa, q, k, v, [SDPBackend.CUDNN_ATTENTION]),
        "sdpa": functools.partial(_sdpa, q, k, v),
        "cudnn_op": functools.partial(_cudnn_op, q, k, v, scale),
        "dense_causal_attention": functools.partial(fs.dense_causal_attention, q, k, v, scale),
        "flex_dense_flash": functools.partial(fs.flex_dense_attention, q, k, v, scale, "flash"),
        "flex_sample_attention": functools.partial(fs.flex_sample_attention, q, k, v),
        "plan_prefill": functools.partial(fs.plan_prefill, q, k),
        "run_plan": functools.partial(fs.run_plan, plan, q, k, v),
    }
    if q.device.type != "cuda":
        del fns["sdpa_cudnn_gqa"], fns["cudnn_op"]
    if q.shape[2] < FLEX_DENSE_FROM or fs.flash_unavailable(q.device, q.dtype, q.shape[-1]):
        del fns["flex_dense_flash"]
    return fns


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    p.add_argument(
        "--cpu", action="store_true", help="this machine's CPU (8 query heads on 2, D=64, fp32)"
    )
    p.add_argument("--dry-run", action="store_true", help="--cpu, to try the script")
    p.add_argument(
        "--input",
        choices=sorted(INPUTS),
        default="random",
        help="random q/k/v (default), or the frontier benchmark's planted structure with a "
        "diffuse background",
    )
    p.add_argument("--rounds", type=int, default=None, help="rounds (default: a time budget)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    cpu = args.cpu or args.dry_run
    device = torch.device("cpu" if cpu else "cuda")
    Hq, Hkv, D = (8, 2, 64) if cpu else (32, 8, 128)
    dtype = torch.float32 if cpu else torch.bfloat16
    meta = {"commit": code_commit(), "torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        meta["device"] = torch.cuda.get_device_name(device)
    print(json.dumps(meta))
    rows = []
    with torch.no_grad():
        for S in args.lengths:
            q, k, v = INPUTS[args.input](Hq, Hkv, S, D, dtype, device)
            plan = fs.plan_prefill(q, k)
            fns = calls(q, k, v, plan)
            if args.rounds:
                rounds = args.rounds
            else:
                once = interleaved_medians(list(fns.values()), device, 3)
                rounds = max(MIN_ROUNDS, int(BUDGET_S / sum(once)))
            print(f"S={S} {args.input}: {plan.path} ({plan.reason})", flush=True)
            # Each clock in both orders: a place in the round that favours a call shows.
            for clock, order in itertools.product(("device", "wall"), ("forward", "reversed")):
                names = list(fns) if order == "forward" else list(reversed(fns))
                seconds = interleaved_medians([fns[n] for n in names], device, rounds, clock=clock)
                us = {n: seconds[names.index(n)] * 1e6 for n in fns}
                base = us.get("sdpa_cudnn_gqa", us["sdpa"])
                row = {"seq_len": S, "clock": clock, "order": order, "rounds": rounds}
                rows.append({**row, "path": plan.path, **us})
                print(
                    f"S={S} {clock} {order} ({rounds} rounds, {plan.path}): "
                    + ", ".join(f"{n} {t:.1f} us ({base / t:.3f}x)" for n, t in us.items()),
                    flush=True,
                )
    if args.json:
        write_rows(args.json, meta, rows)


if __name__ == "__main__":
    main()
