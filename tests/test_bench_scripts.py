"""The GPU benchmark scripts' CPU dry runs: they must not rot between GPU sessions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "bench")])}
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.slow
def test_plan_stages_dry_run(tmp_path):
    _run("plan_stages.py", "--dry-run", "--lengths", "2048", "--calls", "1",
         "--json", str(tmp_path / "stages.json"))  # fmt: skip
    rows = json.loads((tmp_path / "stages.json").read_text())["rows"]
    sparse = [r for r in rows if r["config"] == "always sparse" and r["S"] == 2048]
    # On the CPU "auto" runs the gathered products: no BlockMask, so no mask stage.
    assert {r["stage"] for r in sparse} >= {"sample", "select", "cover"}
    assert all(r["wall_ms"] > 0 for r in sparse)


@pytest.mark.slow
def test_speed_dry_run(tmp_path):
    """The speed runner on CPU: the methods asked at the length asked, each with its times,
    path, density and error against dense attention, and a report."""
    sys.path.insert(0, str(ROOT / "bench"))
    from speed import INPUTS

    methods = ["defaults", "defaults, always sparse", "0.3 selection (group union, min_window=128)"]
    _run("speed.py", "--dry-run", "--lengths", "1024", "--no-frontier", "--methods", *methods,
         "--out", str(tmp_path))  # fmt: skip
    rows = json.loads((tmp_path / "gpu_dry_run.json").read_text())["speed"]
    assert {(r["method"], r["inputs"]) for r in rows} == {(m, i) for m in methods for i in INPUTS}
    for r in rows:
        assert r["seq_len"] == 1024 and r["path"] in ("sparse", "dense")
        assert r["flexsample_total_ms"] > 0 and r["fastest_dense_ms"] > 0
        assert 0 < r["density"] <= 1 and 0 <= r["output_error"] < 0.5
    always = [r for r in rows if r["method"] == "defaults, always sparse"]
    assert all(r["path"] == "sparse" and r["density"] < 1 for r in always)
    assert (tmp_path / "gpu_dry_run.md").stat().st_size > 0


@pytest.mark.slow
def test_dense_path_dry_run(tmp_path):
    _run("dense_path.py", "--dry-run", "--lengths", "512", "--json", str(tmp_path / "d.json"))
    rows = json.loads((tmp_path / "d.json").read_text())["rows"]
    # Each clock in both orders, one row each, every call timed; random q/k/v run dense.
    assert sorted((r["clock"], r["order"]) for r in rows) == sorted(
        (c, o) for c in ("device", "wall") for o in ("forward", "reversed")
    )
    for r in rows:
        assert r["seq_len"] == 512 and r["path"] == "dense"
        assert r["sdpa"] > 0 and r["flex_sample_attention"] > 0


@pytest.mark.slow
@pytest.mark.full
def test_ttft_dry_run(tmp_path):
    pytest.importorskip("gguf")
    _run("ttft.py", "--dry-run", "--json", str(tmp_path / "t.json"))
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert sorted(r["mode"] for r in rows) == ["always sparse", "dense", "flexsample"]
    for r in rows:
        assert r["task"] == "niah_single_1100" and r["samples"] == 2 and r["ttft_s"] > 0
        assert 0 <= r["score"] <= 2 and len(r["answers"]) == 2
    assert next(r for r in rows if r["mode"] == "dense")["same_as_dense"] == 2  # itself


@pytest.mark.slow
def test_cpu_defaults_dry_run_measures_a_foreign_machine(tmp_path):
    """The CPU runner as a machine without its own costs: the first call measures them,
    then each input's times, path and error, and the sparse call per pair on both backends."""
    table = ROOT / "tests" / "data" / "costs_sparse_cheap_cpu.json"
    _run("cpu_defaults.py", "--dry-run", "--foreign", str(table), "--out", str(tmp_path))
    (report,) = tmp_path.glob("cpu_defaults_dry_run.json")
    results = json.loads(report.read_text())
    assert results["meta"]["first_use_s"] > 0
    assert "first-use calibration" in results["meta"]["cost_source"]
    rows = results["defaults"]
    assert {(r["seq_len"], r["input"]) for r in rows} == {
        (S, kind) for S in (1024, 2048) for kind in ("random", "planted", "stripes")
    }
    assert all(r["sdpa_ms"] > 0 and r["defaults_ms"] > 0 and r["rel_rmse"] < 0.2 for r in rows)
    assert all(r["control"] == r["sdpa_ms"] / r["sdpa_again_ms"] for r in rows)
    (pair, *_) = results["per_pair"]
    assert pair["triton_per_pair"] > 0 and pair["gather_per_pair"] > 0
    assert "| 2048 | planted |" in (tmp_path / "cpu_defaults_dry_run.md").read_text()
    (shape,) = results["kernel_shapes"]
    assert (shape["rows"], shape["keys"]) == (128, 512) and shape["per_pair"] > 0
