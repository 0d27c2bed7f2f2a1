"""flexsample's lm-eval task files: their folder and names, read without importing lm-eval
(which takes seconds), so that the command line can check task names before anything loads.
"""

from __future__ import annotations

import difflib
from pathlib import Path

#: The folder of flexsample's task YAMLs (and their helper module), passed to lm-eval as
#: ``--include_path``.
TASKS_DIR = Path(__file__).parent / "lm_eval" / "tasks"


def task_names() -> list[str]:
    """The task names flexsample ships (from the task folder)."""
    return sorted(p.stem for p in TASKS_DIR.glob("flexsample_*.yaml"))


def unknown_task(name: str) -> str | None:
    """Why ``name`` is not one of flexsample's tasks, with the closest ones, or None. Names
    outside flexsample's namespace (``flexsample_*``) are lm-eval's to judge: None."""
    known = task_names()
    if not name.startswith("flexsample_") or name in known:
        return None
    close = difflib.get_close_matches(name, known, n=2, cutoff=0.7)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    return f"no task {name!r}: {hint}flexsample's tasks are {', '.join(known)}"
