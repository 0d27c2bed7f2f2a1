"""Attention operator: flex_sample_attention vs dense causal SDPA vs dense compiled FlexAttention.

Inputs: (a) planted structure at controlled densities (flexsample.synthetic.planted_case),
(b) q/k/v captured from SmolLM2 on a long passkey prompt. Each case times, in interleaved
rounds, every flexsample stage (sampling, selection, mask build, attention), the whole call,
dense SDPA and dense FlexAttention on the same inputs; the medians go to ``extra_info``.
"""

from __future__ import annotations

import functools
import statistics

import pytest
import torch
import torch.nn.functional as F

import flexsample as fs
from conftest import interleaved_ms, run
from flexsample.synthetic import planted_case
from flexsample.testing import rel_rmse

DENSITIES = [0.1, 0.2, 0.5]
SMOLLM2_LAYERS = [2, 15, 27]


def _lengths(config) -> list[int]:
    if config.getoption("--smoke"):
        return [1024, 2048]
    cuda = config.getoption("--device") or ("cuda" if torch.cuda.is_available() else "cpu")
    return [8192, 32768, 65536, 131072] if cuda == "cuda" else [4096, 8192, 16384, 32768]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "seq_len" in metafunc.fixturenames:
        metafunc.parametrize("seq_len", _lengths(metafunc.config), ids=lambda s: f"S{s}")
    if "real_len" in metafunc.fixturenames:
        smoke = metafunc.config.getoption("--smoke")
        metafunc.parametrize("real_len", [1100] if smoke else [4096, 8192], ids=lambda s: f"S{s}")
    if "target" in metafunc.fixturenames:
        smoke = metafunc.config.getoption("--smoke")
        metafunc.parametrize("target", [0.2] if smoke else DENSITIES, ids=lambda d: f"d{d}")
    if "layer" in metafunc.fixturenames:
        smoke = metafunc.config.getoption("--smoke")
        metafunc.parametrize(
            "layer", SMOLLM2_LAYERS[1:2] if smoke else SMOLLM2_LAYERS, ids=lambda i: f"L{i}"
        )


def _shape(device: torch.device):
    """(Hq, Hkv, D, dtype): Llama-3-8B's shape in bf16 on CUDA, a small GQA shape on CPU."""
    if device.type == "cuda":
        return 32, 8, 128, torch.bfloat16
    return 8, 2, 64, torch.float32


@functools.cache
def _planted(seq_len: int, target: float, device: torch.device):
    Hq, Hkv, D, dtype = _shape(device)
    return planted_case(target, 1, Hq, Hkv, seq_len, D, dtype=dtype, device=device, seed=0)


def _info(q, k, inputs: str, kind: str, **more) -> dict:
    return {
        "inputs": inputs,
        "kind": kind,
        "seq_len": q.shape[2],
        "heads": q.shape[1],
        "kv_heads": k.shape[1],
        "head_dim": q.shape[3],
        "dtype": str(q.dtype),
        **more,
    }


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def _flex_dense(q, k, v):
    """Dense causal attention through the same compiled FlexAttention kernel."""
    plan = fs.plan_prefill(q, k, fs.SampleConfig.dense_equivalent())
    return lambda: fs.run_plan(plan, q, k, v)


def _measure(q, k, v, cfg: fs.SampleConfig, device, rounds: int) -> dict:
    """Each stage, the whole call, SDPA and dense flex, in interleaved rounds (medians, ms).

    The stages are timed inside :func:`flexsample.plan_prefill` itself (its stage timer), so
    they are the shipped code, host syncs included. Also the density reached and the
    smallest sampled mass kept.
    """
    plan = fs.plan_prefill(q, k, cfg)
    stage_ms: dict[str, list[float]] = {stage: [] for stage in fs.PLAN_STAGES}

    def planning():
        timer = fs.StageTimer(device, enabled=True)
        fs.plan_prefill(q, k, cfg, timer=timer)
        for stage, seconds in timer.times.items():
            stage_ms[stage].append(seconds * 1e3)

    times = interleaved_ms(
        {
            "plan": planning,
            "attention": lambda: fs.run_plan(plan, q, k, v),
            "total": lambda: fs.flex_sample_attention(q, k, v, config=cfg),
            "sdpa": lambda: _sdpa(q, k, v),
            "flex_dense": _flex_dense(q, k, v),
        },
        device,
        rounds,
    )
    stages = {
        f"{stage}_ms": statistics.median(ms[1:] or ms) if ms else 0.0
        for stage, ms in stage_ms.items()
    }
    sparse = plan.path == "sparse"  # the defaults' cost model may choose dense
    return {
        "path": plan.path,
        "reason": plan.reason,
        "density": float(plan.density.mean()) if sparse else 1.0,
        "min_sampled_mass": float(plan.kept_sampled_mass().min()) if sparse else 1.0,
        "sampler": plan.sampler,
        **stages,
        **times,
    }


# --- planted inputs -------------------------------------------------------------------------


def test_flexsample(benchmark, seq_len, target, device, rounds):
    q, k, v, cfg = _planted(seq_len, target, device)
    benchmark.group = f"operator planted S={seq_len}"
    measured = _measure(q, k, v, cfg, device, rounds)
    # The benchmark entry itself: one more call of the whole thing (the interleaved medians
    # in extra_info are what the report uses).
    run(
        benchmark,
        lambda: fs.flex_sample_attention(q, k, v, config=cfg),
        device,
        1,
        **_info(q, k, "planted", "flexsample", target_density=target, **measured),
    )


# --- q/k/v captured from SmolLM2 ------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_qkv(smollm2, device):
    """``{(S, layer): (q, k, v)}`` captured on passkey prompts, on the benchmark device."""
    from flexsample.integrations.haystack import passkey_prompt
    from flexsample.integrations.transformers import capture_attention_inputs

    model, tokenizer = smollm2
    cache: dict = {}

    def get(seq_len: int, layer: int):
        if (seq_len, layer) not in cache:
            prompt = passkey_prompt(tokenizer, seq_len, 0.5, seed=seq_len)
            ids = tokenizer(prompt.text, return_tensors="pt").input_ids
            captured = capture_attention_inputs(model, ids, SMOLLM2_LAYERS)
            for i, qkv in captured.items():
                cache[(seq_len, i)] = tuple(t.to(device) for t in qkv)
        return cache[(seq_len, layer)]

    return get


def test_smollm2_flexsample(benchmark, smollm2_qkv, real_len, layer, device, rounds):
    q, k, v = smollm2_qkv(real_len, layer)
    cfg = fs.SampleConfig()
    benchmark.group = f"operator smollm2 S={real_len} layer={layer}"
    measured = _measure(q, k, v, cfg, device, rounds)
    error = rel_rmse(fs.flex_sample_attention(q, k, v, config=cfg), _sdpa(q, k, v))
    run(
        benchmark,
        lambda: fs.flex_sample_attention(q, k, v, config=cfg),
        device,
        1,
        **_info(q, k, "smollm2", "flexsample", layer=layer, output_rel_error=error, **measured),
    )
