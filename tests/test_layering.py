"""The arrows between modules: the core never imports the integrations, nothing imports a
private name of another module."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "flexsample"
INTEGRATIONS = PACKAGE / "integrations"


def _modules(*folders: Path) -> list[Path]:
    return sorted(p for folder in folders for p in folder.rglob("*.py"))


def _imports(path: Path):
    """``(module, names)`` of every import in the file, relative imports made absolute."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    if path.name == "__init__.py":
        package = ".".join(path.relative_to(ROOT).parts[:-1])
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, module]) if module else ".".join(base)
            yield module, [alias.name for alias in node.names]


def test_the_core_never_imports_the_integrations():
    core = [p for p in _modules(PACKAGE) if INTEGRATIONS not in p.parents]
    assert len(core) > 10
    offenders = [
        f"{p.relative_to(ROOT)}: {module}"
        for p in core
        for module, names in _imports(p)
        if module.startswith("flexsample.integrations")
        or (module == "flexsample" and "integrations" in names)
    ]
    assert not offenders, offenders


@pytest.mark.parametrize("folder", ["flexsample", "bench", "tests"])
def test_no_private_names_are_imported_across_modules(folder):
    offenders = [
        f"{p.relative_to(ROOT)}: from {module} import {name}"
        for p in _modules(ROOT / folder)
        for module, names in _imports(p)
        if module.startswith("flexsample")
        for name in names
        if name.startswith("_") and not name.startswith("__")
    ]
    offenders += [
        f"{p.relative_to(ROOT)}: import {module}"
        for p in _modules(ROOT / folder)
        for module, _ in _imports(p)
        if module.startswith("flexsample")
        and any(part.startswith("_") for part in module.split(".")[1:])
    ]
    assert not offenders, offenders


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """Every module of the package and the package modules it imports (at the top, in a
    function or for type checking alike), a package's own ``__init__`` left out of its
    submodules' arrows."""
    modules = {_module_name(p): p for p in _modules(PACKAGE)}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for module, names in _imports(path):
            for target in [f"{module}.{n}" for n in names] + [module]:
                if target in modules:
                    targets.add(target)
                    break
        graph[name] = {t for t in targets if t != name and not name.startswith(f"{t}.")}
    return graph


def test_no_module_imports_itself_through_others():
    """No circles: the pipeline's modules stand on each other in one direction."""
    graph = _import_graph()
    assert "flexsample.plan" in graph and "flexsample.patterns.window_columns" in graph
    cycles, state = [], {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join([*trail[trail.index(nxt) :], node, nxt]))
            elif nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, cycles
