"""What fewer sampled rows cost in accuracy on real attention: SmolLM2's layers at 8K.

Issue #11 asks whether the sampler, most of planning's time at long lengths, could sample
fewer rows. The row count only binds above ``max_sampled_rows / sample_ratio`` tokens (82K at
the defaults), where no offline model's attention can be captured; this scores the same
halving at 8K instead: SmolLM2-135M's layers 2, 15 and 27 on the frontier benchmark's
passkey prompt, every selection planned always sparse with ``sample_ratio`` scaled, and scored
against exact float64 attention on every row (:func:`flexsample.oracle.evaluate_plan`).

    PYTHONPATH=. python3 bench/sampled_rows.py                       # ratios 0.05 0.025 0.0125
    PYTHONPATH=. python3 bench/sampled_rows.py --ratios 0.05 0.025 --layers 15
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from report import write_rows

import flexsample as fs
from flexsample.integrations.haystack import passkey_prompt
from flexsample.integrations.models import load_model
from flexsample.integrations.transformers import capture_attention_inputs
from flexsample.oracle import evaluate_plan
from flexsample.provenance import provenance

#: The frontier benchmark's SmolLM2 prompt (bench/test_frontier.py, seq_len 8192).
PROMPT_TOKENS, SEED = 8000, 8192


def capture_frontier_layers(layers: list[int], tokens: int = PROMPT_TOKENS) -> dict:
    """``{layer: (q, k, v)}`` of SmolLM2-135M on the frontier benchmark's passkey prompt."""
    model, tokenizer = load_model("smollm2")
    prompt = passkey_prompt(tokenizer, tokens, 0.5, seed=SEED)
    ids = tokenizer(prompt.text, return_tensors="pt").input_ids
    return capture_attention_inputs(model, ids, layers)


def add_layer_arguments(p: argparse.ArgumentParser) -> None:
    """The options of the scripts that score SmolLM2's layers: ``--layers``, ``--tokens``,
    ``--json``."""
    p.add_argument("--layers", type=int, nargs="+", default=[2, 15, 27])
    p.add_argument("--tokens", type=int, default=PROMPT_TOKENS, help="prompt length (%(default)s)")
    p.add_argument("--json", help="also write the rows to this JSON file")


def start_layer_run(args: argparse.Namespace) -> tuple[dict, dict]:
    """``(meta, {layer: (q, k, v)})``: the run's provenance, printed (read at the start: a
    commit made during the run is not named), and the layers :func:`add_layer_arguments`
    asked for."""
    meta = provenance()
    print(json.dumps(meta), flush=True)
    return meta, capture_frontier_layers(args.layers, args.tokens)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.05, 0.025, 0.0125])
    add_layer_arguments(p)
    args = p.parse_args(argv)
    meta, captured = start_layer_run(args)
    print("| layer | sample_ratio | sampled rows | density | output error | kept mass p1 | min |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for layer, (q, k, v) in captured.items():
        for ratio in args.ratios:
            plan = fs.plan_prefill(
                q, k, fs.SampleConfig.always_sparse().replace(sample_ratio=ratio)
            )
            quality = evaluate_plan(q, k, v, plan)
            row = {
                "layer": layer,
                "sample_ratio": ratio,
                "rows": plan.layout.num_segments * plan.layout.rows_per_segment,
                **dataclasses.asdict(quality),
            }
            rows.append(row)
            print(
                f"| {layer} | {ratio} | {row['rows']} | {quality.density:.3f} "
                f"| {quality.output_error:.2e} | {quality.kept_mass_p1:.3f} "
                f"| {quality.kept_mass_min:.3f} |",
                flush=True,
            )
    if args.json:
        write_rows(args.json, meta, rows)


if __name__ == "__main__":
    main()
