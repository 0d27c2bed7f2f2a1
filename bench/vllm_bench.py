"""Prefill of a long prompt through vLLM, with vLLM's own backend and with flexsample's.

Runs ``bench/vllm_run.py`` once per backend (one engine per process, prefix caching off),
each for ``--rounds`` rounds of a fresh passkey prompt with ``--new-tokens`` greedy tokens
(enough for the 5-digit key): the first round compiles and is dropped, the median of the
others is reported (the prefill dominates; decode steps run the wrapped backend in both).
Writes ``vllm_<device>.json`` and ``vllm_<device>.md`` into ``--out``. Run in vLLM's environment:

    make bench-vllm        # = python bench/vllm_bench.py --out bench/results
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

RUN = Path(__file__).with_name("vllm_run.py")


def run(backend: str | None, tokens: int, new: int, rounds: int, workdir: Path) -> dict:
    out = workdir / f"{backend or 'default'}.json"
    cmd = [sys.executable, str(RUN), "--passkey", str(tokens), "--max-tokens", str(new)]
    cmd += ["--rounds", str(rounds), "--out", str(out)]
    if backend:
        cmd += ["--backend", backend]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=7500, help="prompt tokens (SmolLM2: < 8K)")
    parser.add_argument("--new-tokens", type=int, default=8, help="greedy tokens per prompt")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per backend (first dropped)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the results")
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds must be at least 2: the first round compiles and is dropped")
    os.environ.setdefault("OMP_NUM_THREADS", "2")

    import torch
    import vllm

    from flexsample.costs import device_name

    device = device_name(torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        results = {
            b or "default": run(b, args.tokens, args.new_tokens, args.rounds, Path(tmp))
            for b in (None, "CUSTOM")
        }
    rows = []
    for name, result in results.items():
        timed = [r["seconds"] for r in result["rounds"][1:]]
        rows.append(
            {
                "backend": name,
                "prompt_tokens": result["rounds"][0]["prompt_tokens"][-1],
                "median_s": statistics.median(timed),
                "rounds_s": [r["seconds"] for r in result["rounds"]],
                "answers_right": sum(r["found"] == r["expected"] for r in result["rounds"]),
                "stats": result["stats"],
            }
        )
    base = rows[0]["median_s"]
    for row in rows:
        row["speedup"] = base / row["median_s"]
    record = {
        "device": device,
        "torch": torch.__version__,
        "vllm": vllm.__version__,
        "python": platform.python_version(),
        "omp_num_threads": os.environ["OMP_NUM_THREADS"],
        "command": f"python bench/vllm_bench.py --tokens {args.tokens} "
        f"--new-tokens {args.new_tokens} --rounds {args.rounds}",
        "rows": rows,
    }
    slug = device.replace(" ", "_")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"vllm_{slug}.json").write_text(json.dumps(record, indent=1))
    lines = [
        f"# vLLM prefill, {device}",
        "",
        f"`{record['command']}` (vLLM {record['vllm']}, torch {record['torch']}, "
        f"OMP_NUM_THREADS={record['omp_num_threads']}). SmolLM2-135M, one passkey prompt per "
        f"round, {args.new_tokens} greedy tokens, prefix caching off; median of the rounds "
        "after the first (which compiles). vLLM's CPU default of 4096 batched tokens per step "
        "prefills the prompt in two chunks.",
        "",
        f"| backend | prompt tokens | prefill + {args.new_tokens} tokens (median) | "
        "vs vLLM's own | answers right | sparse layer calls | mean density |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        s = row["stats"]
        sparse = s["layer_calls"] - s["dense_layer_calls"]
        density = f"{s['mean_density']:.3f}" if sparse else "-"
        lines.append(
            f"| {row['backend']} | {row['prompt_tokens']} | {row['median_s']:.1f} s | "
            f"{row['speedup']:.2f}x | {row['answers_right']}/{args.rounds} | "
            f"{sparse}/{s['layer_calls']} | {density} |"
        )
    (args.out / f"vllm_{slug}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
