"""Turn pytest-benchmark JSON of the suites in bench/ into Markdown tables and PNG plots.

    python bench/report.py bench/results/cpu_operator.json bench/results/cpu_models.json \
        --name cpu --out bench/results

joins the benchmarks of all files and writes ``<name>.md`` (tables, and each performance
target with its measured value) and ``<name>_latency.png``, ``<name>_speedup.png``,
``<name>_alpha.png``. Times are medians: the device time (CUDA events) where the run recorded
one, else the wall time.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import sys
from collections import defaultdict
from pathlib import Path


def write_rows(path: str | Path, meta: dict, rows: list[dict], **extra: object) -> None:
    """Write a bench script's run: ``{"meta": meta, **extra, "rows": rows}`` as JSON (the
    form every script in bench/ with a ``--json`` option writes)."""
    Path(path).write_text(json.dumps({"meta": meta, **extra, "rows": rows}, indent=1))


def ms(bench: dict) -> float:
    """Median milliseconds of one benchmark entry (device time where recorded)."""
    info = bench.get("extra_info", {})
    return info["device_ms"] if "device_ms" in info else bench["stats"]["median"] * 1e3


#: A results file named ``<name>_<version>.json`` (``cpu_selection_0.1.json``) holds an earlier
#: release's selection: its frontier rows are labelled with the version. Oracle rows depend
#: only on the inputs, which the frontier suite draws the same way in every release.
_RELEASE_SUFFIX = re.compile(r"_(\d+\.\d+)$")


def load(paths: list[Path]) -> tuple[list[tuple[str, dict]], list[dict]]:
    """Each file's name and run information, and the benchmarks of all files."""
    runs = [(p.name, json.loads(p.read_text())) for p in paths]
    benches = []
    for path, (_, run) in zip(paths, runs, strict=True):
        release = _RELEASE_SUFFIX.search(path.stem)
        for b in run["benchmarks"]:
            info = b.get("extra_info", {})
            if release and info.get("suite") == "frontier" and "points" not in info:
                b = {**b, "extra_info": {**info, "method": f"{release[1]}: {info['method']}"}}
            benches.append(b)
    return runs, benches


def operator_rows(benches: list[dict], inputs: str) -> list[dict]:
    """One row per flexsample case; every time in it comes from one interleaved measurement."""
    out = []
    cases = [
        b["extra_info"]
        for b in benches
        if b.get("extra_info", {}).get("inputs") == inputs
        and b["extra_info"].get("kind") == "flexsample"
    ]
    for info in sorted(
        cases, key=lambda i: (i["seq_len"], i.get("layer") or 0, i.get("target_density") or 0)
    ):
        sdpa, flex_dense, total = info["sdpa_ms"], info["flex_dense_ms"], info["total_ms"]
        overhead = info["sample_ms"] + info["select_ms"] + info["mask_ms"]
        out.append({
            "seq_len": info["seq_len"], "layer": info.get("layer"),
            "target": info.get("target_density"), "density": info["density"],
            "sample_ms": info["sample_ms"], "select_ms": info["select_ms"],
            "mask_ms": info["mask_ms"], "attention_ms": info["attention_ms"],
            "total_ms": total, "sdpa_ms": sdpa, "flex_dense_ms": flex_dense,
            "speedup": sdpa / total, "overhead_vs_sdpa": overhead / sdpa,
            "attention_vs_density": info["attention_ms"] / (info["density"] * flex_dense),
            "output_rel_error": info.get("output_rel_error"),
        })  # fmt: skip
    return out


