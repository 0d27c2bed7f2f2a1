"""One-off: how much denser the query-aware preset's plans come out than the probe's
estimate at alpha, per layer of SmolLM2-135M on a passkey prompt (4K, 8K), beside the
defaults'. Answer in bench/archive/probe_selection_query_aware_smollm2_cpu.txt
(tuning.TILE_KEYS_OVER_PROBE).

    PYTHONPATH=. python3 bench/probe_selection_query_aware.py
"""

import statistics

import torch

import flexsample as fs
from flexsample.integrations.haystack import passkey_prompt
from flexsample.integrations.models import SMOLLM2, load_model
from flexsample.integrations.transformers import capture_attention_inputs
from flexsample.layout import SampleLayout
from flexsample.presets import preset
from flexsample.probe import probe_density

CONFIGS = {"defaults": fs.SampleConfig(), "query-aware": preset("query-aware")}


def main() -> None:
    model, tokenizer = load_model(SMOLLM2)
    for tokens in (4000, 8000):
        prompt = passkey_prompt(tokenizer, tokens, 0.5, seed=1)
        ids = tokenizer(prompt.text, return_tensors="pt").input_ids
        layers = capture_attention_inputs(model, ids, list(range(30)))
        ratios: dict[str, list[float]] = {name: [] for name in CONFIGS}
        totals = {name: [0.0, 0.0] for name in CONFIGS}
        with torch.no_grad():
            for q, k, _ in layers.values():
                S, scale = q.shape[2], q.shape[-1] ** -0.5
                for name, config in CONFIGS.items():
                    layout = SampleLayout.create(S, config)
                    estimate = float(probe_density(q, k, layout, config.alpha, scale).mean())
                    sparse = config.replace(min_seq_len=0, max_density=1.0, backend="gather")
                    density = float(fs.plan_prefill(q, k, sparse).density.mean())
                    ratios[name].append(density / estimate)
                    totals[name][0] += density
                    totals[name][1] += estimate
        for name, r in ratios.items():
            low, _, high = statistics.quantiles(r, n=4)
            pooled = totals[name][0] / totals[name][1]
            print(
                f"S={S} {name}: selection over probe median {statistics.median(r):.2f}, "
                f"quartiles {low:.2f} {high:.2f}, pooled {pooled:.2f}, max {max(r):.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
