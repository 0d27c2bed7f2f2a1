"""Bad input raises an error that names the problem, before anything reaches torch internals."""

import pytest
import torch

from flexsample import SampleConfig, flex_sample_attention


def _ok(S=64, Hq=4, Hkv=2, D=16):
    return torch.randn(1, Hq, S, D), torch.randn(1, Hkv, S, D), torch.randn(1, Hkv, S, D)


@pytest.mark.parametrize(
    "make, error, words",
    [
        (lambda q, k, v: (q[0], k, v), ValueError, "q must be 4-D"),
        (
            lambda q, k, v: (q, k[:, :, :10], v[:, :, :10]),
            ValueError,
            "q must not be longer than k",
        ),
        (lambda q, k, v: (q, k, v[:, :, :10]), ValueError, "k and v must have the same shape"),
        (lambda q, k, v: (q[..., :8], k, v), ValueError, "same head_dim"),
        (lambda q, k, v: (q[:, :3], k, v), ValueError, "multiple of key/value heads"),
        (lambda q, k, v: (torch.cat([q, q]), k, v), ValueError, "same batch size"),
        (lambda q, k, v: (q.long(), k, v), TypeError, "q must be float32, bfloat16 or float16"),
        (lambda q, k, v: (q, k.double(), v), TypeError, "k must be float32"),
        (lambda q, k, v: (q.half(), k, v), TypeError, "share one dtype"),
        (lambda q, k, v: (q, k.to("meta"), v), ValueError, "one device"),
        (lambda q, k, v: (q.numpy(), k, v), TypeError, "q must be a torch.Tensor"),
        (lambda q, k, v: (q[:, :, :0], k[:, :, :0], v[:, :, :0]), ValueError, "must not be empty"),
        (lambda q, k, v: (q[..., :0], k[..., :0], v[..., :0]), ValueError, "head_dim >= 1"),
        (
            lambda q, k, v: (q.to("meta"), k.to("meta"), v.to("meta")),
            ValueError,
            "meta tensors \\(shapes without data\\)",
        ),
        (lambda q, k, v: (q[:, :0], k[:, :0], v[:, :0]), ValueError, "at least one head"),
    ],
)
def test_bad_tensors(make, error, words):
    with pytest.raises(error, match=words):
        flex_sample_attention(*make(*_ok()))


@pytest.mark.parametrize(
    "scale, error",
    [(-1.0, ValueError), (float("nan"), ValueError), (0.0, ValueError), ("0.1", TypeError)],
)
def test_bad_scale(scale, error):
    with pytest.raises(error, match="scale"):
        flex_sample_attention(*_ok(), scale=scale)


def test_config_must_be_a_sample_config():
    with pytest.raises(TypeError, match="config must be a SampleConfig"):
        flex_sample_attention(*_ok(), config={"alpha": 0.9})


def test_triton_sampler_on_cpu_without_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="sampler='triton' needs CUDA"):
        flex_sample_attention(*_ok(S=300), config=SampleConfig.always_sparse(sampler="triton"))


@pytest.mark.parametrize("S", [64, 1100], ids=["dense-path", "sparse-path"])
def test_requires_grad_is_refused_at_every_length(S):
    """Inference only, said at once and the same at every length (not deep in a compile)."""
    q, k, v = _ok(S=S)
    q.requires_grad_(True)
    with pytest.raises(NotImplementedError, match="inference prefill only"):
        flex_sample_attention(q, k, v)
    with torch.no_grad():
        assert flex_sample_attention(q, k, v).shape == q.shape


@pytest.mark.parametrize(
    "config, words",
    [
        (
            SampleConfig.always_sparse(block_size=2**20),
            "one tile, nothing to skip",
        ),
        (
            SampleConfig.always_sparse(window_ratio=0.95),
            "fixed window of 9 blocks covers all",
        ),
    ],
    ids=["huge-block", "full-fixed-window"],
)
def test_configs_that_cannot_be_sparse_say_so(config, words, caplog):
    """Valid configs that leave nothing to skip at this length: stats and the log say why."""
    q, k, v = _ok(S=1100)
    with caplog.at_level("WARNING", logger="flexsample"):
        _, stats = flex_sample_attention(q, k, v, config=config, return_stats=True)
    assert any(words in note for note in stats.notes), stats.notes
    assert stats.summary()["notes"] == list(stats.notes)


@pytest.mark.parametrize(
    "config, note",
    [
        (
            SampleConfig.always_sparse(sample_ratio=1e-12),
            "sample_ratio asks for 1.5e-10 rows per segment at query_len 1200: each of the 8 "
            "segments samples 1 row",
        ),
        (SampleConfig.always_sparse(num_segments=10**9, sample_ratio=1.0), "1200 segments over 10"),
    ],
    ids=["tiny-sample-ratio", "huge-num-segments"],
)
def test_values_that_leave_the_method_blind_are_noted(config, note, caplog):
    with caplog.at_level("WARNING", logger="flexsample"):
        _, stats = flex_sample_attention(*_ok(S=1200), config=config, return_stats=True)
    assert any(n.startswith(note) for n in stats.notes), stats.notes
    _, stats = flex_sample_attention(
        *_ok(S=1200), config=SampleConfig.always_sparse(), return_stats=True
    )
    assert stats.notes == ()
