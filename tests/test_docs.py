"""The Python examples of the docs run as written (so the docs cannot drift from the API)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _examples(page: str) -> list[str]:
    return BLOCK.findall((DOCS / page).read_text())


def test_getting_started_has_the_examples_this_test_runs():
    assert len(_examples("getting-started.md")) == 2


@pytest.mark.slow
@pytest.mark.parametrize(
    ("index", "expected"),
    [(0, "torch.Size([1, 8, 16384, 64]) sparse"), (1, "layer")],
    ids=["ten-lines", "hugging-face"],
)
def test_getting_started_example_runs(index, expected, capsys):
    code = _examples("getting-started.md")[index]
    exec(compile(code, f"docs/getting-started.md, example {index + 1}", "exec"), {})
    printed = capsys.readouterr().out
    assert expected in printed, printed
