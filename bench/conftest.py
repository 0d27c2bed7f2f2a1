"""Shared setup of the benchmark suites (pytest-benchmark).

    make bench                                   # full CPU run: two JSON files, then report.py
    pytest bench --smoke --benchmark-json=x.json # tiny sizes: does it still run?

On CUDA each timed call is bracketed by device events and the median device time is stored
in ``extra_info["device_ms"]``; on CPU the time is wall time (pytest-benchmark's, or for the
operator cases that of :func:`interleaved_ms`). Warm-up rounds keep compilation out of every
number.
"""

from __future__ import annotations

import statistics

import pytest
import torch

from flexsample.timing import interleaved_medians

_START_COMMIT = pytest.StashKey[dict]()


def pytest_configure(config: pytest.Config) -> None:
    # pytest-benchmark reads the commit when it saves, at the end of a run that can take an
    # hour; a commit made meanwhile would be named for code the run never imported. Read it
    # now, before any benchmark runs.
    from pytest_benchmark.utils import get_commit_info

    config.stash[_START_COMMIT] = get_commit_info()


def pytest_benchmark_update_commit_info(config: pytest.Config, commit_info: dict) -> None:
    start = config.stash.get(_START_COMMIT, None)
    if start and start.get("id") != commit_info.get("id"):
        commit_info.clear()
        commit_info.update(start, note="commit at the start of the run (it moved during it)")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("flexsample")
    group.addoption("--smoke", action="store_true", help="tiny sizes, one round: check only")
    group.addoption("--device", default=None, help="cpu or cuda (default: cuda if available)")


@pytest.fixture(scope="session")
def smoke(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--smoke"))


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> torch.device:
    name = request.config.getoption("--device")
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


@pytest.fixture(scope="session")
def rounds(smoke: bool, device: torch.device) -> int:
    return 1 if smoke else (10 if device.type == "cuda" else 5)


class Timed:
    """Wrap ``fn`` so each call records its device time (CUDA events) or nothing on CPU."""

    def __init__(self, fn, device: torch.device) -> None:
        self.fn, self.device, self.device_ms = fn, device, []

    def __call__(self):
        if self.device.type != "cuda":
            return self.fn()
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        start.record()
        out = self.fn()
        end.record()
        end.synchronize()
        self.device_ms.append(start.elapsed_time(end))
        return out


def run(benchmark, fn, device: torch.device, rounds: int, **info):
    """Benchmark ``fn`` after one warm-up round; store ``info`` and CUDA times with it."""
    timed = Timed(fn, device)
    result = benchmark.pedantic(timed, rounds=rounds, warmup_rounds=1, iterations=1)
    if timed.device_ms:
        measured = timed.device_ms[1:] or timed.device_ms  # first call is the warm-up
        info["device_ms"] = statistics.median(measured)
    benchmark.extra_info.update(info)
    return result


def interleaved_ms(fns: dict, device: torch.device, rounds: int) -> dict[str, float]:
    """Median milliseconds of each function, timed in interleaved rounds after one warm-up
    call each (:func:`flexsample.timing.interleaved_medians`; device time on CUDA), so that
    ratios between them compare measurements taken under the same machine conditions.

    Returns:
        ``{f"{name}_ms": median}`` for each entry of ``fns``.
    """
    medians = interleaved_medians(list(fns.values()), device, rounds, clock="device")
    return {f"{name}_ms": seconds * 1e3 for name, seconds in zip(fns, medians, strict=True)}
