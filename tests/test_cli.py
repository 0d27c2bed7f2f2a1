"""The ``flexsample`` command: values are checked while parsing, before any model loads."""

import time

import pytest

pytest.importorskip("transformers")

from flexsample import SampleConfig
from flexsample.integrations.cli import build_parser, config_from_args, main
from flexsample.integrations.demo import DemoResult, MethodRun, explain
from flexsample.presets import preset


@pytest.mark.parametrize(
    "argv, words",
    [
        (["demo", "--alpha", "2"], "alpha must lie in (0.0, 1.0], got 2.0"),
        (["demo", "--length", "0"], "must be between 1024 and 8192, got 0"),
        (["demo", "--length", "500"], "must be between 1024 and 8192, got 500"),
        (["demo", "--length", "9000"], "must be between 1024 and 8192, got 9000"),
        (["demo", "--depth", "1.5"], "must lie in [0, 1], got 1.5"),
        (["demo", "--repeats", "0"], "must be >= 1, got 0"),
        (["pictures", "--sample-ratio", "0"], "sample_ratio must lie in (0.0, 1.0]"),
        (["compare", "--tasks", "x", "--limit", "-1"], "must be >= 1, got -1"),
    ],
    ids=lambda x: " ".join(x) if isinstance(x, list) else None,
)
def test_bad_values_are_argparse_errors(argv, words, capsys):
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert words in capsys.readouterr().err
    assert time.perf_counter() - start < 5  # refused before any model loads


