"""Score selection configs on SmolLM2's layers at 8K against exact float64 attention.

Each ``--config`` is a JSON object of :class:`~flexsample.SampleConfig` fields changed from
the always-sparse defaults (``{}``: the defaults' selection). SmolLM2-135M's layers (2, 15
and 27 by default) on the frontier benchmark's passkey prompt (bench/sampled_rows.py) are
planned with each and scored on every query row (:func:`flexsample.oracle.evaluate_plan`):
density (computed pairs over causal pairs), output error, kept mass; then the mean over the
layers per config, the figure issue #10's SmolLM2 target is stated in.

    PYTHONPATH=. python3 bench/score_configs.py --config '{}' \\
        --config '{"group_union": false, "alpha": 0.96}'
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics

from report import write_rows
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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", action="append", required=True, help="JSON SampleConfig fields")
    add_layer_arguments(p)
    args = p.parse_args(argv)
    configs = [parse_config(text) for text in args.config]
    meta, captured = start_layer_run(args)
    print("| config | layer | density | output error | kept mass p1 | min |")
    print("|---|---|---|---|---|---|")
    rows = []
    for label, config in configs:
        for layer, (q, k, v) in captured.items():
            quality = evaluate_plan(q, k, v, fs.plan_prefill(q, k, config))
            rows.append({"config": label, "layer": layer, **dataclasses.asdict(quality)})
            print(
                f"| {label} | {layer} | {quality.density:.3f} | {quality.output_error:.2e} | "
                f"{quality.kept_mass_p1:.3f} | {quality.kept_mass_min:.3f} |",
                flush=True,
            )
        mine = [r for r in rows if r["config"] == label]
        density = statistics.mean(r["density"] for r in mine)
        error = statistics.mean(r["output_error"] for r in mine)
        print(f"| {label} | mean | {density:.3f} | {error:.2e} |  |  |", flush=True)
    if args.json:
        fields = {label: dataclasses.asdict(config) for label, config in configs}
        write_rows(args.json, meta, rows, configs=fields)


if __name__ == "__main__":
    main()
