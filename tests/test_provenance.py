"""Reports name the code that produced them."""

import re
import subprocess
from pathlib import Path

import pytest

from flexsample.provenance import code_commit, provenance


def test_commit_comes_from_the_environment_first(monkeypatch):
    monkeypatch.setenv("FLEXSAMPLE_COMMIT", "abc1234")
    assert code_commit() == "abc1234"
    assert provenance()["commit"] == "abc1234"


def test_commit_of_this_checkout(monkeypatch):
    monkeypatch.delenv("FLEXSAMPLE_COMMIT", raising=False)
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout (a copy without its history)")
    # A source checkout (CI clones one): its short hash, marked where the package was edited.
    assert re.fullmatch(rf"{head}(-dirty)?", code_commit())


def test_provenance_names_versions_and_start():
    info = provenance()
    assert set(info) == {"commit", "flexsample", "torch", "python", "started"}
    assert info["started"].endswith("+00:00")
