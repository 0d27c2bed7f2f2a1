"""The cover stage against an earlier revision's, and planning eager against CUDA-graph replay,
in one process on one GPU (a planning change measured free of the host-to-host spread
between machines).

Per length and input (planted single-token stripes, random q/k; Llama-3-8B attention shape,
bf16, always sparse): the two covers' results compared (equal columns, row mass) and timed in
turn (median wall of 15 synchronised calls, median of 3 rounds), ``select_columns`` and
``plan_prefill`` with ``FLEXSAMPLE_CUDA_GRAPHS=0`` and with graphs, and the plan's block mask
eager against replayed.

    git show 44c073b:flexsample/cover.py > /tmp/cover_44c073b.py
    PYTHONPATH=. python3 bench/cover_ab.py --old /tmp/cover_44c073b.py
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
import types

import torch
from gpu_run import INPUTS, make_inputs

import flexsample as fs
from flexsample import graphs
from flexsample.provenance import code_commit
from flexsample.sampling import run_sampler_with_lse

CONFIG = fs.SampleConfig(min_seq_len=0, max_density=1.0)


def load_old_cover(path: str) -> types.ModuleType:
    """An earlier ``flexsample/cover.py``, its relative imports made absolute."""
    with open(path) as file:
        source = file.read().replace("from .", "from flexsample.")
    module = types.ModuleType("cover_old")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, path, "exec"), module.__dict__)
    return module


def wall_ms(fn, reps: int = 15) -> float:
    for _ in range(2):
        fn()
    samples = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def same_mask(a: fs.PrefillPlan, b: fs.PrefillPlan) -> bool:
    ma, mb = a.block_mask, b.block_mask
    parts = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")
    return all(torch.equal(getattr(ma, p), getattr(mb, p)) for p in parts) and torch.equal(
        a.gathered.positions, b.gathered.positions
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--old", required=True, help="an earlier revision's flexsample/cover.py")
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768, 131072])
    args = p.parse_args(argv)
    old = load_old_cover(args.old)
    print(f"code at {code_commit()}, {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"command: {shlex.join(['python3', 'bench/cover_ab.py', *sys.argv[1:]])}")
    for S in args.lengths:
        layout = fs.SampleLayout.create(S, CONFIG)
        for name in INPUTS:
            q, k, _ = make_inputs(name, 32, 8, S, 128, torch.bfloat16, torch.device("cuda"))
            print(f"{S} {name}: {compare(old, q, k, layout)}", flush=True)


def compare(old: types.ModuleType, q: torch.Tensor, k: torch.Tensor, layout) -> str:
    """One line: the covers' agreement, the masks' agreement, and the median times."""
    scale = 128**-0.5
    scores, lse = run_sampler_with_lse("triton", q, k, layout, scale)
    sel = fs.select_columns(scores, layout, CONFIG.alpha).shared_by_group(4)
    new = sys.modules["flexsample.cover"]

    def cover(module):
        return module.cover_rows(q, k, sel, CONFIG.alpha, scale, "triton", row_lse=lse)

    a, b = cover(old), cover(new)
    equal = torch.equal(a.selection.columns, b.selection.columns)
    mass = float((a.row_mass - b.row_mass).abs().max())
    times: dict[str, list[float]] = {}
    for _ in range(3):
        times.setdefault("old cover", []).append(wall_ms(lambda: cover(old)))
        times.setdefault("cover", []).append(wall_ms(lambda: cover(new)))
        for label, on in (("eager", False), ("graphs", True)):
            with graphs.use_graphs(on):
                times.setdefault(f"select {label}", []).append(
                    wall_ms(lambda: fs.select_columns(scores, layout, CONFIG.alpha))
                )
                times.setdefault(f"plan {label}", []).append(
                    wall_ms(lambda: fs.plan_prefill(q, k, CONFIG))
                )
    with graphs.use_graphs(False):
        eager = fs.plan_prefill(q, k, CONFIG)
    with graphs.use_graphs(True):
        replayed = fs.plan_prefill(q, k, CONFIG)
    medians = " ".join(f"{key} {statistics.median(v):.2f}" for key, v in times.items())
    return (
        f"covers' columns equal {equal}, row mass within {mass:.1e}; plan mask eager == "
        f"graphs {same_mask(eager, replayed)} | {medians}"
    )


if __name__ == "__main__":
    main()
