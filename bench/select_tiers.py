"""Selection with a short first list of units, against weighing them all at once (CPU, 1 thread).

``select_columns`` weighs each segment's ``FIRST_UNITS`` heaviest units first and weighs
``TOP_UNITS`` only for the heads those leave undecided. This times both ways on the same
sampled scores (median of interleaved rounds), checks that they select the same, and counts
the heads weighed twice: planted single-token stripes and random q/k (8 query heads on 2 kv
heads, D=64, float32) at the given lengths, and SmolLM2-135M's layers 2, 15 and 27 on an
8K-token passkey prompt (the frontier benchmark's capture).

    PYTHONPATH=.:bench python3 bench/select_tiers.py --lengths 8192 32768
"""

from __future__ import annotations

import argparse
import functools
import json

import torch
from gpu_run import INPUTS, make_inputs

import flexsample as fs
from flexsample import selection
from flexsample.provenance import code_commit
from flexsample.sampling import run_sampler
from flexsample.timing import interleaved_medians

ALPHA = fs.SampleConfig().alpha


def compare(name: str, q: torch.Tensor, k: torch.Tensor, rounds: int) -> None:
    S = k.shape[2]
    layout = fs.SampleLayout.create(S, fs.SampleConfig())
    scores = run_sampler("torch", q, k, layout, q.shape[-1] ** -0.5)
    first = selection.FIRST_UNITS
    select = functools.partial(selection.select_columns, scores, layout, ALPHA)

    def run(units: int) -> fs.WindowColumns:
        selection.FIRST_UNITS = units
        try:
            return select()
        finally:
            selection.FIRST_UNITS = first

    tiered, once = run(first), run(selection.TOP_UNITS)
    same = torch.equal(tiered.columns, once.columns) and torch.equal(
        tiered.window_blocks, once.window_blocks
    )
    weighed: list[int] = []
    search = selection._cheapest_candidates

    def spy(mass, *args):
        weighed.append(mass.shape[0] * mass.shape[1])
        return search(mass, *args)

    selection._cheapest_candidates = spy
    try:
        run(first)
    finally:
        selection._cheapest_candidates = search
    cpu = torch.device("cpu")
    t_tiered, t_once = interleaved_medians([lambda: run(first), lambda: run(10**9)], cpu, rounds)
    print(
        f"{name} S={S}: first {first} units then {selection.TOP_UNITS}: {t_tiered * 1e3:.1f} ms "
        f"({sum(weighed[1:])} of {weighed[0]} heads weighed twice); all {selection.TOP_UNITS} "
        f"at once: {t_once * 1e3:.1f} ms; same selection: {same}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--no-smollm2", action="store_true", help="planted inputs only")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print(json.dumps({"commit": code_commit(), "torch": torch.__version__, "threads": 1}))
    for S in args.lengths:
        for name in INPUTS:
            q, k, _ = make_inputs(name, 8, 2, S, 64, torch.float32, torch.device("cpu"))
            compare(name, q, k, args.rounds)
    if args.no_smollm2:
        return
    from flexsample.integrations.haystack import passkey_prompt
    from flexsample.integrations.models import load_model
    from flexsample.integrations.transformers import capture_attention_inputs

    model, tokenizer = load_model()
    prompt = passkey_prompt(tokenizer, 8000, 0.5, seed=8192)
    ids = tokenizer(prompt.text, return_tensors="pt").input_ids
    for layer, (q, k, _) in capture_attention_inputs(model, ids, [2, 15, 27]).items():
        compare(f"SmolLM2 layer {layer}", q, k, args.rounds)


if __name__ == "__main__":
    main()
