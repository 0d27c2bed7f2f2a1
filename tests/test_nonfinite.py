"""NaN and Inf in q, k or v come out as SDPA gives them, on every path.

A sparse mask would spread a bad key only into the rows that keep it (and a bad query row
came out as zeros); the call runs dense instead and says why.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import flexsample as fs
from flexsample.backends import flash_unavailable
from flexsample.synthetic import planted_qkv

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

S, L = 1000, 1000
SPARSE = fs.SampleConfig.always_sparse(min_window=128)
DENSE = fs.SampleConfig(min_seq_len=S + 1)
#: (tensor, position, value): a query row, early and last keys, a value row, both infinities.
CASES = [
    ("q", 0, float("nan")),
    ("q", 517, float("nan")),
    ("q", 300, float("-inf")),
    ("k", 100, float("nan")),
    ("k", 999, float("nan")),
    ("k", 100, float("inf")),
    ("v", 100, float("nan")),
    ("v", 640, float("inf")),
]
IDS = [f"{name}{pos}-{value}" for name, pos, value in CASES]


#: The sparse call's backends where this machine runs them: FlexAttention's Triton kernel
#: (C++ on the CPU) everywhere, the gathered products on the CPU, FlashAttention-4 on a
#: Hopper GPU with flash-attn-4 installed.
BACKENDS = ["triton", "gather"] if DEVICE.type == "cpu" else ["triton"]
if DEVICE.type == "cuda" and flash_unavailable(DEVICE, torch.bfloat16, 64) is None:
    BACKENDS.append("flash")
#: fp32 on the CPU; on a GPU bf16, where SDPA and flexsample's dense kernel may differ in
#: rounding (cuDNN called directly vs SDPA's choice).
DTYPE, ATOL = (torch.float32, 1e-5) if DEVICE.type == "cpu" else (torch.bfloat16, 2e-2)


def _inputs(name, pos, value, dtype=DTYPE):
    q, k, v = planted_qkv(1, 4, 2, S, 64, stripes=3, stripe_width=1, seed=3, dtype=dtype)
    tensors = {"q": q, "k": k, "v": v}
    tensors[name][:, 1, pos, 5] = value
    return tuple(tensors[n].to(DEVICE) for n in "qkv")


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", ["sparse-forced", "dense-by-length"])
@pytest.mark.parametrize("name, pos, value", CASES, ids=IDS)
def test_nan_and_inf_come_out_as_sdpa_gives_them(name, pos, value, path, backend):
    config = (SPARSE if path == "sparse-forced" else DENSE).replace(backend=backend)
    q, k, v = _inputs(name, pos, value)
    out, stats = fs.flex_sample_attention(q, k, v, config=config, return_stats=True)
    torch.testing.assert_close(out, _sdpa(q, k, v), equal_nan=True, atol=ATOL, rtol=0)
    assert stats.path == "dense"
    if path == "sparse-forced":
        assert stats.reason == f"{name} hold NaN or Inf: dense attention spreads them as SDPA does"
    # The same without stats (the call's other way through).
    out = fs.flex_sample_attention(q, k, v, config=config)
    torch.testing.assert_close(out, _sdpa(q, k, v), equal_nan=True, atol=ATOL, rtol=0)


def test_a_bad_value_after_planning_runs_the_plan_dense(caplog):
    q, k, v = _inputs("v", 100, float("nan"))
    plan = fs.plan_prefill(q, k, SPARSE)  # sees q and k only: finite
    assert plan.path == "sparse"
    out = fs.run_plan(plan, q, k, v)
    torch.testing.assert_close(out, _sdpa(q, k, v), equal_nan=True, atol=ATOL, rtol=0)


def test_a_chunk_with_a_nan_key_in_its_context_runs_dense():
    q, k, v = _inputs("k", 40, float("nan"), dtype=torch.bfloat16)
    chunk = q[:, :, -300:]
    out, stats = fs.flex_sample_attention(chunk, k, v, config=SPARSE, return_stats=True)
    mask = torch.ones(300, S, dtype=torch.bool, device=DEVICE).tril(S - 300)
    ref = F.scaled_dot_product_attention(chunk, k, v, attn_mask=mask, enable_gqa=True)
    assert stats.path == "dense"
    assert bool(out[:, 2:].isnan().all()) and not bool(out[:, :2].isnan().any())  # kv head 1's
    torch.testing.assert_close(out, ref, equal_nan=True, atol=1e-2, rtol=0)


def test_finite_inputs_still_run_sparse():
    q, k, v = _inputs("q", 0, 1.0)
    _, stats = fs.flex_sample_attention(q, k, v, config=SPARSE, return_stats=True)
    assert stats.path == "sparse"


def test_nonfinite_inputs_names_the_tensors():
    finite = torch.ones(3)
    assert fs.plan.nonfinite_inputs(q=finite, k=finite, v=None) == ""
    bad = torch.tensor([1.0, float("inf")])
    assert fs.plan.nonfinite_inputs(q=finite, k=bad, v=bad.bfloat16()) == "k, v"
