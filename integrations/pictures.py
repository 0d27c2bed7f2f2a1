"""``flexsample pictures``: the documentation's pictures, from a real SmolLM2 prefill."""

from __future__ import annotations

from pathlib import Path

import torch

from flexsample import SampleConfig
from flexsample.viz import plot_block_scores, plot_density_heatmap, plot_tile_layouts

from . import transformers as fst
from .haystack import passkey_prompt
from .models import SMOLLM2, load_model


def make_pictures(
    out: Path,
    length: int = 4096,
    depth: float = 0.5,
    config: SampleConfig | None = None,
    layers: tuple[int, ...] = (0, 15, 29),
    score_layer: int = 29,
    score_head: int = 1,
) -> list[Path]:
    """Run one flexsample prefill of SmolLM2 on a passkey prompt and draw what it chose.

    Writes ``masks.png`` (tile layouts of three heads in each of ``layers``), ``scores.png``
    (sampled block scores of one head) and ``density.png`` (density per layer and head) into
    ``out``, and returns their paths.
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

    layouts, titles = [], []
    for layer in layers:
        stats = records[layer].details[0]
        tiles = stats.tile_layout()[0]
        for head in range(min(3, tiles.shape[0])):
            layouts.append(tiles[head])
            titles.append(f"layer {layer} head {head}: density {float(stats.density[0, head]):.2f}")
    written.append(out / "masks.png")
    plot_tile_layouts(layouts, titles, columns=3, path=written[-1])

    stats = records[score_layer].details[0]
    written.append(out / "scores.png")
    plot_block_scores(
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
