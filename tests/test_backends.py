"""The sparse call's FlexAttention backends: choosing one, and the padded static shapes that
FlashAttention-4 (``backend="flash"``) compiles for.

FlashAttention-4 itself needs a Hopper or later GPU (``tests/cuda`` runs it); here the
same padded masks and static-shape compilation run through FlexAttention's CPU kernel, and
must give the unpadded call's output.
"""

import dataclasses

import pytest
import torch

from flexsample import (
    SampleConfig,
    SampleLayout,
    WindowColumns,
    bucket_length,
    flash_unavailable,
    flex_sample_attention,
    plan_prefill,
    run_plan,
    sparse_attention,
)
from flexsample.backends import resolve_backend
from flexsample.masks import pad_sequence
from flexsample.patterns.window_columns import bucketed_shape, build_block_mask, gather_keys
from flexsample.testing import random_qkv as _qkv
from flexsample.testing import random_selection


@pytest.mark.parametrize("n", [1, 127, 128, 129, 1000, 1025, 3000, 8193, 100_000, 131_072])
@pytest.mark.parametrize("block", [64, 128])
def test_bucket_length_pads_to_a_few_sizes(n, block):
    got = bucket_length(n, block)
    blocks = -(-n // block)
    assert got % block == 0 and got >= n
    assert got <= max(1.5 * blocks * block, block)
    size = got // block  # 2^k or 3 * 2^k
    while size % 2 == 0:
        size //= 2
    assert size in (1, 3)


def test_ten_lengths_share_three_buckets():
    lengths = [5000, 5500, 6000, 6200, 7000, 7700, 8000, 9000, 11000, 12000]
    assert len({bucket_length(n, 128) for n in lengths}) == 3


def test_bucket_length_rejects_non_positive_sizes():
    with pytest.raises(ValueError, match="positive"):
        bucket_length(0, 128)


def test_backend_is_validated_and_auto_runs_gather_on_cpu():
    with pytest.raises(ValueError, match=r"SampleConfig\.backend must be one of"):
        SampleConfig(backend="cudnn")
    assert resolve_backend("auto", torch.device("cpu"), torch.bfloat16, 128) == "gather"
    assert resolve_backend("triton", torch.device("cpu"), torch.bfloat16, 128) == "triton"
    with pytest.raises(ValueError, match="backend='flash' cannot run here: needs a CUDA device"):
        resolve_backend("flash", torch.device("cpu"), torch.bfloat16, 128)
    cuda = torch.device("cuda", 0)  # checked before the device is touched
    with pytest.raises(ValueError, match="backend='gather' cannot run here: runs on the CPU"):
        resolve_backend("gather", cuda, torch.bfloat16, 128)
    q, k, v = _qkv(1, 2, 1, 300, 16)
    with pytest.raises(ValueError, match="backend='flash'"):
        flex_sample_attention(q, k, v, config=SampleConfig(backend="flash"))


def test_flash_unavailable_names_the_reason():
    cuda = torch.device("cuda", 0)  # checked before the device is touched
    assert "float16 or bfloat16" in flash_unavailable(cuda, torch.float32, 128)
    assert "head_dim 80" in flash_unavailable(cuda, torch.bfloat16, 80)
    assert "CUDA device" in flash_unavailable(torch.device("cpu"), torch.bfloat16, 128)


def test_stats_say_which_backend_ran():
    q, k, v = _qkv(1, 4, 2, 700, 32)
    for backend, ran in (("auto", "gather"), ("triton", "triton")):  # "auto" on the CPU
        config = SampleConfig.always_sparse(block_size=64, backend=backend)
        _, sparse = flex_sample_attention(q, k, v, config=config, return_stats=True)
        assert sparse.backend == ran and sparse.summary()["backend"] == ran
    _, dense = flex_sample_attention(
        q, k, v, config=SampleConfig(min_seq_len=10_000), return_stats=True
    )
    assert dense.backend is None


@pytest.mark.parametrize(
    "B, Hq, Hkv, S, D, bs, shared",
    [
        pytest.param(2, 4, 2, 1000, 64, 64, True, id="B2-H4/2-S1000-bs64-union"),
        pytest.param(1, 3, 1, 517, 32, 128, False, id="B1-H3/1-S517-bs128"),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_padded_mask_gives_the_unpadded_output(B, Hq, Hkv, S, D, bs, shared, dtype):
    """A mask padded to bucketed (rows, keys), with zero rows after q and after the
    gathered keys and values, computes the unpadded call's rows exactly."""
    q, k, v = _qkv(B, Hq, Hkv, S, D, dtype)
    sel = random_selection(B, Hq, Hkv, S, bs, shared=shared)
    lay, windows = sel.layout, sel.window_blocks
    gathered = sel.gathered(Hq // Hkv)
    keys, values = gather_keys(k, gathered), gather_keys(v, gathered)
    want = sparse_attention(q, keys, values, build_block_mask(windows, gathered, lay), D**-0.5)
    rows, length = bucketed_shape(lay, gathered.positions.shape[-1])
    assert rows > S and length > keys.shape[2]  # these sizes pad both
    padded = build_block_mask(windows, gathered, lay, padded=(rows, length))
    got = sparse_attention(
        pad_sequence(q, rows),
        gather_keys(k, gathered, length),
        gather_keys(v, gathered, length),
        padded,
        D**-0.5,
    )
    assert got.shape[2] == rows
    torch.testing.assert_close(got[:, :, :S], want)  # the same up to summation order


def test_padded_shapes_are_checked():
    lay = SampleLayout.create(300, SampleConfig(block_size=64))
    sel = WindowColumns(torch.ones(1, 2, dtype=torch.long), torch.zeros(1, 2, 300).bool(), lay)
    with pytest.raises(ValueError, match="padded shape"):
        build_block_mask(sel.window_blocks, sel.gathered(1), lay, padded=(256, 512))
    with pytest.raises(ValueError, match="shorter than"):
        gather_keys(torch.zeros(1, 2, 300, 8), sel.gathered(1), 200)


def test_static_shapes_compile_once_per_bucket():
    """The static-shape compilation FlashAttention-4 needs: ten prompt lengths (whole
    prompts and chunks, B=2, GQA) run padded plans through ``run_plan``, compiling once per
    distinct padded shape, not once per length, with the unpadded plans' outputs.

    Counted from Dynamo's cache entries of ``flex_attention`` (the padded calls run first,
    so that no dynamic-shape entry can serve them)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    from torch.nn.attention.flex_attention import flex_attention

    torch._dynamo.reset()
    cfg = SampleConfig.always_sparse(block_size=128, sampler="torch")
    cases, shapes = [], set()
    for S in [1030, 1150, 1290, 1300, 1450, 1530]:
        q, k, v = _qkv(2, 4, 2, S, 32)
        if S % 3 == 0:  # a chunk: the last 700 queries
            q = q[:, :, -700:].contiguous()
        plan = plan_prefill(q, k, cfg)
        call = plan.pattern.compile(plan.num_heads // k.shape[1], static=True)
        shapes.add(call.padded)
        bucketed = dataclasses.replace(plan, padded=call.padded, call=call)
        cases.append((plan, q, k, v, run_plan(bucketed, q, k, v)))
    static = len(_debug_get_cache_entry_list(flex_attention.__code__))
    print(f"6 lengths: {len(shapes)} padded shapes, {static} static compilations")
    assert static == len(shapes) <= 4  # six lengths share at most four (rows, keys) buckets
    for plan, q, k, v, got in cases:
        torch.testing.assert_close(got, run_plan(plan, q, k, v))


def test_flash_mask_mod_means_the_same_mask():
    """FlashAttention-4's ``mask_mod`` holds its numbers as Python ints (its code generator
    refuses 0-d tensors); evaluated eagerly it must be the same mask as the default one."""
    from torch.nn.attention.flex_attention import create_mask

    from flexsample.patterns.window_columns import key_codes, sample_attention_mask_mod

    B, Hq, Hkv, S, bs = 2, 4, 2, 700, 64
    sel = random_selection(B, Hq, Hkv, S, bs, shared=True)
    windows, gathered = sel.window_blocks, sel.gathered(Hq // Hkv)
    codes = key_codes(gathered, S)
    masks = [
        create_mask(
            sample_attention_mask_mod(codes, windows, bs, query_offset=128, static=static),
            B,
            Hq,
            S - 128,
            codes.shape[-1],
            device="cpu",
        )
        for static in (False, True)
    ]
    assert masks[0].any() and torch.equal(masks[0], masks[1])


def test_a_failing_flash_call_runs_on_triton_visibly(caplog, monkeypatch):
    """A FlashAttention-4 call that fails runs on Triton with a warning, and the failure is
    remembered for later plans (``flash_unavailable``). (On CPU FlexAttention ignores the
    FLASH option, so the failure is simulated: the error H200 runs raised before 6bfffe8.)"""
    from flexsample import attention, backends

    def failing_compile():
        def run(*args, **kwargs):
            assert kwargs["kernel_options"] == {"BACKEND": "FLASH"}
            raise ValueError("Expected TensorSSA, but got <class 'int'>")

        return run

    monkeypatch.setattr(backends, "_FLASH_FAILED", {})
    monkeypatch.setattr(attention, "compiled_static_flex_attention", failing_compile)
    B, Hq, Hkv, S, D, bs = 1, 4, 2, 600, 64, 64
    q, k, v = _qkv(B, Hq, Hkv, S, D, torch.bfloat16)
    sel = random_selection(B, Hq, Hkv, S, bs, shared=True)
    gathered = sel.gathered(Hq // Hkv)
    keys, values = gather_keys(k, gathered), gather_keys(v, gathered)
    mask = build_block_mask(sel.window_blocks, gathered, sel.layout)
    want = sparse_attention(q, keys, values, mask, D**-0.5)
    with caplog.at_level("WARNING", logger="flexsample"):
        got = sparse_attention(q, keys, values, mask, D**-0.5, "flash")
    torch.testing.assert_close(got, want)
    assert "flash backend failed" in caplog.text and "TensorSSA" in caplog.text
    assert list(backends._FLASH_FAILED) == [(None, torch.bfloat16, D)]


@pytest.mark.parametrize("B, Hq, Hkv, S", [(1, 4, 4, 300), (2, 4, 2, 517), (1, 6, 2, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_flex_dense_attention_equals_sdpa(B, Hq, Hkv, S, dtype):
    """The dense call through FlexAttention (every causal tile, padded to a bucket, static
    shapes: what runs on FlashAttention-4) against SDPA, its twin."""
    from torch.nn.functional import scaled_dot_product_attention

    from flexsample.attention import flex_dense_attention
    from flexsample.masks import causal_block_mask

    q, k, v = _qkv(B, Hq, Hkv, S, 64, dtype)
    got = flex_dense_attention(q, k, v, 0.125, "triton")
    ref = scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.125, enable_gqa=Hq != Hkv)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(got, ref, **tol)
    # The padded query blocks read no key block: padding costs no attention work.
    padded = bucket_length(S, 128)
    mask = causal_block_mask(S, padded, 128, q.device)
    blocks = -(-S // 128)
    assert (
        int(mask.kv_num_blocks[..., blocks:].sum() + mask.full_kv_num_blocks[..., blocks:].sum())
        == 0
    )
    with pytest.raises(ValueError, match="whole prompts"):
        flex_dense_attention(q[:, :, 1:], k, v, 0.125, "triton")


def test_dense_plans_run_flexattention_where_the_cost_model_says_it_is_faster(monkeypatch):
    """With FlashAttention-4 (simulated: on CPU FlexAttention ignores the FLASH option) and a
    cost model whose FlexAttention dense call beats SDPA, a call decided dense runs it; a
    chunk runs SDPA."""
    from torch.nn.functional import scaled_dot_product_attention

    from flexsample import costs, plan

    model = costs.CostModel(
        device="test", kind="cpu", dtype="float32", dense_fixed_s=1e-3, dense_pair_s=2e-11,
        plan_fixed_s=10.0, plan_token_s=0.0, plan_pair_s=0.0, sparse_fixed_s=1e-3,
        sparse_pair_s=2e-11, source="test", backend="flash", flex_dense_fixed_s=0.0,
        flex_dense_pair_s=1e-11,
    )  # fmt: skip
    monkeypatch.setattr(plan, "resolve_backend", lambda *args: "flash")
    monkeypatch.setattr(plan, "cost_model", lambda device, dtype, backend: model)
    q, k, v = _qkv(2, 4, 2, 700, 32)
    out, stats = flex_sample_attention(q, k, v, return_stats=True)
    assert stats.path == "dense" and stats.backend == "flash", stats.reason
    assert "planning" in stats.reason  # planning at 10 s never pays
    assert plan.plan_prefill(q, k).padded == (768, 768)
    ref = scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    _, stats = flex_sample_attention(q[:, :, -300:], k, v, return_stats=True)
    assert stats.path == "dense" and stats.backend is None  # a chunk: SDPA
