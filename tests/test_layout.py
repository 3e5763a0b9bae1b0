"""The package's shape, read from its imports with ``ast``: three layers whose imports point down.

* application: ``cli``, ``server``, ``harness``, ``workflow``, ``requests``;
* families: ``families.<name>`` (one package each) behind ``families/__init__`` (the registry) and
  ``family`` (the interface);
* shared mechanisms: everything else (``files``, ``images``, ``noise``, ``schedulers``, ``memory``,
  ``rope``, ``weights``, ``quant``).
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "hidream_mlx"
APPLICATION = ("cli", "server", "harness", "workflow", "requests")
INTERFACE = ("families", "family")  # the registry and the interface: what the application may import
MAX_TOP_LEVEL_MODULES = 10
MAX_LINES = 450


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(path: Path, known: dict[str, Path]) -> set[str]:
    """The package modules ``path`` imports, anywhere in the file (function-local imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("hidream_mlx"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("hidream_mlx"))
    found.discard(module_name(path))
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(path, known) for name, path in known.items()}


def layer(name: str) -> str:
    parts = name.split(".")[1:]  # drop "hidream_mlx"
    if not parts:
        return "root"
    if parts[0] in APPLICATION:
        return "application"
    if parts[0] == "families" and len(parts) > 1:
        return "family:" + parts[1]
    if parts[0] in INTERFACE:
        return "interface"
    return "shared"


def find_cycle(edges: dict[str, set[str]]):
    """One import cycle as a list of modules, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if state.get(nxt) is None:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if state.get(node) is None:
            found = visit(node)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_module_imports_itself_back_through_a_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, " -> ".join(cycle)


def test_a_family_never_imports_the_application_layer_or_another_family():
    wrong = [(name, dep) for name, deps in graph().items() if layer(name).startswith("family:")
             for dep in deps if layer(dep) == "application"
             or (layer(dep).startswith("family:") and layer(dep) != layer(name))
             or dep == "hidream_mlx.families"]
    assert wrong == []


def test_the_application_reaches_a_family_only_through_the_registry_and_the_interface():
    wrong = [(name, dep) for name, deps in graph().items() if layer(name) == "application"
             for dep in deps if layer(dep).startswith("family:")]
    assert wrong == []


def test_shared_mechanisms_import_neither_the_families_nor_the_application():
    wrong = [(name, dep) for name, deps in graph().items() if layer(name) == "shared"
             for dep in deps if layer(dep) not in ("shared", "root")]
    assert wrong == []


def test_the_interface_imports_no_family_and_the_registry_only_each_family_s_entry():
    edges = graph()
    assert not [d for d in edges["hidream_mlx.family"] if layer(d) != "shared" and d != "hidream_mlx"]
    registry = {d for d in edges["hidream_mlx.families"] if layer(d).startswith("family:")}
    assert registry and all(d.endswith(".family") for d in registry)


def test_nothing_but_the_cli_imports_the_cli():
    wrong = [(name, dep) for name, deps in graph().items() if not name.startswith("hidream_mlx.cli")
             for dep in deps if dep.startswith("hidream_mlx.cli")]
    assert wrong == []


def test_every_family_package_holds_its_transformer_and_its_engine_directly():
    for family in (p for p in (PACKAGE / "families").iterdir() if p.is_dir() and (p / "__init__.py").exists()):
        names = {p.name for p in family.iterdir()}
        assert "transformer.py" in names and "family.py" in names, family.name
        assert names & {"engine.py", "pipeline.py", "sampling.py"}, family.name


def test_the_top_level_stays_small():
    top = [p.name for p in PACKAGE.glob("*.py")]
    assert len(top) <= MAX_TOP_LEVEL_MODULES, sorted(top)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: module_name(p))
def test_no_module_is_longer_than_the_limit(path):
    assert len(path.read_text(encoding="utf-8").splitlines()) <= MAX_LINES