def prefill_rows(benches: list[dict]) -> list[dict]:
    by_len: dict = defaultdict(dict)
    for b in benches:
        info = b.get("extra_info", {})
        if info.get("kind") in ("dense", "flexsample", "always sparse") and "passkey" in info:
            by_len[info["seq_len"]][info["kind"]] = b
    rows = []
    for seq_len, pair in sorted(by_len.items()):
        if not {"dense", "flexsample"} <= set(pair):
            continue
        d, f = pair["dense"], pair["flexsample"]
        always = pair.get("always sparse")
        fi = f["extra_info"]
        densities = [x for x in fi["layer_density"] if x is not None]
        rows.append({
            "seq_len": seq_len, "dense_s": ms(d) / 1e3, "flexsample_s": ms(f) / 1e3,
            "speedup": ms(d) / ms(f), "mean_density": sum(densities) / len(densities),
            "layer_density": densities,
            "sample_s": fi["sample_s"] + fi["select_s"] + fi["mask_s"],
            "attention_s": fi["attention_s"], "passkey": fi["passkey"],
            "dense_answer": d["extra_info"]["answer"], "flexsample_answer": fi["answer"],
            "always_sparse_s": ms(always) / 1e3 if always else None,
        })  # fmt: skip
    return rows


def alpha_rows(benches: list[dict]) -> list[dict]:
    rows = [
        dict(b["extra_info"], operator_ms=ms(b))
        for b in benches
        if b.get("extra_info", {}).get("kind") == "alpha"
    ]
    return sorted(rows, key=lambda r: r["alpha"])


def frontier_rows(benches: list[dict]) -> list[dict]:
    """Rows of the selection frontier: one per flexsample method, one per oracle alpha."""
    rows = []
    for b in benches:
        info = b.get("extra_info", {})
        if info.get("suite") != "frontier":
            continue
        rows.extend(info["points"] if "points" in info else [dict(info, call_ms=ms(b))])
    return rows


def _f(x, spec=".2f", suffix="") -> str:
    return "n/a" if x is None else f"{x:{spec}}{suffix}"


def _header(runs: list[tuple[str, dict]], name: str) -> list[str]:
    """Machine, result files and how the times were taken."""
    machine = runs[0][1].get("machine_info", {})
    lines = [
        f"## Benchmark results: {name}",
        "",
        f"Machine: {machine.get('cpu', {}).get('brand_raw', machine.get('processor', '?'))}, "
        f"{machine.get('cpu', {}).get('count', '?')} logical CPUs; Python "
        f"{machine.get('python_version', '?')}.",
        "",
    ]
    for file, data in runs:
        commit = data.get("commit_info", {})
        lines.append(
            f"- `{file}`: commit {commit.get('id', '?')[:10]}"
            f"{' (with uncommitted changes)' if commit.get('dirty') else ''}, "
            f"{data.get('datetime', '')[:19]}"
        )
    lines += [
        "",
        "Times are medians after a warm-up round (compilation excluded). In the operator "
        "tables every time of a row comes from the same interleaved rounds (each stage, the "
        "whole call, SDPA, dense flex, one after the other), so its ratios compare like "
        "with like.",
        "",
    ]
    return lines


def _operator_section(op: list[dict]) -> list[str]:
    """Planted-input operator table."""
    if not op:
        return []
    lines: list[str] = []
    lines += [
        "### Attention operator, planted inputs",
        "",
        "| S | target | density | sample | select | mask | attention | flexsample | "
        "SDPA | flex dense | speedup vs SDPA | overhead / SDPA | "
        "attention / (d x flex dense) |",
        "|" + "---|" * 13,
    ]
    for r in op:
        lines.append(
            f"| {r['seq_len']} | {r['target']} | {r['density']:.3f} | "
            f"{r['sample_ms']:.1f} | {r['select_ms']:.1f} | {r['mask_ms']:.1f} | "
            f"{r['attention_ms']:.1f} | {r['total_ms']:.1f} | {_f(r['sdpa_ms'], '.1f')} | "
            f"{_f(r['flex_dense_ms'], '.1f')} | {_f(r['speedup'], '.2f', 'x')} | "
            f"{_f(r['overhead_vs_sdpa'] and 100 * r['overhead_vs_sdpa'], '.1f', '%')} | "
            f"{_f(r['attention_vs_density'], '.2f')} |"
        )
    lines += ["", "(milliseconds)", ""]
    return lines


