"""End-to-end prefill (time to first token) on SmolLM2-135M: dense SDPA vs flexsample.

Each flexsample row also carries, from one separate prefill: density per layer, time per
stage summed over layers, and whether the passkey answer matches dense attention's.
"""

from __future__ import annotations

import pytest
import torch

import flexsample.integrations.transformers as fst
from conftest import run
from flexsample import SampleConfig
from flexsample.integrations.haystack import extract_number, passkey_prompt


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "prompt_len" in metafunc.fixturenames:
        smoke = metafunc.config.getoption("--smoke")
        metafunc.parametrize(
            "prompt_len", [1100] if smoke else [2048, 4096, 8000], ids=lambda s: f"S{s}"
        )


def _answer(model, tokenizer, ids) -> str | None:
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    return extract_number(tokenizer.decode(out[0, ids.shape[1] :]))


def _prefill(model, ids):
    def call():
        with torch.no_grad():
            return model(ids, use_cache=True).logits[:, -1]

    return call


#: flexsample's modes: its defaults (the cost model may run a layer dense), and every layer's
#: prefill sparse (what the cost model's verdicts are measured against).
CONFIGS = {"flexsample": SampleConfig(), "always sparse": SampleConfig.always_sparse()}


@pytest.mark.parametrize("mode", ["dense", *CONFIGS])
def test_prefill(benchmark, smollm2, prompt_len, mode, device, rounds, smoke):
    model, tokenizer = smollm2
    model.to(device)
    prompt = passkey_prompt(tokenizer, prompt_len, 0.5, seed=prompt_len)
    ids = tokenizer(prompt.text, return_tensors="pt").input_ids.to(device)
    fst.disable(model)
    info = {"kind": mode, "seq_len": ids.shape[1], "passkey": prompt.answer}
    if mode in CONFIGS:
        fst.enable(model, CONFIGS[mode])
        _prefill(model, ids)()  # statistics of one prefill (compiles on first use)
        fst.reset_stats(model)
        _prefill(model, ids)()
        summary = fst.summarize(model)
        info["layer_density"] = [row["density"] for row in summary]
        for stage in ("sample", "select", "mask", "attention"):
            info[f"{stage}_s"] = sum(row[f"{stage}_s"] for row in summary)
        fst.reset_stats(model)
    info["answer"] = _answer(model, tokenizer, ids)
    benchmark.group = f"prefill smollm2 S={prompt_len}"
    try:
        run(benchmark, _prefill(model, ids), device, rounds, **info)
    finally:
        fst.disable(model)