@pytest.mark.parametrize(
    "argv, line",
    [
        (["demo", "--bogus", "1"], "flexsample demo: error: unrecognized arguments: --bogus 1"),
        (["demo", "--json", "/no/such/folder/x.json"], "folder /no/such/folder does not exist"),
        (["demo", "--save-masks", "masks.txt"], "the picture format comes from the suffix"),
        (["compare", "--tasks", "flexsample_paskey_2k"], "did you mean flexsample_passkey_2k"),
        (
            ["compare", "--tasks", "flexsample_passkey_2k", "--model_args", "alpah=0.9"],
            "unknown model argument 'alpah': did you mean alpha? SampleConfig fields: preset,",
        ),
        (
            ["compare", "--tasks", "flexsample_passkey_2k", "--model_args", "alpha=2"],
            "model argument alpha must lie in (0.0, 1.0], got 2",
        ),
        (["nosuch"], "flexsample: error: argument command: invalid choice: 'nosuch'"),
    ],
    ids=["unknown-flag", "json-folder", "picture-format", "task", "model-arg", "value", "cmd"],
)
def test_errors_are_one_line_before_any_model_loads(argv, line, capsys, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setattr("flexsample.integrations.models.load_model", _no_model)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "usage:" not in err, err
    assert line in err and err.rstrip().endswith("--help)"), err


def _no_model(*args, **kwargs):
    raise AssertionError("a model was loaded")


def test_eval_checks_flexsample_arguments_before_lm_eval_loads_anything(capsys, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setattr("flexsample.integrations.models.load_model", _no_model)
    argv = ["eval", "--model", "flexsample", "--model_args", "alpah=0.9", "--tasks", "x"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("flexsample eval: error: argument --model_args: unknown model argument")
    assert main(["eval", "--model", "flexsample", "--tasks", "flexsample_pasky_2k"]) == 2
    assert "no task 'flexsample_pasky_2k'" in capsys.readouterr().err


def test_version(capsys):
    from flexsample import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out == f"flexsample {__version__}\n"


def test_errors_in_a_run_are_one_line_unless_debug(capsys, monkeypatch):
    def fails(error):
        def run(argv):
            raise error

        return run

    monkeypatch.setattr("flexsample.integrations.cli._run", fails(ValueError("bad length")))
    assert main(["demo"]) == 2
    assert capsys.readouterr().err == "flexsample: error: bad length\n"
    monkeypatch.setattr("flexsample.integrations.cli._run", fails(RuntimeError("boom")))
    assert main(["demo"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("flexsample: RuntimeError: boom (at test_cli.py:")
    assert err.endswith("run with --debug for the traceback)\n")
    with pytest.raises(RuntimeError, match="boom"):
        main(["demo", "--debug"])


def test_config_options_build_a_sample_config():
    parse = build_parser().parse_args
    assert config_from_args(parse(["demo"])) == SampleConfig()
    args = parse(["demo", "--preset", "0.3", "--alpha", "0.9"])
    assert config_from_args(args) == preset("0.3").replace(alpha=0.9)
    with pytest.raises(SystemExit):
        parse(["demo", "--preset", "0.9"])


def test_eval_help_names_the_model_its_arguments_and_the_tasks(capsys):
    pytest.importorskip("lm_eval")
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = capsys.readouterr().out
    assert "--model flexsample" in out and "alpha" in out and "flexsample_passkey_2k" in out
    # Then the options of lm-eval's `run`, which `flexsample eval` is (not its top level).
    assert out.index("flexsample eval:") < out.index("usage: lm-eval run")
    assert "--model_args" in out[out.index("usage: lm-eval run") :]


def _result(dense_prefill, dense_att, flex_prefill, flex_att, overhead, density):
    run = dict(answer="12345", correct=True)
    return DemoResult(
        tokens=4096,
        passkey="12345",
        depth=0.5,
        config=SampleConfig(),
        dense=MethodRun("dense SDPA", dense_prefill, dense_att, 0.0, 1.0, **run),
        flexsample=MethodRun("flexsample", flex_prefill, flex_att, overhead, density, **run),
        layers=[],
    )


def test_demo_explains_a_slower_sparse_attention_from_its_numbers():
    """The first new user's run: 60 s dense prefill with 10 s of attention, sparse 46 s."""
    text = "\n".join(explain(_result(60.0, 10.0, 96.0, 46.0, 12.0, 0.56)))
    assert "of which attention 10.00 s (17%)" in text
    assert "even free attention would make prefill at most 1.20x faster" in text  # 60 / 50
    overhead = "sampling, selection, row cover and mask 12.00 s"
    assert f"{overhead} + sparse attention 34.00 s" in text
    assert "Sparse attention was slower than dense" in text
    assert "6.07x SDPA's time" in text  # 34 / (0.56 * 10)
    assert "0.62x, flexsample slower" in text


def test_demo_explains_a_faster_prefill_without_excuses():
    text = "\n".join(explain(_result(37.0, 20.0, 34.7, 17.3, 2.2, 0.476)))
    assert "slower than dense" not in text
    assert "1.07x, flexsample faster" in text
    # 37 / (17 + 0.476 * 20) = 1.395; 0.6's demo: 41.35 / (20.61 + 0.56 * 20.74) = 1.283.
    assert "would make prefill at most 1.40x faster" not in text
    assert "would make prefill 1.40x faster" in text
    text = "\n".join(explain(_result(41.35, 20.74, 38.57, 19.24, 5.06, 0.56)))  # 0.6's demo
    assert "would make prefill at most 1.28x faster: what the masks keep" in text


def test_demo_explains_a_prefill_that_ran_dense_in_every_layer():
    """At lengths where the cost model sends every layer dense, the demo must not describe
    sparse attention or blame the sparse kernel (it did at 2K before)."""
    result = _result(20.0, 4.0, 20.3, 4.1, 0.02, 1.0)
    reason = "seq_len 2048: planning ~9 ms + the sparsest call ~6 ms would not beat dense ~3 ms"
    result.layers = [
        {"layer": i, "calls": 3, "sparse": 0, "fallbacks": {reason: 3}} for i in range(30)
    ]
    text = "\n".join(explain(result))
    assert f"flexsample ran dense attention in every layer ({reason})" in text
    assert "0.02 s deciding so" in text
    assert "sparse attention" not in text and "sparse kernel" not in text
    assert "0.99x, flexsample slower" in text


@pytest.mark.parametrize("command", ["demo", "pictures", "calibrate"])
def test_every_command_prints_its_help(command, capsys):
    """argparse formats help with %: a preset's "8% of the sequence" once broke demo --help."""
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ") and command in out
    if command != "calibrate":
        assert "8% of the sequence" in out  # the 0.1 preset, printed as written
