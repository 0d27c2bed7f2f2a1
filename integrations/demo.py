"""``flexsample demo``: dense vs SampleAttention prefill on an offline SmolLM2, side by side."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from flexsample import SampleConfig

from . import transformers as fst
from .haystack import extract_number, passkey_prompt
from .models import SMOLLM2, load_model


def timed_prefill(model, input_ids: torch.Tensor, repeats: int) -> tuple[float, int]:
    """Median seconds of a prefill forward (time to first token) and the first token."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.no_grad():
            logits = model(input_ids, use_cache=True).logits
        times.append(time.perf_counter() - start)
    return statistics.median(times), int(logits[0, -1].argmax())


def answer(model, tokenizer, input_ids: torch.Tensor, new_tokens: int) -> str:
    """Greedy continuation of ``input_ids`` (``(1, S)``), decoded."""
    with torch.no_grad():
        out = model.generate(input_ids, max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True)


def run_demo(
    length: int = 4096,
    depth: float = 0.5,
    seed: int = 0,
    config: SampleConfig | None = None,
    repeats: int = 2,
    new_tokens: int = 8,
    save_masks: Path | None = None,
    save_json: Path | None = None,
    console=None,
) -> dict:
    """Load SmolLM2, build a passkey prompt, time dense and flexsample prefill, compare answers."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    config = config or SampleConfig()
    if length > SMOLLM2.context:
        raise ValueError(f"--length {length} exceeds SmolLM2's context of {SMOLLM2.context}")
    with console.status("Loading SmolLM2-135M (dequantising the GGUF file, about 20 s)"):
        model, tokenizer = load_model(SMOLLM2)
    prompt = passkey_prompt(tokenizer, length, depth, seed=seed)
    ids = tokenizer(prompt.text, return_tensors="pt").input_ids
    console.print(f"Prompt: {ids.shape[1]} tokens, pass key {prompt.answer} at depth {depth}")

    with console.status("Warming up: compiling FlexAttention kernels (once, cached on disk)"):
        warm = ids[:, : min(ids.shape[1], max(config.min_seq_len, 1100))]
        timed_prefill(model, warm, 1)
        with fst.enabled(model, config):
            timed_prefill(model, warm, 1)

    with console.status(f"Dense (SDPA) prefill of {ids.shape[1]} tokens, {repeats}x"):
        dense_ttft, _ = timed_prefill(model, ids, repeats)
        dense_answer = answer(model, tokenizer, ids, new_tokens)
    fst.enable(model, config)
    with console.status(f"flexsample prefill of {ids.shape[1]} tokens, {repeats}x"):
        flex_ttft, _ = timed_prefill(model, ids, repeats)
        fst.reset_stats(model)
        timed_prefill(model, ids, 1)  # one prefill's statistics
        summary = fst.summarize(model)
        records = [r for r in fst.layer_stats(model) if r.path == "sparse"]
        flex_answer = answer(model, tokenizer, ids, new_tokens)
    fst.disable(model)

    densities = [row["density"] for row in summary if row["density"] is not None]
    mean_density = sum(densities) / len(densities) if densities else 1.0
    result = {
        "tokens": int(ids.shape[1]),
        "passkey": prompt.answer,
        "depth": depth,
        "config": config.__dict__,
        "dense": {
            "ttft_s": dense_ttft,
            "answer": dense_answer,
            "correct": extract_number(dense_answer) == prompt.answer,
        },
        "flexsample": {
            "ttft_s": flex_ttft,
            "answer": flex_answer,
            "correct": extract_number(flex_answer) == prompt.answer,
            "mean_density": mean_density,
        },
        "layers": summary,
    }

    table = Table(title=f"SmolLM2-135M, {ids.shape[1]}-token passkey prompt, CPU float32")
    for column in ("attention", "time to first token", "density", "answer", "correct"):
        table.add_column(column)
    table.add_row(
        "dense SDPA",
        f"{dense_ttft:.2f} s",
        "1.000",
        repr(dense_answer),
        str(result["dense"]["correct"]),
    )
    table.add_row(
        "flexsample",
        f"{flex_ttft:.2f} s",
        f"{mean_density:.3f}",
        repr(flex_answer),
        str(result["flexsample"]["correct"]),
    )
    console.print(table)
    console.print(
        f"Speedup of prefill: {dense_ttft / flex_ttft:.2f}x. Density per layer: "
        + " ".join(f"{d:.2f}" for d in densities)
    )
    sample = sum(r["sample_s"] + r["select_s"] + r["mask_s"] for r in summary)
    attention = sum(r["attention_s"] for r in summary)
    console.print(
        f"Inside attention: sampling+selection+mask {sample:.2f} s, "
        f"block-sparse attention {attention:.2f} s (one prefill, all layers)"
    )
    if flex_ttft >= dense_ttft:
        console.print(
            "[dim]A 135M model on a CPU spends most of a short prefill outside attention, "
            "so sampling does not pay here yet: try --length 8000. Operator speed-ups at "
            "long lengths (CPU and H100) are in the docs' Benchmarks page.[/dim]"
        )

    if save_masks is not None:
        from flexsample.viz import plot_tile_layouts

        chosen = [records[i] for i in sorted({0, len(records) // 2, len(records) - 1})]
        layouts, titles = [], []
        for record in chosen:
            stats = record.details[0]
            tiles = stats.tile_layout()[0]
            for head in range(min(3, tiles.shape[0])):
                layouts.append(tiles[head])
                titles.append(
                    f"layer {record.layer} head {head}: {float(stats.density[0, head]):.2f}"
                )
        plot_tile_layouts(layouts, titles, columns=3, path=save_masks)
        console.print(f"Saved the chosen block masks to {save_masks}")
    if save_json is not None:
        save_json.write_text(json.dumps(result, indent=1, default=str))
    return result
