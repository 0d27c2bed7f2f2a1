"""Heads split across ranks: two gloo processes on CPU, each with its own heads, gather to the
one-process output (bench/multi_gpu.py, the script the GPU run uses with NCCL)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "multi_gpu.py"


@pytest.mark.slow
def test_heads_split_over_two_gloo_ranks_equal_one_process(tmp_path):
    args = ["heads", "--world-size", "2", "--cpu", "--seq-len", "1500", "--q-heads", "4",
            "--kv-heads", "2", "--head-dim", "32", "--repeats", "1",
            "--out", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = json.loads((tmp_path / "multi_heads_cpu.json").read_text())
    assert record["world_size"] == 2 and record["backend"] == "gloo"
    # Every choice is per head (GQA groups stay whole on a rank): the same computation.
    assert record["gathered_vs_one_process_rel_rmse"] < 1e-6, record
    assert all(d < 1.0 for d in record["rank_density"]), record  # planned sparse on each rank
    assert len(record["rank_seconds_defaults"]) == 2


def test_heads_refuses_a_world_size_that_splits_a_group(tmp_path):
    args = ["heads", "--world-size", "3", "--cpu", "--out", str(tmp_path)]
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)
    assert proc.returncode != 0 and "must divide both --q-heads 32 and --kv-heads 8" in proc.stderr
