"""The transformers integration on tiny random-weight models: routing, padding, fallbacks."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import flexsample.integrations.transformers as fst  # noqa: E402
from flexsample import SampleConfig  # noqa: E402

DENSE_EQUIVALENT = SampleConfig.dense_equivalent(block_size=16, min_window=16)
SPARSE = SampleConfig.always_sparse(block_size=16, min_window=16, alpha=0.9)


def tiny_llama(**overrides):
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=4096, **overrides,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def tiny_gemma3():
    config = transformers.Gemma3TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=48,
        layer_types=["sliding_attention", "full_attention"] * 2,
        max_position_embeddings=4096, query_pre_attn_scalar=16,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.Gemma3ForCausalLM(config).eval()


def left_padded_batch():
    """A 300-token prompt and a 213-token one, left-padded into one batch with its mask."""
    long, short = torch.randint(0, 128, (1, 300)), torch.randint(0, 128, (1, 213))
    pad = 300 - 213
    ids = torch.cat([long, torch.cat([torch.zeros(1, pad, dtype=torch.long), short], 1)])
    mask = torch.ones(2, 300, dtype=torch.long)
    mask[1, :pad] = 0
    return long, short, pad, ids, mask


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


def reasons(model):
    return {r.reason for r in fst.layer_stats(model) if r.path == "dense"}


def test_names_are_registered():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert ALL_ATTENTION_FUNCTIONS["flexsample"] is fst.flexsample_attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS["flexsample"] is fst.flexsample_mask


def test_attn_implementation_flexsample_at_construction(project_costs):
    config = tiny_llama().config
    model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="flexsample")
    assert model.config._attn_implementation == "flexsample"
    ids = torch.randint(0, 128, (1, 40))
    logits(model, ids)  # default SampleConfig: too short to pay, so dense and recorded
    (reason,) = reasons(model)
    assert reason.startswith("seq_len 40: planning") and "cost model" in reason


def test_dense_equivalent_matches_sdpa_and_disable_restores():
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 300))
    ref = logits(model, ids)
    with fst.enabled(model, DENSE_EQUIVALENT):
        assert model.config._attn_implementation == "flexsample"
        got = logits(model, ids)
        assert {r.path for r in fst.layer_stats(model)} == {"sparse"}
    assert model.config._attn_implementation == "sdpa"
    assert len(fst.layer_stats(model)) == 2  # the last run's records, until reset
    fst.reset_stats(model)
    assert fst.layer_stats(model) == []
    assert float((got - ref).abs().max()) < 1e-4


def test_left_padding_matches_each_unpadded_prompt():
    """A left-padded batch: every real row equals running that prompt alone."""
    model = tiny_llama()
    long, short, pad, ids, mask = left_padded_batch()
    fst.enable(model, SPARSE)
    batch = logits(model, ids, attention_mask=mask)
    assert {r.path for r in fst.layer_stats(model)} == {"sparse"}  # the per-row path ran
    alone_long, alone_short = logits(model, long), logits(model, short)
    assert float((batch[0] - alone_long[0]).abs().max()) < 1e-4
    assert float((batch[1, pad:] - alone_short[0]).abs().max()) < 1e-4


def test_right_padding_falls_back_to_dense_and_says_why():
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 200))
    mask = torch.ones(2, 200, dtype=torch.long)
    mask[1, 150:] = 0
    ref = logits(model, ids, attention_mask=mask)
    fst.enable(model, SPARSE)
    got = logits(model, ids, attention_mask=mask)
    assert reasons(model) == {"mask is not left-padded causal"}
    assert float((got[0] - ref[0]).abs().max()) < 1e-5
    assert float((got[1, :150] - ref[1, :150]).abs().max()) < 1e-5


def test_decode_is_dense_and_counted():
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 260))
    fst.enable(model, SPARSE)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=3, do_sample=False)
    assert reasons(model) == {"decode"}
    decode_calls = [r for r in fst.layer_stats(model) if r.reason == "decode"]
    assert len(decode_calls) == 2 * 2  # 2 decode steps x 2 layers


def _chunked(model, ids, mask=None, split=200):
    """Prefill ``ids[:, :split]``, then the rest as a chunk after the cache: its logits."""
    kwargs = {} if mask is None else {"attention_mask": mask[:, :split]}
    with torch.no_grad():
        first = model(ids[:, :split], use_cache=True, **kwargs)
        if mask is not None:
            kwargs = {"attention_mask": mask}
        return model(ids[:, split:], past_key_values=first.past_key_values, **kwargs).logits


@pytest.mark.parametrize("padded", [False, True], ids=["one-row", "left-padded"])
def test_chunked_prefill_runs_sparse_with_sdpas_semantics(padded):
    if padded:
        _, _, _, ids, mask = left_padded_batch()  # padding (87 tokens) inside the first part
    else:
        ids, mask = torch.randint(0, 128, (1, 300)), None
    model = tiny_llama()
    ref = _chunked(model, ids, mask)
    fst.enable(model, DENSE_EQUIVALENT)
    got = _chunked(model, ids, mask)
    chunks = [r for r in fst.layer_stats(model) if r.q_len == 100]
    assert [r.path for r in chunks] == ["sparse", "sparse"] and chunks[0].kv_len == 300
    assert float((got - ref).abs().max()) < 1e-4
    fst.disable(model)
    fst.enable(model, SPARSE)
    _chunked(model, ids, mask)
    chunks = [r for r in fst.layer_stats(model) if r.q_len == 100]
    assert all(r.path == "sparse" and r.mean_density < 1 for r in chunks)


def test_padding_inside_a_chunk_runs_sdpa():
    _, _, pad, ids, mask = left_padded_batch()  # 87 padding tokens, then the short prompt
    model = tiny_llama()
    ref = _chunked(model, ids, mask, split=50)  # the chunk starts inside the padding
    fst.enable(model, DENSE_EQUIVALENT)
    got = _chunked(model, ids, mask, split=50)
    chunks = [r for r in fst.layer_stats(model) if r.q_len == 250]
    assert {r.reason for r in chunks} == {"mask is not left-padded causal"}
    assert float((got - ref)[:, pad - 50 :].abs().max()) < 1e-5


def test_two_models_keep_their_own_configs():
    a, b = tiny_llama(), tiny_llama()
    fst.enable(a, SPARSE)
    fst.enable(b, SPARSE.replace(alpha=0.5))
    ids = torch.randint(0, 128, (1, 400))
    logits(a, ids)
    logits(b, ids)
    da = sum(sum(r.density) for r in fst.layer_stats(a))
    db = sum(sum(r.density) for r in fst.layer_stats(b))
    assert db < da  # lower alpha keeps fewer blocks
    for module in fst.attention_modules(a):
        assert fst.layer_state(module).config.alpha == 0.9


def test_gemma3_sliding_layers_keep_their_semantics():
    model = tiny_gemma3()
    ids = torch.randint(0, 128, (1, 300))
    ref = logits(model, ids)
    fst.enable(model, DENSE_EQUIVALENT)
    got = logits(model, ids)
    by_layer = {r.layer: r for r in fst.layer_stats(model)}
    assert [by_layer[i].path for i in range(4)] == ["dense", "sparse", "dense", "sparse"]
    assert by_layer[0].reason == "sliding-window layer"
    assert float((got - ref).abs().max()) < 1e-4


def test_stats_table_is_readable():
    model = tiny_llama()
    fst.enable(model, SPARSE)
    logits(model, torch.randint(0, 128, (1, 300)))
    table = fst.stats_table(model)
    lines = table.splitlines()
    assert lines[0].startswith("flexsample: 2/2 layers ran their prefill sparse (mean prefill")
    header = next(line for line in lines if line.lstrip().startswith("layer"))
    assert header.split() == [
        "layer", "calls", "sparse", "density", "1st", "probe", "sample", "select", "cover",
        "mask", "attn", "decode", "dense",
    ]  # fmt: skip
    # The opt-in query-aware stage gets its column where it ran.
    fst.enable(model, SPARSE.replace(tile_keys=64))
    logits(model, torch.randint(0, 128, (1, 300)))
    lines = fst.stats_table(model).splitlines()
    header = next(line for line in lines if line.lstrip().startswith("layer"))
    assert "tiles" in header.split() and header.split()[-1] == "dense"
    body = lines[lines.index(header) + 2 :]
    assert [row.split()[:3] for row in body[:2]] == [["0", "1", "1"], ["1", "1", "1"]]
    assert any("median over a layer's prefill calls" in line for line in lines)
    assert max(map(len, lines)) <= fst.records.TABLE_WIDTH
    assert fst.summarize(model)[0]["sparse"] == 1


def test_stats_table_groups_the_reasons_of_dense_calls(project_costs):
    """One numbered line per reason (a long one, the cost model's, with a device name in it),
    the rows refer to it; after disable() the table says it shows the last run."""
    model = tiny_llama()
    fst.enable(model, SampleConfig())  # at 300 tokens the cost model runs every layer dense
    with torch.no_grad():
        model.generate(torch.randint(0, 128, (1, 300)), max_new_tokens=3, do_sample=False)
    lines = fst.stats_table(model).splitlines()
    assert lines[0].startswith("flexsample: 0/2 layers ran their prefill sparse")
    assert max(map(len, lines)) <= fst.records.TABLE_WIDTH
    legend = [line for line in lines if line.startswith("[")]
    assert len(legend) == 1 and legend[0].startswith("[1] 2 dense calls: seq_len 300: planning")
    rows = [line for line in lines if line.split()[:1] in (["0"], ["1"])]
    assert [row.split()[1:3] + row.split()[-1:] for row in rows] == [["3", "0", "[1]x1"]] * 2
    fst.disable(model)
    assert lines[0] in fst.stats_table(model).splitlines()[0]
    assert "(flexsample is disabled on this model: its last run)" in fst.stats_table(model)
    fst.reset_stats(model)
    assert fst.stats_table(model).splitlines()[0] == (
        "flexsample: no attention calls recorded on this model"
    )


def test_enable_on_chosen_layers_only():
    """``layers=`` runs SampleAttention in those layers; the others run SDPA, and say so."""
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 300))
    ref = logits(model, ids)
    fst.enable(model, DENSE_EQUIVALENT, layers=[1])
    got = logits(model, ids)
    by_layer = {r.layer: r for r in fst.layer_stats(model)}
    assert (by_layer[0].path, by_layer[0].reason) == ("dense", "layer not enabled")
    assert by_layer[1].path == "sparse"
    assert float((got - ref).abs().max()) < 1e-4
    with pytest.raises(ValueError, match=r"layers \[1, 7\] not all among the model's \[0, 1\]"):
        fst.enable(model, SPARSE, layers=[1, 7])


def test_enable_rejects_wrong_arguments():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        fst.enable(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="SampleConfig"):
        fst.enable(tiny_llama(), {"alpha": 0.9})


def test_capture_attention_inputs_returns_what_attention_sees():
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 90))
    captured = fst.capture_attention_inputs(model, ids, layers=[1])
    q, k, v = captured[1]
    assert q.shape == (1, 4, 90, 16) and k.shape == v.shape == (1, 2, 90, 16)
    assert model.config._attn_implementation == "sdpa"
    # Running flex_sample_attention (dense-equivalent) on them reproduces SDPA's output.
    from flexsample import flex_sample_attention

    out = flex_sample_attention(q, k, v, config=DENSE_EQUIVALENT)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert float((out - ref).abs().max()) < 1e-5
    with pytest.raises(ValueError, match="layers \\[7\\] not in the model"):
        fst.capture_attention_inputs(model, ids, layers=[7])


def test_left_padded_batch_with_a_row_below_min_seq_len():
    """One row sparse, one dense (too short): the record mixes both, densities per head."""
    model = tiny_llama()
    _long, short, pad, ids, mask = left_padded_batch()
    fst.enable(model, SPARSE.replace(min_seq_len=250))
    batch = logits(model, ids, attention_mask=mask)
    records = fst.layer_stats(model)
    assert {r.path for r in records} == {"sparse"}
    assert all(r.reason == "seq_len 213 < min_seq_len 250" for r in records)
    for r in records:  # mean over the rows: the dense row counts 1
        sparse_row = r.details[0].density[0]
        assert r.density == pytest.approx(((sparse_row + 1) / 2).tolist())
    assert float((batch[1, pad:] - logits(model, short)[0]).abs().max()) < 1e-4


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_head_densities_stay_on_the_inputs_device(device):
    """A CUDA batch mixing sparse and dense rows once stacked a CPU tensor with CUDA ones."""
    from flexsample import SampleStats
    from flexsample.integrations.transformers.records import head_densities

    sparse = SampleStats(
        path="sparse", seq_len=300, batch_size=1, num_heads=4,
        density=torch.full((1, 4), 0.5, device=device),
    )  # fmt: skip
    dense = SampleStats(path="dense", seq_len=200, batch_size=1, num_heads=4, reason="short")
    result = head_densities([sparse, dense], 4, torch.device(device))
    assert result.device.type == device and result.shape == (4,)
    if device != "meta":
        assert result.tolist() == [0.75] * 4


def test_autograd_runs_dense_and_says_why():
    """flexsample is inference-only: a forward with autograd on runs SDPA, counted."""
    model = tiny_llama()
    fst.enable(model, SPARSE)
    out = model(torch.randint(0, 128, (1, 300))).logits
    assert out.requires_grad
    assert reasons(model) == {"autograd on (flexsample is inference-only)"}


def test_reasons_of_one_kind_are_one_line():
    from flexsample.integrations.transformers.records import reason_kind

    probe = "probe: 8 rows per head put the least density at 0.{} for alpha 0.95: would not pay"
    assert reason_kind(probe.format(990)) == reason_kind(probe.format(871)) == "probe"
    assert reason_kind("seq_len 300: planning ~8 ms") == "seq_len #"
    assert reason_kind("layer not enabled") == "layer not enabled"
