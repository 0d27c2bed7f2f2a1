"""``flexsample eval`` (lm-eval's CLI, unchanged) and ``flexsample compare`` (dense vs sparse)."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

from ...provenance import provenance
from ..task_files import task_names, unknown_task
from . import CONFIG_FIELDS, TASKS_DIR, FlexSampleLM, check_model_args

SUBCOMMANDS = ("run", "ls", "validate")


def run_lm_eval(argv: list[str]) -> int:
    """Run lm-eval's own command line with the ``flexsample`` model and tasks available.

    Every lm-eval flag works unchanged. flexsample's task folder is passed as
    ``--include_path``; lm-eval takes only one, so giving your own is refused with a hint.
    """
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    if any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
        print(
            "flexsample eval passes its own task folder as --include_path and lm-eval takes "
            f"only one. Copy your task files into a folder together with {TASKS_DIR}/*, or "
            "run `lm-eval` directly with your folder.",
            file=sys.stderr,
        )
        return 2
    command = argv[0] if argv and argv[0] in SUBCOMMANDS else ("run" if argv else None)
    asks_help = any(a in ("-h", "--help") for a in argv[:2])
    if command in (None, "run") and (asks_help or argv in ([], ["run"])):
        print(eval_help())  # then lm-eval's options of `run`, which `flexsample eval` is
        sys.argv = ["flexsample eval", "run", "--help"]
    elif asks_help:
        sys.argv = ["flexsample eval", *argv]
    else:
        if (problem := check_eval_arguments(argv)) is not None:
            print(f"flexsample eval: error: {problem} (see --help)", file=sys.stderr)
            return 2
        rest = argv[1:] if argv[0] in SUBCOMMANDS else argv
        sys.argv = ["flexsample eval", command, *rest, "--include_path", str(TASKS_DIR)]
    setup_logging()
    parser = HarnessCLI()
    parser.execute(parser.parse_args())
    return 0


def _values(argv: list[str], flag: str) -> list[str]:
    """The values given to ``flag`` (``--flag v`` or ``--flag=v``) in an lm-eval argv."""
    values = [a.split("=", 1)[1] for a in argv if a.startswith(flag + "=")]
    values += [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]
    return values


def check_eval_arguments(argv: list[str]) -> str | None:
    """What is wrong with flexsample's part of an ``eval`` argv, before lm-eval loads a model:
    ``--model_args`` of the flexsample model, and task names in flexsample's namespace."""
    if "flexsample" in _values(argv, "--model"):
        for text in _values(argv, "--model_args"):
            try:
                check_model_args(text)
            except ValueError as error:
                return f"argument --model_args: {error}"
    for text in _values(argv, "--tasks"):
        for name in text.split(","):
            if (problem := unknown_task(name)) is not None:
                return f"argument --tasks: {problem}"
    return None


def eval_help() -> str:
    """What ``flexsample eval`` adds to lm-eval's CLI; printed before lm-eval's own help."""
    indent = " " * 23

    def wrapped(text: str) -> str:
        return textwrap.fill(text, 96, initial_indent=indent, subsequent_indent=indent)

    tasks = task_names()
    return "\n".join(
        [
            "flexsample eval: lm-eval's command line with flexsample's model and tasks.",
            "",
            "  --model flexsample   lm-eval's HF model with SampleAttention enabled",
            "  --model_args k=v,... pretrained=<model folder, or smollm2: the offline default>,",
            wrapped(
                "gguf_file=..., attention=flexsample|dense, any SampleConfig field ("
                + ", ".join(CONFIG_FIELDS)
                + "), and any argument of --model hf"
            ),
            f"  --tasks              flexsample's {len(tasks)} offline tasks:",
            wrapped(", ".join(tasks)),
            wrapped(
                "A task whose prompts are longer than the model's context (SmolLM2: 8192 "
                "tokens) is refused with an error, not silently truncated."
            ),
            "",
            "Example: flexsample eval --model flexsample --model_args alpha=0.9 "
            "--tasks flexsample_passkey_2k --limit 10",
            "",
            "lm-eval's own options follow.",
            "",
        ]
    )


def compare(
    tasks: list[str],
    *,
    limit: int | None,
    model_args: str = "",
    output: Path | None = None,
    console=None,
) -> dict:
    """Run ``tasks`` with dense attention and with flexsample on one loaded model.

    Returns (and writes to ``output/comparison.json`` and ``.md``) one row per task: score
    of each, mean density, mean prefill time per request, and the speedup of prefill.
    """
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import simple_parse_args_string
    from rich.console import Console

    console = console or Console()
    started = provenance()
    args = simple_parse_args_string(model_args) if model_args else {}
    lm = FlexSampleLM(attention="dense", **args)
    manager = TaskManager(include_path=str(TASKS_DIR), metadata=args)
    runs = {}
    for attention in ("dense", "flexsample"):
        lm.set_attention(attention)
        lm.report.clear()
        console.rule(f"{attention} attention")
        results = simple_evaluate(model=lm, tasks=tasks, limit=limit, task_manager=manager)
        runs[attention] = (results["results"], lm.summary())

    rows = []
    for task in tasks:
        row = {"task": task}
        for attention, (results, timing) in runs.items():
            scores = results.get(task, {})
            row[f"{attention}_score"] = scores.get("exact_match,none")
            row[f"{attention}_stderr"] = scores.get("exact_match_stderr,none")
            row[f"{attention}_prefill_s"] = timing.get(task, {}).get("prefill_s_mean")
            row[f"{attention}_density"] = timing.get(task, {}).get("density_mean")
            row["samples"] = timing.get(task, {}).get("prefills")
        dense_t, sparse_t = row["dense_prefill_s"], row["flexsample_prefill_s"]
        row["prefill_speedup"] = dense_t / sparse_t if dense_t and sparse_t else None
        rows.append(row)
    report = {
        **started,
        "model_args": args,
        "limit": limit,
        "config": lm.sample_config.__dict__,
        "rows": rows,
    }
    markdown = comparison_markdown(report)
    console.print(markdown)
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        (output / "comparison.json").write_text(json.dumps(report, indent=1, default=str))
        (output / "comparison.md").write_text(markdown)
        console.print(f"wrote {output / 'comparison.json'} and {output / 'comparison.md'}")
    return report


def comparison_markdown(report: dict) -> str:
    """The rows of a :func:`compare` report as a Markdown table."""

    def num(x, spec):
        return "n/a" if x is None else format(x, spec)

    lines = [
        "| task | samples | dense score | flexsample score | flexsample mean density | "
        "dense prefill s/sample | flexsample prefill s/sample | prefill speedup |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['task']} | {r['samples']} | {num(r['dense_score'], '.2f')} | "
            f"{num(r['flexsample_score'], '.2f')} | {num(r['flexsample_density'], '.3f')} | "
            f"{num(r['dense_prefill_s'], '.2f')} | {num(r['flexsample_prefill_s'], '.2f')} | "
            f"{num(r['prefill_speedup'], '.2f')}x |"
        )
    if "commit" in report:
        lines += [
            "",
            f"code at commit {report['commit']} (flexsample {report['flexsample']}, torch "
            f"{report['torch']}), started {report['started']}",
        ]
    return "\n".join(lines) + "\n"
