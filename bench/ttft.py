"""Time to first token and retrieval accuracy through the transformers integration.

One offline model (``--model``) on a GPU in bf16, the prompts of flexsample's lm-eval task
``flexsample_<task>_<length>`` (:func:`flexsample.integrations.haystack.task_prompts`: the same
texts; tokenized here with the tokenizer's special tokens, scored as the task scores: the
first number of a greedy answer of at most 12 tokens, cut at a newline). Per length, the
middle prompt's prefill is timed in interleaved rounds
(:func:`flexsample.timing.interleaved_medians`, wall clock: host work included, device
synchronised; the switch between modes runs untimed before each prefill), in three modes:

* ``dense``: the model's own SDPA attention;
* ``flexsample``: flexsample at its defaults, statistics off (as a user runs it);
* ``always sparse``: every layer that can run sparse does (``SampleConfig.always_sparse()``),
  what the cost model's verdicts are weighed against.

Then, per mode, one more prefill with statistics on (the path each layer took, its density),
and every prompt's answer (the score, and how many answers equal dense attention's).
``--device cpu``: fp32 on this CPU; ``--dry-run``: SmolLM2 there, 1100 tokens, 2 prompts.

    PYTHONPATH=. python3 bench/ttft.py --model gemma3-270m --lengths 16384 32768 --samples 20
    PYTHONPATH=. python3 bench/ttft.py --gguf FILE ...   # a GGUF file carried by hand
    PYTHONPATH=. python3 bench/ttft.py --dry-run
"""

from __future__ import annotations

import argparse
import collections
import json

import torch
from report import write_rows

import flexsample.integrations.transformers as fst
from flexsample import SampleConfig
from flexsample.integrations.haystack import TASK_FAMILIES, extract_number, task_prompts
from flexsample.integrations.models import MODELS, load_model
from flexsample.provenance import provenance
from flexsample.timing import interleaved_medians

#: The modes timed besides dense, by name.
CONFIGS = {"flexsample": SampleConfig(), "always sparse": SampleConfig.always_sparse()}
#: lm-eval's generation settings of the haystack tasks: 12 tokens at most, cut at a newline.
NEW_TOKENS = 12
DRY_RUN_LENGTH = 1100


def _prefill(model, ids):
    def call():
        with torch.no_grad():  # the first token's logits only, as generate() asks
            return model(ids, use_cache=True, logits_to_keep=1).logits[:, -1]

    return call


def _use(model, mode: str):
    """A function that switches the model to ``mode``'s attention: dense SDPA, or flexsample
    without statistics (run untimed before each timed prefill)."""

    def switch():
        fst.disable(model)
        if mode != "dense":
            fst.enable(model, CONFIGS[mode], collect_stats=False)

    return switch


def _answer(model, tokenizer, ids) -> str:
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).split("\n")[0]


def _answers(model, tokenizer, prompts, mode: str) -> list[str]:
    """Every prompt's greedy answer under ``mode``."""
    device = next(model.parameters()).device

    def answer(prompt):
        ids = tokenizer(prompt.text, return_tensors="pt").input_ids.to(device)
        return _answer(model, tokenizer, ids)

    if mode == "dense":
        return [answer(p) for p in prompts]
    with fst.enabled(model, CONFIGS[mode], collect_stats=False):
        return [answer(p) for p in prompts]


def _describe(model, ids, mode: str) -> dict:
    """One prefill with statistics under ``mode``: density, sparse layers, dense reasons."""
    if mode == "dense":
        return {}
    with fst.enabled(model, CONFIGS[mode]):
        _prefill(model, ids)()
        records = [r for r in fst.layer_stats(model) if r.is_prefill]
        info = {
            "density": fst.prefill_density(model),
            "sparse_layers": sorted({r.layer for r in records if r.path == "sparse"}),
            "dense_reasons": dict(collections.Counter(str(r.reason) for r in records if r.reason)),
            "plan_s": sum(sum(t for s, t in r.times.items() if s != "attention") for r in records),
        }
        fst.reset_stats(model)
    return info


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="gemma3-270m")
    p.add_argument("--gguf", help="the model's GGUF file (default: the installed package's)")
    p.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768])
    p.add_argument("--task", choices=sorted(TASK_FAMILIES), default="niah_single")
    p.add_argument(
        "--samples", type=int, default=20, help="prompts per length (default %(default)s)"
    )
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (default %(default)s)")
    p.add_argument(
        "--device", default="cuda", help="cuda (bf16, default) or cpu (fp32): where it runs"
    )
    p.add_argument("--dry-run", action="store_true", help="SmolLM2 on the CPU, 1100 tokens")
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    if args.dry_run:
        args.model, args.lengths, args.rounds, args.samples = "smollm2", [DRY_RUN_LENGTH], 1, 2
    device = torch.device("cpu" if args.dry_run else args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    meta = {**provenance(), "model": args.model, "task": args.task, "samples": args.samples}
    meta.update(device=str(device), dtype=str(dtype))
    if device.type == "cuda":
        meta["device"] = torch.cuda.get_device_name(device)
    print(json.dumps(meta), flush=True)
    model, tokenizer = load_model(args.model, dtype=dtype, gguf=args.gguf)
    model.to(device)
    modes = ["dense", *CONFIGS]
    rows = []
    for length in args.lengths:
        prompts = task_prompts(args.task, tokenizer, length, args.samples)
        expected = [p.answer for p in prompts]
        ids = tokenizer(prompts[len(prompts) // 2].text, return_tensors="pt").input_ids
        ids = ids.to(device)
        prefill = _prefill(model, ids)
        setups = [_use(model, mode) for mode in modes]
        seconds = interleaved_medians([prefill] * len(modes), device, args.rounds, setups=setups)
        fst.disable(model)
        dense_answers = None
        for mode, s in zip(modes, seconds, strict=True):
            answers = _answers(model, tokenizer, prompts, mode)
            dense_answers = dense_answers or answers
            row = {
                "task": f"{args.task}_{length}",
                "tokens": int(ids.shape[1]),
                "mode": mode,
                "ttft_s": s,
                "speedup": seconds[0] / s,
                "rounds": args.rounds,
                **_describe(model, ids, mode),
                "score": sum(
                    extract_number(a) == e for a, e in zip(answers, expected, strict=True)
                ),
                "same_as_dense": sum(a == d for a, d in zip(answers, dense_answers, strict=True)),
                "samples": len(prompts),
                "answers": answers,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(
        "\n| task | tokens | mode | TTFT | vs dense | density | sparse layers | score | as dense |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        dense = r["mode"] == "dense"
        print(
            f"| {r['task']} | {r['tokens']} | {r['mode']} | {r['ttft_s'] * 1e3:.1f} ms "
            f"| {r['speedup']:.2f}x | {'1 (dense)' if dense else format(r['density'], '.3f')} "
            f"| {'' if dense else len(r['sparse_layers'])} | {r['score']}/{r['samples']} "
            f"| {r['same_as_dense']}/{r['samples']} |"
        )
    if args.json:
        write_rows(args.json, meta, rows)


if __name__ == "__main__":
    main()
