"""The package layout: every module imports, no import cycle, dependencies point one way, and
no module grows past 450 lines.

Imports are read with `ast` at any depth, so a function-level import of a module that
imports you back counts as the cycle it is. `trainer/cli.py` is the one exception: its
dispatcher imports the chosen subcommand's module by name (`importlib`), which `ast` does
not see, so `tench shard` does not pay for torch or Ray.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("shards", "pipeline", "trainer")
# What each package may import: shards <- pipeline <- trainer.
ALLOWED = {"shards": {"shards"}, "pipeline": {"shards", "pipeline"},
           "trainer": {"shards", "pipeline", "trainer"}}
MAX_LINES = 450


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob(
        "*.py"))}


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The tench modules `path` imports anywhere in its body (functions included)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package this module is in
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[:len(package) - (node.level - 1)]
                base = ".".join([*package, *([base] if base else [])])
            # `from trainer import fit` imports the module trainer.fit; `from trainer.fit
            # import run_fit` imports trainer.fit
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import trainer.fit.x` -> trainer.fit
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    known = set(modules)
    return {name: imported_modules(name, path, known) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search with colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_cycle_finder_finds_a_function_level_cycle(tmp_path):
    """The checker itself: a function-level import back is a cycle, a one-way one is not."""
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from a import x\n")
    (tmp_path / "c.py").write_text("def g():\n    import b\n")
    known = {"a", "b", "c"}
    graph = {n: imported_modules(n, tmp_path / f"{n}.py", known) for n in known}
    assert graph == {"a": {"b"}, "b": {"a"}, "c": {"b"}}
    assert find_cycle(graph) == ["a", "b", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"b"}}) is None


def test_no_import_cycle_among_shards_pipeline_trainer():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_dependencies_point_one_way():
    wrong = [f"{name} imports {target}" for name, targets in import_graph().items()
             for target in sorted(targets)
             if target.split(".")[0] not in ALLOWED[name.split(".")[0]]]
    assert not wrong, "shards <- pipeline <- trainer broken: " + "; ".join(wrong)


@pytest.mark.parametrize("name", sorted(all_modules()))
def test_every_module_imports(name):
    importlib.import_module(name)


def test_no_module_over_450_lines():
    long = {name: n for name, path in all_modules().items()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these modules (over {MAX_LINES} lines): {long}"