def _captured_section(real: list[dict]) -> list[str]:
    """Operator table on q/k/v captured from SmolLM2."""
    if not real:
        return []
    lines: list[str] = []
    lines += [
        "### Attention operator, q/k/v captured from SmolLM2",
        "",
        "| S | layer | density | sample+select+mask | attention | flexsample | SDPA | "
        "flex dense | speedup vs SDPA | output rel. error |",
        "|" + "---|" * 10,
    ]
    for r in real:
        lines.append(
            f"| {r['seq_len']} | {r['layer']} | {r['density']:.3f} | "
            f"{r['sample_ms'] + r['select_ms'] + r['mask_ms']:.1f} | "
            f"{r['attention_ms']:.1f} | {r['total_ms']:.1f} | {_f(r['sdpa_ms'], '.1f')} | "
            f"{_f(r['flex_dense_ms'], '.1f')} | {_f(r['speedup'], '.2f', 'x')} | "
            f"{_f(r['output_rel_error'], '.4f')} |"
        )
    lines += ["", "(milliseconds)", ""]
    return lines


def _prefill_section(prefill: list[dict]) -> list[str]:
    """SmolLM2 prefill table and densities per layer."""
    if not prefill:
        return []
    lines: list[str] = []
    lines += [
        "### SmolLM2-135M prefill (time to first token)",
        "",
        "| S | dense | flexsample | every layer sparse | speedup | mean density | "
        "sampling+select+mask | sparse attention | pass key | dense answer | "
        "flexsample answer |",
        "|" + "---|" * 11,
    ]
    for r in prefill:
        if r.get("always_sparse_s") is not None:
            always = f"{r['always_sparse_s']:.2f} s ({r['dense_s'] / r['always_sparse_s']:.2f}x)"
        else:
            always = "n/a"
        lines.append(
            f"| {r['seq_len']} | {r['dense_s']:.2f} s | {r['flexsample_s']:.2f} s | {always} | "
            f"{r['speedup']:.2f}x | {r['mean_density']:.3f} | {r['sample_s']:.2f} s | "
            f"{r['attention_s']:.2f} s | {r['passkey']} | {r['dense_answer']} | "
            f"{r['flexsample_answer']} |"
        )
    lines += [
        "",
        "Density per layer (flexsample): "
        + "; ".join(
            f"S={r['seq_len']}: " + " ".join(f"{d:.2f}" for d in r["layer_density"])
            for r in prefill
        ),
        "",
    ]
    return lines


def _alpha_section(alphas: list[dict]) -> list[str]:
    """alpha sweep table."""
    if not alphas:
        return []
    lines: list[str] = []
    lines += [
        "### alpha sweep (SmolLM2)",
        "",
        "| alpha | density | kept mass (mean) | kept mass (1st pct. row) | "
        "output rel. error | passkey accuracy | same answer as dense | "
        "operator ms (layer 15) |",
        "|" + "---|" * 8,
    ]
    for r in alphas:
        lines.append(
            f"| {r['alpha']} | {r['density']:.3f} | {r['kept_mass_mean']:.4f} | "
            f"{r['kept_mass_p1']:.4f} | {r['output_rel_error']:.4f} | "
            f"{r['passkey_accuracy']:.2f} | {r['passkey_same_as_dense']:.2f} | "
            f"{r['operator_ms']:.1f} |"
        )
    lines += [
        "",
        f"Dense attention's passkey accuracy on the same prompts: "
        f"{alphas[0]['dense_passkey_accuracy']:.2f} ({alphas[0]['prompts']} prompts, "
        f"{alphas[0]['seq_len']} tokens).",
        "",
    ]
    return lines


