"""Reports name the code that produced them."""

import re

from flexsample.provenance import code_commit, provenance


def test_commit_comes_from_the_environment_first(monkeypatch):
    monkeypatch.setenv("FLEXSAMPLE_COMMIT", "abc1234")
    assert code_commit() == "abc1234"
    assert provenance()["commit"] == "abc1234"


def test_commit_of_this_checkout(monkeypatch):
    monkeypatch.delenv("FLEXSAMPLE_COMMIT", raising=False)
    # A source checkout (CI clones one): a short hash, marked where the package was edited.
    assert re.fullmatch(r"[0-9a-f]{7,}(-dirty)?|unknown", code_commit())


def test_provenance_names_versions_and_start():
    info = provenance()
    assert set(info) == {"commit", "flexsample", "torch", "python", "started"}
    assert info["started"].endswith("+00:00")
