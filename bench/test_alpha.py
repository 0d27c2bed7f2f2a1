"""The alpha sweep: the speed/accuracy frontier of SampleAttention on SmolLM2.

For each alpha: density, true attention mass kept (from full float32 probabilities) and
output error on q/k/v captured from several layers of a long passkey prompt, passkey accuracy
of the whole model on prompts at several depths, and the operator time of one layer.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import flexsample as fs
import flexsample.integrations.transformers as fst
from conftest import run
from flexsample.integrations.haystack import extract_number, passkey_prompt
from flexsample.oracle import evaluate_plan
from flexsample.testing import rel_rmse

LAYERS = [2, 8, 15, 21, 27]
DEPTHS = [0.1, 0.4, 0.7, 0.95]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "alpha" in metafunc.fixturenames:
        smoke = metafunc.config.getoption("--smoke")
        alphas = [0.9, 0.95] if smoke else [0.8, 0.9, 0.95, 0.98, 1.0]
        metafunc.parametrize("alpha", alphas, ids=lambda a: f"alpha{a}")


@pytest.fixture(scope="module")
def sweep_setup(smollm2, smoke):
    """Captured q/k/v, passkey prompts and dense answers, shared by every alpha."""
    model, tokenizer = smollm2
    length = 1100 if smoke else 4096
    prompts = [passkey_prompt(tokenizer, length, d, seed=i) for i, d in enumerate(DEPTHS)]
    if smoke:
        prompts = prompts[:1]
    ids = [tokenizer(p.text, return_tensors="pt").input_ids for p in prompts]
    fst.disable(model)
    dense_answers = []
    for i in ids:
        with torch.no_grad():
            out = model.generate(i, max_new_tokens=8, do_sample=False)
        dense_answers.append(extract_number(tokenizer.decode(out[0, i.shape[1] :])))
    captured = fst.capture_attention_inputs(model, ids[0], LAYERS)
    return {"prompts": prompts, "ids": ids, "dense": dense_answers, "qkv": captured}


def _kept_mass_and_error(q, k, v, config) -> tuple[float, float, float, float]:
    """(density, mean kept mass, 1st-percentile kept mass over rows, output relative error)."""
    out, stats = fs.flex_sample_attention(q, k, v, config=config, return_stats=True)
    error = rel_rmse(out, F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    quality = evaluate_plan(q, k, v, fs.plan_prefill(q, k, config))
    return stats.mean_density, quality.kept_mass_mean, quality.kept_mass_p1, error


def test_alpha(benchmark, smollm2, sweep_setup, alpha, device, rounds):
    model, tokenizer = smollm2
    # The selection at each alpha, always run sparse (the cost model would run some layers
    # dense and hide what alpha does).
    config = fs.SampleConfig.always_sparse(alpha=alpha)
    rows = [_kept_mass_and_error(*sweep_setup["qkv"][layer], config) for layer in LAYERS]
    fst.enable(model, config)
    correct = same = 0
    for prompt, ids, dense in zip(
        sweep_setup["prompts"], sweep_setup["ids"], sweep_setup["dense"], strict=True
    ):
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=8, do_sample=False)
        answer = extract_number(tokenizer.decode(out[0, ids.shape[1] :]))
        correct += answer == prompt.answer
        same += answer == dense
    fst.disable(model)
    n = len(sweep_setup["prompts"])
    q, k, v = sweep_setup["qkv"][15]
    benchmark.group = "alpha sweep (operator time: SmolLM2 layer 15)"
    run(
        benchmark,
        lambda: fs.flex_sample_attention(q, k, v, config=config),
        device,
        rounds,
        kind="alpha",
        alpha=alpha,
        seq_len=q.shape[2],
        density=sum(r[0] for r in rows) / len(rows),
        kept_mass_mean=sum(r[1] for r in rows) / len(rows),
        kept_mass_p1=min(r[2] for r in rows),
        output_rel_error=sum(r[3] for r in rows) / len(rows),
        passkey_accuracy=correct / n,
        passkey_same_as_dense=same / n,
        dense_passkey_accuracy=sum(
            d == p.answer for d, p in zip(sweep_setup["dense"], sweep_setup["prompts"], strict=True)
        )
        / n,
        prompts=n,
    )
