"""Which code produced a result: the commit and the versions a report records."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path

import torch

#: The folder above the package: the repository root in a source checkout.
_ROOT = Path(__file__).resolve().parents[1]


def code_commit() -> str:
    """The commit of the code that runs: ``$FLEXSAMPLE_COMMIT`` if set (a copy of the tree
    without its git history, such as a GPU machine's), else git's short hash of the checkout
    that holds this package, with ``-dirty`` where the package differs from it, else
    ``"unknown"`` (an installed wheel).

    git is asked only when the package's parent folder is a checkout of its own: a copy of
    the tree inside another repository would otherwise report that repository's commit.
    """
    if os.environ.get("FLEXSAMPLE_COMMIT"):
        return os.environ["FLEXSAMPLE_COMMIT"]

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["git", "-C", str(_ROOT), *args], capture_output=True, text=True, check=False
        )

    try:
        top = git("rev-parse", "--show-toplevel")
        if top.returncode or Path(top.stdout.strip()).resolve() != _ROOT:
            return "unknown"
        commit = git("rev-parse", "--short", "HEAD").stdout.strip() or "unknown"
        dirty = git("diff", "--quiet", "HEAD", "--", "flexsample").returncode == 1
    except OSError:  # no git
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def provenance() -> dict[str, str]:
    """The commit, the versions of flexsample, torch and Python, and the UTC start time:
    read at the start of a run, so a commit made while it runs is not named for it."""
    from . import __version__

    return {
        "commit": code_commit(),
        "flexsample": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
