"""The probe's least density against the selection's, layer by layer, on a real model.

The probe (:func:`flexsample.probe.probe_density`) estimates a lower bound of the density any
plan keeping ``alpha`` of a few rows' mass computes; the cost model's verdict before
planning weighs the plan at :data:`flexsample.costs.SELECTION_OVER_PROBE` times that. This
captures every layer's q and k of an offline model on one passkey prompt per length (prompt
1 of the lm-eval task's 20), and prints per layer the probe's estimate, the density the
selection really makes (planned always sparse: window, columns, row cover), their ratio and
the cost model's estimate of the whole plan (planning and the sparse call) over dense
attention. On CPU in float32, as the lm-eval runs.

    PYTHONPATH=. python3 bench/probe_selection.py --lengths 2048 4096 8000
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from report import write_rows

import flexsample as fs
from flexsample.costs import SELECTION_OVER_PROBE, cost_model
from flexsample.integrations.haystack import task_prompts
from flexsample.integrations.models import MODELS, load_model
from flexsample.integrations.transformers import attention_modules, capture_attention_inputs
from flexsample.probe import probe_density
from flexsample.provenance import provenance


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8000])
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    meta = {**provenance(), "model": args.model}  # read at the start
    print(json.dumps(meta), flush=True)
    model, tokenizer = load_model(args.model)
    layers = [m.layer_idx for m in attention_modules(model)]
    config = fs.SampleConfig.always_sparse()
    costs = cost_model(torch.device("cpu"), torch.float32, "triton")
    rows = []
    for length in args.lengths:
        prompt = task_prompts("passkey", tokenizer, length, 20)[1]
        ids = tokenizer(prompt.text, return_tensors="pt").input_ids
        captured = capture_attention_inputs(model, ids, layers)
        ratios = []
        for layer, (q, k, _) in captured.items():
            B, Hq, S, D = q.shape
            plan = fs.plan_prefill(q, k, config)
            least = float(probe_density(q, k, plan.layout, config.alpha, plan.scale).mean())
            selected = float(plan.density.mean())
            pairs = selected * B * Hq * plan.layout.causal_pairs
            rows_sampled = plan.layout.num_sampled_rows
            whole = costs.plan_s(B * Hq, S, D, rows_sampled) + costs.sparse_s(pairs, D)
            row = {
                "tokens": S,
                "layer": layer,
                "probe": least,
                "selected": selected,
                "ratio": selected / least,
                "plan_over_dense": whole / costs.dense_s(B * Hq, S, D),
            }
            rows.append(row)
            ratios.append(row["ratio"])
        per_layer = ", ".join(
            f"{r['layer']}: {r['probe']:.3f}->{r['selected']:.3f}"
            for r in rows
            if r["tokens"] == ids.shape[1]
        )
        print(f"S={ids.shape[1]}: probe -> selection density per layer: {per_layer}")
        print(
            f"S={ids.shape[1]}: selection / probe median {statistics.median(ratios):.2f} "
            f"(min {min(ratios):.2f}, max {max(ratios):.2f}; the verdict counts "
            f"{SELECTION_OVER_PROBE:g}x)",
            flush=True,
        )
    if args.json:
        write_rows(args.json, meta, rows)


if __name__ == "__main__":
    main()