def oracle_density_at(error: float, oracle: list[dict]) -> float | None:
    """An oracle's density at ``error``, interpolated between its alpha points
    (linear in log error); None outside the range they span."""
    points = sorted((r["output_error"], r["density"]) for r in oracle if r["output_error"] > 0)
    for (e0, d0), (e1, d1) in itertools.pairwise(points):
        if e0 <= error <= e1:
            t = 0.0 if e1 == e0 else math.log(error / e0) / math.log(e1 / e0)
            return d0 + t * (d1 - d0)
    return None


def _frontier_section(frontier: list[dict]) -> list[str]:
    """One table per input: each selection's density, output error and kept mass."""
    if not frontier:
        return []
    lines = [
        "### Selection frontier (exact float64 attention as reference)",
        "",
        "Density = computed (query, key) pairs / causal pairs. Kept mass = fraction of a row's "
        "exact attention mass inside the mask, over all rows and heads. The oracles keep, for "
        "each row, its fewest keys (tokens) or key tiles reaching alpha of its mass; the "
        "query-tile oracle, for each 128-row query tile, the fewest keys (ranked by the "
        "tile's summed mass) that give every row of the tile alpha: what a tile kernel can "
        "reach. 'x oracle' and 'x tile oracle' = density over the token oracle's and the "
        "query-tile oracle's density at the same output error (interpolated between their "
        "alpha points; n/a outside their range or where not measured). Window and "
        "columns: means over heads, in tokens; tile keys: each query tile's own keys, mean "
        "over tiles and heads (query-aware selection).",
        "",
    ]
    for inputs in dict.fromkeys(r["inputs"] for r in frontier):
        rows = [r for r in frontier if r["inputs"] == inputs]
        oracle = [r for r in rows if r["method"] == "oracle tokens"]
        tiles = [r for r in rows if r["method"] == "oracle query tiles"]
        lines += [
            f"#### {inputs}",
            "",
            "| selection | alpha | density | output rel. error | x oracle | x tile oracle | "
            "kept mass min | kept mass 1st pct. | kept mass mean | window | columns | "
            "tile keys |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            ratios = []
            for reference in (oracle, tiles):
                at = (
                    None
                    if r["method"].startswith("oracle")
                    else oracle_density_at(r["output_error"], reference)
                )
                ratios.append(None if not at else r["density"] / at)
            lines.append(
                f"| {r['method']} | {_f(r.get('alpha'), '.2f')} | {r['density']:.3f} | "
                f"{r['output_error']:.2e} | {_f(ratios[0], '.2f')} | {_f(ratios[1], '.2f')} | "
                f"{r['kept_mass_min']:.4f} | "
                f"{r['kept_mass_p1']:.4f} | {r['kept_mass_mean']:.4f} | "
                f"{_f(r.get('mean_window'), '.0f')} | {_f(r.get('mean_columns'), '.0f')} | "
                f"{_f(r.get('mean_tile_keys'), '.1f')} |"
            )
        lines.append("")
    return lines


def markdown(
    runs: list[tuple[str, dict]],
    op: list[dict],
    real: list[dict],
    prefill: list[dict],
    alphas: list[dict],
    name: str,
    frontier: list[dict] = (),
) -> str:
    """The whole report: header, one section per suite present, and the targets."""
    lines = _header(runs, name)
    lines += _operator_section(op) + _captured_section(real)
    lines += _prefill_section(prefill) + _alpha_section(alphas)
    lines += _frontier_section(frontier)
    lines += targets(op, prefill)
    return "\n".join(lines) + "\n"


def targets(op: list[dict], prefill: list[dict]) -> list[str]:
    """The CPU performance targets of the benchmark issue, each with its measured value."""
    out = ["### Targets (measured in this run)", ""]
    at16 = [r for r in op if r["seq_len"] == 16384 and r["overhead_vs_sdpa"] is not None]
    if at16:
        worst = max(r["overhead_vs_sdpa"] for r in at16)
        out.append(
            f"- Sampling + selection + mask at S=16K at most 10% of dense SDPA: "
            f"{100 * worst:.1f}% (worst case) -> {'met' if worst <= 0.10 else 'MISSED'}"
        )
    ratios = [
        r
        for r in op
        if r["attention_vs_density"] is not None
        and 0.08 <= r["density"] <= 0.55
        and r["seq_len"] >= 8192
    ]
    if ratios:
        worst = max(r["attention_vs_density"] for r in ratios)
        out.append(
            f"- Block-sparse attention at density d at most 1.3 d x dense flex time "
            f"(S >= 8K, d in 10%..50%): worst ratio {worst:.2f} d -> "
            f"{'met' if worst <= 1.3 else 'MISSED'}"
        )
    at32 = [r for r in op if r["seq_len"] == 32768 and r["target"] == 0.2 and r["speedup"]]
    if at32:
        r = at32[0]
        verdict = "met" if r["speedup"] >= 3 else "MISSED"
        out.append(
            f"- S=32K, planted, about 20% density (reached {r['density']:.3f}): at least 3x "
            f"faster than SDPA end to end: {r['speedup']:.2f}x -> {verdict}. Breakdown: "
            f"sampling {r['sample_ms']:.0f} ms, selection+mask "
            f"{r['select_ms'] + r['mask_ms']:.0f} ms, sparse attention "
            f"{r['attention_ms']:.0f} ms; SDPA {r['sdpa_ms']:.0f} ms, dense flex "
            f"{r['flex_dense_ms']:.0f} ms (flex kernel at {r['flex_dense_ms'] / r['sdpa_ms']:.2f}x "
            f"SDPA's time for the same dense work)."
        )
    long = [r for r in prefill if r["seq_len"] >= 8000]
    if long:
        r = long[0]
        same = r["dense_answer"] == r["flexsample_answer"]
        out.append(
            f"- SmolLM2 prefill at {r['seq_len']} tokens faster than dense SDPA with the same "
            f"passkey answer: {r['speedup']:.2f}x, answers {r['dense_answer']} / "
            f"{r['flexsample_answer']} -> {'met' if r['speedup'] > 1 and same else 'MISSED'}"
        )
    return [*out, ""] if len(out) > 2 else []


def plots(op: list[dict], alphas: list[dict], out: Path, name: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if op:
        fig, ax = plt.subplots(figsize=(6, 4))
        lengths = sorted({r["seq_len"] for r in op})
        base = {r["seq_len"]: r for r in op}
        ax.plot(lengths, [base[s]["sdpa_ms"] for s in lengths], "k-o", label="dense SDPA")
        ax.plot(
            lengths,
            [base[s]["flex_dense_ms"] for s in lengths],
            "k--s",
            label="dense FlexAttention",
        )
        for target in sorted({r["target"] for r in op}):
            rows = sorted((r for r in op if r["target"] == target), key=lambda r: r["seq_len"])
            ax.plot(
                [r["seq_len"] for r in rows],
                [r["total_ms"] for r in rows],
                "-^",
                label=f"flexsample, planted ~{int(100 * target)}% density",
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_ylabel("milliseconds (median)")
        written.append(
            _finish(fig, ax, "sequence length", "Causal attention latency vs length",
                    out / f"{name}_latency.png")
        )  # fmt: skip

        fig, ax = plt.subplots(figsize=(6, 4))
        for s in lengths:
            rows = sorted((r for r in op if r["seq_len"] == s), key=lambda r: r["density"])
            ax.plot(
                [r["density"] for r in rows], [r["speedup"] for r in rows], "-o", label=f"S={s}"
            )
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_ylabel("speedup over dense SDPA (end to end)")
        written.append(
            _finish(fig, ax, "density (fraction of causal tiles computed)", "Speedup vs density",
                    out / f"{name}_speedup.png")
        )  # fmt: skip
    if alphas:
        fig, ax = plt.subplots(figsize=(6, 4))
        a = [r["alpha"] for r in alphas]
        ax.plot(a, [r["density"] for r in alphas], "-o", label="density")
        ax.plot(a, [r["kept_mass_mean"] for r in alphas], "-s", label="attention mass kept")
        ax.plot(a, [r["passkey_accuracy"] for r in alphas], "-^", label="passkey accuracy")
        ax.plot(a, [r["output_rel_error"] for r in alphas], "-x", label="output rel. error")
        written.append(
            _finish(fig, ax, "alpha (CRA threshold)", "alpha frontier on SmolLM2",
                    out / f"{name}_alpha.png")
        )  # fmt: skip
    return written


def frontier_plot(frontier: list[dict], path: Path) -> Path:
    """Output error against density for every input, selections as points, oracles as lines."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    inputs = list(dict.fromkeys(r["inputs"] for r in frontier))
    # One colour and marker per selection across panels: circles for this release, crosses
    # for earlier ones (methods labelled "<release>: ...").
    methods = list(dict.fromkeys(r["method"] for r in frontier if "oracle" not in r["method"]))
    palette = plt.get_cmap("tab20").colors
    colours = {m: palette[i % len(palette)] for i, m in enumerate(methods)}
    styles = {m: "x" if _RELEASE_SUFFIX.search("_" + m.split(":")[0]) else "o" for m in methods}
    cols = min(3, len(inputs))
    rows_n = -(-len(inputs) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.6 * cols, 3.6 * rows_n), squeeze=False)
    for ax in axes.flat[len(inputs) :]:
        ax.axis("off")
    for ax, name in zip(axes.flat, inputs, strict=False):
        rows = [r for r in frontier if r["inputs"] == name]
        for method, style in (
            ("oracle tokens", "k-o"), ("oracle tiles", "k--s"), ("oracle query tiles", "k:^")
        ):  # fmt: skip
            line = sorted((r for r in rows if r["method"] == method), key=lambda r: r["alpha"])
            if line:
                xs, ys = [r["density"] for r in line], [r["output_error"] for r in line]
                ax.plot(xs, ys, style, ms=3, lw=1, label=method)
        for r in rows:
            if not r["method"].startswith("oracle"):
                ax.plot(
                    r["density"], r["output_error"], styles[r["method"]], ms=5,
                    color=colours[r["method"]], label=r["method"],
                )  # fmt: skip
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("density (pairs computed / causal pairs)")
        ax.set_ylabel("output rel. error")
        ax.set_title(name, fontsize=9)
        ax.grid(True, which="both", lw=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    return path


def _finish(fig, ax, xlabel: str, title: str, path: Path) -> Path:
    """Label, add the legend, lay out and save as PNG; returns ``path``."""
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "json",
        type=Path,
        nargs="+",
        help="pytest-benchmark JSON files (--benchmark-json); their benchmarks are joined",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("bench/results"),
        help="folder for the Markdown and PNG files (default %(default)s)",
    )
    parser.add_argument("--name", default=None, help="file stem (default: the JSON's stem)")
    args = parser.parse_args(argv)
    name = args.name or args.json[0].stem
    runs, benches = load(args.json)
    op = operator_rows(benches, "planted")
    real = operator_rows(benches, "smollm2")
    prefill, alphas = prefill_rows(benches), alpha_rows(benches)
    frontier = frontier_rows(benches)
    args.out.mkdir(parents=True, exist_ok=True)
    report = markdown(runs, op, real, prefill, alphas, name, frontier)
    (args.out / f"{name}.md").write_text(report)
    written = plots(op, alphas, args.out, name)
    if frontier:
        written.append(frontier_plot(frontier, args.out / f"{name}_frontier.png"))
    print(f"wrote {args.out / (name + '.md')} and {len(written)} plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
