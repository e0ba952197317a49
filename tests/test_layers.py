"""The package's layers: each subpackage imports only from its own layer or the layers below it.

Read every module's imports (module level and inside functions) with `ast`; an import of a lorafit
module from a higher layer, or an import cycle between modules, fails with the module and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "lorafit"
LAYERS = ("base", "inputs", "adapters", "measurement", "run", "training", "reports", "studies", "serving", "ui", "cli")
TOP = ("__init__", "__main__")  # the package's front door may import from any layer


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def lorafit_imports(path: Path) -> list[tuple[str, int]]:
    """(imported lorafit module, line) for every import in the file, including imports inside functions."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("lorafit"):
            for alias in node.names:  # `from lorafit.x import y` may import the module lorafit.x.y
                found.append((f"{node.module}.{alias.name}", node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.startswith("lorafit")]
    return found


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 2 or parts[1] in TOP:
        return None
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else -1


def existing_module(name: str, modules: set[str]) -> str | None:
    """The module `name` refers to: itself, or its parent when `name` is `module.attribute`."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(root: Path = PACKAGE) -> dict[str, list[tuple[str, int]]]:
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    return {
        name: [(target, line) for raw, line in lorafit_imports(path) if (target := existing_module(raw, set(files)))]
        for name, path in files.items()
    }


def upward_imports(graph: dict[str, list[tuple[str, int]]]) -> list[str]:
    bad = []
    for module, imports in graph.items():
        mine = layer_of(module)
        if mine is None:
            continue
        for target, line in imports:
            theirs = layer_of(target)
            if mine == -1 or theirs == -1:
                bad.append(f"{module}:{line}: {target} is in no layer; add its subpackage to LAYERS")
            elif theirs is not None and theirs > mine:
                bad.append(f"{module}:{line} ({LAYERS[mine]}) imports {target} ({LAYERS[theirs]}, a higher layer)")
    return bad


def cycles(graph: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    """Import cycles between modules (a package's __init__ importing its own modules is not one)."""
    edges = {m: {t for t, _ in imports if t != m and not m.startswith(t + ".")} for m, imports in graph.items()}
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return found


def test_every_import_goes_down_the_layers():
    assert upward_imports(import_graph()) == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


@pytest.mark.parametrize(
    ("module", "source", "expect"),
    [
        ("base/config.py", "from lorafit.training.loop import train\n", "imports lorafit.training.loop (training"),
        ("run/store.py", "def f():\n    from lorafit.reports import page\n", "imports lorafit.reports.page (reports"),
        ("misc.py", "from lorafit.base import errors\n", "is in no layer"),
    ],
)
def test_a_planted_upward_import_fails(tmp_path, module, source, expect):
    """The check itself can fail: a copy of the package with one upward import planted in it."""
    import shutil

    root = tmp_path / "lorafit"
    shutil.copytree(PACKAGE, root, ignore=shutil.ignore_patterns("__pycache__", "*.json", "tokenizer", "datasets"))
    target = root / module
    target.write_text((target.read_text() if target.exists() else "") + source)
    (root / "reports" / "page.py").touch()
    assert any(expect in line for line in upward_imports(import_graph(root)))


def test_a_planted_cycle_fails(tmp_path):
    root = tmp_path / "lorafit"
    (root / "base").mkdir(parents=True)
    (root / "base" / "a.py").write_text("from lorafit.base import b\n")
    (root / "base" / "b.py").write_text("def f():\n    from lorafit.base.a import x\n")
    assert cycles(import_graph(root)) == [["lorafit.base.a", "lorafit.base.b", "lorafit.base.a"]]
