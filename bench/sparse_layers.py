"""Which layers' sparse attention changes a model's answer: one prompt, chosen layer sets.

For one prompt of a flexsample lm-eval task (:func:`flexsample.integrations.haystack.task_prompts`)
on an offline model, the greedy answer with dense attention, then with flexsample on each
given set of layers (the other layers dense), at the defaults or always sparse. An answer
that flips with every layer sparse but with no single layer points at errors adding up over
layers rather than at one layer's selection.

    PYTHONPATH=. python3 bench/sparse_layers.py --task passkey --length 2048 --sample 1 \\
        --layers all 0-14 15-29 16 18 19 22 25 26
"""

from __future__ import annotations

import argparse
import json

import torch

import flexsample as fs
import flexsample.integrations.transformers as fst
from flexsample.integrations.haystack import TASK_FAMILIES, extract_number, task_prompts
from flexsample.integrations.models import MODELS, load_model
from flexsample.integrations.transformers import attention_modules
from flexsample.provenance import provenance

NEW_TOKENS = 8


def layer_set(text: str, num_layers: int) -> set[int]:
    """``all``, ``N`` or ``A-B`` (inclusive) as a set of layer indices."""
    if text == "all":
        return set(range(num_layers))
    low, _, high = text.partition("-")
    return set(range(int(low), int(high or low) + 1))


def answer(model, tokenizer, ids, config: fs.SampleConfig | None, layers: set[int]) -> str:
    """The greedy answer with ``config`` on ``layers`` and dense attention elsewhere (None:
    the model's own dense attention everywhere)."""
    if config is not None:
        fst.enable(model, config, collect_stats=False, layers=layers)
    try:
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    finally:
        if config is not None:
            fst.disable(model)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    p.add_argument("--task", choices=sorted(TASK_FAMILIES), default="passkey")
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--samples", type=int, default=20, help="the task's prompt count")
    p.add_argument("--sample", type=int, default=0, help="which of its prompts")
    p.add_argument(
        "--layers", nargs="+", default=["all"], help="layer sets: all, N or A-B (inclusive)"
    )
    p.add_argument(
        "--always-sparse", action="store_true", help="every set layer sparse (no cost model)"
    )
    args = p.parse_args(argv)
    print(json.dumps({**provenance(), **vars(args)}), flush=True)
    model, tokenizer = load_model(args.model)
    prompt = task_prompts(args.task, tokenizer, args.length, args.samples)[args.sample]
    ids = tokenizer(prompt.text, return_tensors="pt").input_ids
    config = fs.SampleConfig.always_sparse() if args.always_sparse else fs.SampleConfig()
    num_layers = sum(1 for _ in attention_modules(model))
    dense = answer(model, tokenizer, ids, None, set())
    print(f"expected {prompt.answer}; {ids.shape[1]} tokens")
    print("| sparse layers | answer | right |")
    print("|---|---|---|")
    print(f"| none (dense) | {dense.strip()!r} | {extract_number(dense) == prompt.answer} |")
    for text in args.layers:
        got = answer(model, tokenizer, ids, config, layer_set(text, num_layers))
        right = extract_number(got) == prompt.answer
        print(f"| {text} | {got.strip()!r} | {right} |", flush=True)


if __name__ == "__main__":
    main()
