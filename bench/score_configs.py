"""Score selection configs on SmolLM2's layers at 8K against exact float64 attention.

Each ``--config`` is a JSON object of :class:`~flexsample.SampleConfig` fields changed from
the always-sparse defaults (``{}``: the defaults' selection). SmolLM2-135M's layers (2, 15
and 27 by default) on the frontier benchmark's passkey prompt (bench/sampled_rows.py) are
planned with each and scored on every query row (:func:`flexsample.oracle.evaluate_plan`):
density (computed pairs over causal pairs), output error, kept mass; then the mean over the
layers per config, the figure issue #10's SmolLM2 target is stated in; and each density over
the per-row token oracle's at the same output error ("x oracle"), from the oracle points of a
frontier run on the same prompt (``--oracle``: by default 0.1's committed frontier JSON, whose
oracle rows depend only on the inputs).

    PYTHONPATH=. python3 bench/score_configs.py --config '{}' \\
        --config '{"group_union": false, "alpha": 0.96}'
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

from report import frontier_rows, oracle_density_at, write_rows
from sampled_rows import add_layer_arguments, start_layer_run

import flexsample as fs
from flexsample.oracle import evaluate_plan


def parse_config(text: str) -> tuple[str, fs.SampleConfig]:
    """``(label, config)`` from a JSON object of SampleConfig fields (always sparse)."""
    fields = json.loads(text)
    if not isinstance(fields, dict):
        raise SystemExit(f"--config must be a JSON object of SampleConfig fields: {text!r}")
    label = ", ".join(f"{k}={v}" for k, v in fields.items()) or "defaults"
    return label, fs.SampleConfig.always_sparse(**fields)


#: The frontier run whose token-oracle points the densities are compared with.
DEFAULT_ORACLE = Path(__file__).parent / "results" / "cpu_selection_0.1.json"


def load_oracle(path: Path) -> dict[str, list[dict]]:
    """``{inputs: token-oracle points}`` of a frontier run's pytest-benchmark JSON."""
    benches = json.loads(path.read_text())["benchmarks"]
    points: dict[str, list[dict]] = {}
    for row in frontier_rows(benches):
        if row["method"] == "oracle tokens":
            points.setdefault(row["inputs"], []).append(row)
    return points


def times_oracle(row: dict, oracle: dict[str, list[dict]], seq_len: int) -> float | None:
    """A scored plan's density over the token oracle's at its output error (None where the
    oracle was not run on this layer, or the error lies outside its alpha points)."""
    points = oracle.get(f"SmolLM2 S={seq_len} layer {row['layer']}", [])
    at = oracle_density_at(row["output_error"], points)
    return None if not at else row["density"] / at


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", action="append", required=True, help="JSON SampleConfig fields")
    p.add_argument(
        "--oracle",
        type=Path,
        default=DEFAULT_ORACLE,
        help="frontier JSON with the token oracle's points on this prompt "
        "(default: bench/results/cpu_selection_0.1.json)",
    )
    add_layer_arguments(p)
    args = p.parse_args(argv)
    configs = [parse_config(text) for text in args.config]
    oracle = load_oracle(args.oracle)
    meta, captured = start_layer_run(args)
    print("| config | layer | density | output error | x oracle | kept mass p1 | min |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for label, config in configs:
        for layer, (q, k, v) in captured.items():
            quality = evaluate_plan(q, k, v, fs.plan_prefill(q, k, config))
            row = {"config": label, "layer": layer, **dataclasses.asdict(quality)}
            row["x_oracle"] = times_oracle(row, oracle, q.shape[-2])
            rows.append(row)
            print(
                f"| {label} | {layer} | {quality.density:.3f} | {quality.output_error:.2e} | "
                f"{_fmt(row['x_oracle'])} | {quality.kept_mass_p1:.3f} | "
                f"{quality.kept_mass_min:.3f} |",
                flush=True,
            )
        mine = [r for r in rows if r["config"] == label]
        density = statistics.mean(r["density"] for r in mine)
        error = statistics.mean(r["output_error"] for r in mine)
        ratios = [r["x_oracle"] for r in mine]
        ratio = None if None in ratios else statistics.mean(ratios)
        print(f"| {label} | mean | {density:.3f} | {error:.2e} | {_fmt(ratio)} |  |  |", flush=True)
    if args.json:
        fields = {label: dataclasses.asdict(config) for label, config in configs}
        write_rows(args.json, meta, rows, configs=fields)


if __name__ == "__main__":
    main()
