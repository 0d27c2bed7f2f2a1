"""The GPU benchmark scripts' CPU dry runs: they must not rot between GPU sessions."""

from __future__ import annotations

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
    out = _run("plan_stages.py", "--dry-run", "--lengths", "2048", "--calls", "1",
               "--json", str(tmp_path / "stages.json"))  # fmt: skip
    for stage in ("sample", "select", "cover", "mask"):
        assert f"| {stage} |" in out
    assert (tmp_path / "stages.json").stat().st_size > 0


@pytest.mark.slow
def test_plan_wall_dry_run(tmp_path):
    out = _run("plan_wall.py", "--dry-run", "--lengths", "2048", "--calls", "1",
               "--json", str(tmp_path / "wall.json"))  # fmt: skip
    assert "| 2048 | single-token stripes |" in out and "| 2048 | diffuse" in out
    assert (tmp_path / "wall.json").stat().st_size > 0


@pytest.mark.slow
def test_probe_cost_dry_run():
    out = _run("probe_cost.py", "--dry-run", "--lengths", "2048", "--rounds", "1")
    assert "S=2048 random q/k: probe" in out


@pytest.mark.slow
def test_probe_host_dry_run(tmp_path):
    out = _run("probe_host.py", "--dry-run", "--json", str(tmp_path / "p.json"))
    assert "| 256 | probe, torch (sorted rows) |" in out
    assert (tmp_path / "p.json").stat().st_size > 0


@pytest.mark.slow
def test_select_tiers_planted():
    out = _run("select_tiers.py", "--lengths", "2048", "--rounds", "1", "--no-smollm2")
    assert out.count("same selection: True") == 2


@pytest.mark.slow
def test_gpu_run_kernel_checks_dry_run(tmp_path):
    out = _run("gpu_run.py", "--dry-run", "--kernel-checks", "--out", str(tmp_path))
    assert "row kept mass" in out and "BAD" not in out
    assert (tmp_path / "gpu_dry_run.md").exists()


@pytest.mark.slow
def test_dense_path_dry_run(tmp_path):
    out = _run("dense_path.py", "--dry-run", "--lengths", "512", "--json", str(tmp_path / "d.json"))
    assert "S=512 random: dense" in out  # the path and its reason
    assert out.count("S=512 device ") == 2 and out.count("S=512 wall ") == 2  # two orders each
    assert "flex_sample_attention" in out


@pytest.mark.slow
def test_ttft_dry_run(tmp_path):
    pytest.importorskip("gguf")
    out = _run("ttft.py", "--dry-run", "--json", str(tmp_path / "t.json"))
    for mode in ("dense", "flexsample", "always sparse"):
        assert f"| niah_single_1100 | 1096 | {mode} | " in out
    assert "/2 |" in out  # scores over the two prompts


@pytest.mark.slow
def test_model_layer_scripts_run(tmp_path):
    pytest.importorskip("gguf")
    out = _run("sampled_rows.py", "--tokens", "1024", "--layers", "1", "--ratios", "0.05", "0.1")
    assert out.count("| 1 | 0.") == 2  # one row per ratio
    out = _run("sparse_layers.py", "--length", "1024", "--samples", "2", "--layers", "0", "1-2")
    assert "| none (dense) |" in out and "| 0 |" in out and "| 1-2 |" in out
    out = _run("probe_selection.py", "--lengths", "1024")
    assert "selection / probe median" in out and "the verdict counts 1.7x" in out
    out = _run("score_configs.py", "--tokens", "1024", "--layers", "1", "--config", "{}",
               "--config", '{"group_union": false}', "--json", str(tmp_path / "s.json"),
               )  # fmt: skip
    assert "| defaults | 1 |" in out and "| group_union=False | mean |" in out
    out = _run("segment_columns.py", "--tokens", "1024", "--layers", "1")
    for scope in ("every later query (the defaults)", "from its segment on", "own segment only"):
        assert f"| 1 | {scope} | " in out
