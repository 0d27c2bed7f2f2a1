"""Stage 1: the torch path and the Triton kernel against the dense float64 oracle."""

import pytest
import torch

from flexsample import SampleConfig, SampleLayout, sample_column_scores
from flexsample.sampling import (
    resolve_sampler,
    sample_column_scores_reference,
    sample_column_scores_torch,
    triton_available,
)
from flexsample.synthetic import planted_qkv

# (B, Hq, Hkv, S, D, block_size, segments, sample_ratio): lengths off the block grid, GQA,
# batch > 1, head dims that are not powers of two.
SHAPES = [
    pytest.param(1, 1, 1, 300, 16, 16, 1, 0.2, id="B1-H1-S300-D16-bs16"),
    pytest.param(2, 4, 2, 1000, 40, 64, 3, 0.1, id="B2-H4/2-S1000-D40-bs64"),
    pytest.param(1, 6, 2, 777, 64, 32, 5, 0.05, id="B1-H6/2-S777-D64-bs32"),
    pytest.param(2, 3, 3, 517, 24, 16, 8, 0.1, id="B2-H3/3-S517-D24-bs16"),
    pytest.param(1, 8, 1, 1300, 80, 128, 4, 0.08, id="B1-H8/1-S1300-D80-bs128"),
]


def _inputs(B, Hq, Hkv, S, D, dtype, planted):
    if planted:
        return planted_qkv(B, Hq, Hkv, S, D, stripes=(2, 6), dtype=dtype)[:2]
    return torch.randn(B, Hq, S, D, dtype=dtype), torch.randn(B, Hkv, S, D, dtype=dtype)


def _layout(S, bs, segments, ratio):
    cfg = SampleConfig(block_size=bs, num_segments=segments, sample_ratio=ratio)
    return SampleLayout.create(S, cfg)


def _rel_max(x, ref):
    return float((x - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("B, Hq, Hkv, S, D, bs, segments, ratio", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("planted", [False, True], ids=["random", "planted"])
def test_torch_sampler_matches_reference(B, Hq, Hkv, S, D, bs, segments, ratio, dtype, planted):
    q, k = _inputs(B, Hq, Hkv, S, D, dtype, planted)
    layout = _layout(S, bs, segments, ratio)
    ref = sample_column_scores_reference(q, k, layout, D**-0.5)
    # A tiny chunk budget forces many chunks, some straddling segments and heads. Both the
    # compiled (CPU default) and the eager per-chunk function must match.
    for compiled in (True, False):
        got = sample_column_scores_torch(
            q, k, layout, D**-0.5, max_chunk_elems=3 * S, compiled=compiled
        )
        assert got.shape == (B, Hq, layout.num_segments, S)
        assert _rel_max(got, ref) < 1e-5


@pytest.mark.triton
@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("B, Hq, Hkv, S, D, bs, segments, ratio", SHAPES)
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"]
)
def test_triton_kernel_matches_reference(B, Hq, Hkv, S, D, bs, segments, ratio, dtype, device):
    from flexsample.sampling.triton_kernel import sample_column_scores_triton

    q, k = _inputs(B, Hq, Hkv, S, D, dtype, planted=False)
    layout = _layout(S, bs, segments, ratio)
    ref = sample_column_scores_reference(q, k, layout, D**-0.5)
    got = sample_column_scores_triton(q.to(device), k.to(device), layout, D**-0.5, block_m=16)
    assert _rel_max(got.cpu(), ref) < 1e-4


@pytest.mark.triton
@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_triton_kernel_handles_strided_inputs(device):
    """q/k as transposed views of (B, S, H, D) tensors, as attention layers produce them."""
    from flexsample.sampling.triton_kernel import sample_column_scores_triton

    q = torch.randn(2, 400, 4, 32).transpose(1, 2)
    k = torch.randn(2, 400, 2, 32).transpose(1, 2)
    layout = _layout(400, 32, 2, 0.1)
    ref = sample_column_scores_reference(q, k, layout, 0.3)
    got = sample_column_scores_triton(q.to(device), k.to(device), layout, 0.3, block_m=16)
    assert _rel_max(got.cpu(), ref) < 1e-4


def test_scores_are_each_segments_mean_probability():
    q, k = planted_qkv(1, 4, 2, 2000, 32, stripes=3)[:2]
    cfg = SampleConfig(block_size=64)
    s = sample_column_scores(q, k, cfg)
    layout = SampleLayout.create(2000, cfg)
    assert (s >= 0).all()
    assert torch.allclose(s.sum(-1), torch.ones(()), atol=1e-5)  # mean of probability rows
    # nothing after a segment's last sampled row
    for g, end in enumerate(layout.segment_ends()):
        assert (s[..., g, end:] == 0).all()
        assert (s[..., g, end - 1] > 0).all()


def test_public_sample_column_scores_validates_and_defaults():
    q, k = torch.randn(1, 2, 300, 16), torch.randn(1, 2, 300, 16)
    cfg = SampleConfig(block_size=16, min_window=16)
    s = sample_column_scores(q, k, cfg)
    ref = sample_column_scores_reference(q, k, SampleLayout.create(300, cfg), 16**-0.5)
    assert _rel_max(s, ref) < 1e-5
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        sample_column_scores(torch.randn(1, 3, 300, 16), k, cfg)


def test_resolve_sampler():
    cpu = torch.device("cpu")
    assert resolve_sampler("auto", cpu) == "torch"
    assert resolve_sampler("reference", cpu) == "reference"
    if triton_available():
        assert resolve_sampler("triton", cpu) == "triton"  # interpreter is on in tests


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    if not triton_available():
        pytest.skip("triton is not installed")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        resolve_sampler("triton", torch.device("cpu"))


def test_wide_heads_get_narrower_key_tiles(monkeypatch):
    """Hopper's tuned (64, 128) tiles need 256 KiB of shared memory at D=256 (Gemma 3), over
    the 227 KiB there: the launch halves the key tile for heads wider than 128."""
    tk = pytest.importorskip("flexsample.sampling.triton_kernel")
    monkeypatch.setattr(tk, "launch_config", lambda device: (64, 128, 4))
    for D, block_n in ((64, 128), (128, 128), (192, 64), (256, 64)):
        assert tk.launch_settings(torch.zeros(1, 1, 8, D), None, None, None)["block_n"] == block_n
    asked = tk.launch_settings(torch.zeros(1, 1, 8, 256), None, 32, None)
    assert asked["block_n"] == 32  # as asked
