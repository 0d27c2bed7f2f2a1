"""The key of the shared environment `make setup` links `.venv` to: a hash of what it
installs (pyproject.toml's dependencies and extras, and the torch pin of the Makefile), so
that a version bump or a new ruff rule reuses it and a new dependency makes another."""

import hashlib
import json
from pathlib import Path

root = Path(__file__).resolve().parents[1]
text = (root / "pyproject.toml").read_bytes()
try:
    import tomllib

    project = tomllib.loads(text.decode())["project"]
    text = json.dumps([project.get("dependencies"), project.get("optional-dependencies")]).encode()
except ModuleNotFoundError:  # Python 3.10: the whole file
    pass
pins = [line for line in (root / "Makefile").read_text().splitlines() if "torch==" in line]
print(hashlib.sha1(text + "\n".join(pins).encode()).hexdigest()[:12])
