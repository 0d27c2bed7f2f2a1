"""CUDA-graph replay of planning steps (flexsample.graphs): where it does not apply, the eager
step runs, unchanged. (Replay itself is checked on a GPU: tests/cuda/test_kernels.py.)"""

import os

import torch

from flexsample import graphs


def test_cpu_steps_run_eagerly_and_capture_nothing():
    graphs.clear()
    calls = []

    def step(x):
        calls.append(1)
        return (x * 2, x.sum())

    x = torch.arange(6.0)
    for _ in range(3):
        doubled, total = graphs.graphed(("test",), step, (x,))
        assert torch.equal(doubled, x * 2) and float(total) == 15.0
    assert len(calls) == 3 and graphs.cached_graphs() == 0


def test_environment_variable_turns_graphs_off(monkeypatch):
    monkeypatch.setenv(graphs.ENV_VAR, "0")
    assert not graphs.enabled(torch.device("cuda"))
    assert not graphs.enabled(torch.device("cpu"))


def test_use_graphs_sets_the_variable_for_its_block_and_restores_it(monkeypatch):
    monkeypatch.delenv(graphs.ENV_VAR, raising=False)
    with graphs.use_graphs(False):
        assert os.environ[graphs.ENV_VAR] == "0"
    assert graphs.ENV_VAR not in os.environ
    monkeypatch.setenv(graphs.ENV_VAR, "0")
    with graphs.use_graphs(True):
        assert os.environ[graphs.ENV_VAR] == "1"
    assert os.environ[graphs.ENV_VAR] == "0"
