"""``flexsample pictures``: the documentation's pictures, from a real SmolLM2 prefill."""

from __future__ import annotations

from pathlib import Path

import torch

from flexsample import SampleConfig
from flexsample.viz import plot_column_scores, plot_density_heatmap, plot_layer_masks

from . import transformers as fst
from .haystack import passkey_prompt
from .models import SMOLLM2, load_model


def make_pictures(
    out: Path,
    length: int = 4096,
    depth: float = 0.5,
    config: SampleConfig | None = None,
    layers: tuple[int, ...] | None = None,
    score_layer: int | None = None,
    score_head: int = 1,
) -> list[Path]:
    """Run one flexsample prefill of SmolLM2 on a passkey prompt and draw what it chose.

    Writes ``masks.png`` (tile layouts of three heads in each of ``layers``; default the
    first, middle and last layer that ran sparse), ``scores.png`` (sampled column scores of
    one head of ``score_layer``, default the last sparse layer) and ``density.png`` (density
    per layer and head) into ``out``, and returns their paths.

    Raises:
        ValueError: a requested layer did not run sparse (or does not exist).
    """
    config = config or SampleConfig()
    model, tokenizer = load_model(SMOLLM2)
    prompt = passkey_prompt(tokenizer, length, depth, seed=0)
    ids = tokenizer(prompt.text, return_tensors="pt").input_ids
    fst.enable(model, config)
    with torch.no_grad():
        model(ids)
    records = {r.layer: r for r in fst.layer_stats(model) if r.path == "sparse"}
    fst.disable(model)
    tokens = ids.shape[1]
    out.mkdir(parents=True, exist_ok=True)
    written = []

    sparse = sorted(records)
    if not sparse:
        raise ValueError(f"no layer ran sparse at {tokens} tokens: nothing to draw")
    if layers is None:
        layers = tuple(sorted({sparse[0], sparse[len(sparse) // 2], sparse[-1]}))
    score_layer = sparse[-1] if score_layer is None else score_layer
    missing = [i for i in (*layers, score_layer) if i not in records]
    if missing:
        raise ValueError(f"layers {missing} did not run sparse; sparse layers: {sparse}")
    written.append(out / "masks.png")
    plot_layer_masks({i: records[i].details[0] for i in layers}, path=written[-1])

    stats = records[score_layer].details[0]
    written.append(out / "scores.png")
    plot_column_scores(
        stats.scores[0, score_head],
        f"SmolLM2 layer {score_layer} head {score_head}, {tokens} tokens:\n"
        "sampled mass per key block outside window and sink",
        path=written[-1],
    )

    density = torch.tensor([records[i].density for i in sorted(records)])
    written.append(out / "density.png")
    plot_density_heatmap(
        density,
        f"SmolLM2-135M, {tokens}-token passkey prompt, alpha {config.alpha}",
        path=written[-1],
    )
    return written
