"""The package's import graph, read from the source: no import circle, and imports flow one way
through the floors of the house (README "Layout"). Every import counts, also one inside a function.

Floors, from the ground up (a module may import its own package and any lower floor):
    0  registry, fileio, metrics, network, argcheck, machine, warned, interrupts, version
    1  methods, locks
    2  config                                           (no torch below this line)
    3  core                                             (the method)
    4  models, data
    5  prediction, sample_modes, modelfile
    6  runs
    7  training, evaluation
    8  bench, api, sweep                                (api: the public Python API)
    9  cli
    10 ssvi_cli itself (the package's public face)
Imports under ``if TYPE_CHECKING:`` are for annotations only and do not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "ssvi_cli"
FLOORS = {
    "registry": 0, "fileio": 0, "metrics": 0, "network": 0, "argcheck": 0, "machine": 0, "warned": 0, "interrupts": 0, "version": 0,
    "methods": 1, "locks": 1,
    "config": 2,
    "core": 3,
    "models": 4, "data": 4,
    "prediction": 5, "sample_modes": 5, "modelfile": 5,
    "runs": 6,
    "training": 7, "evaluation": 7,
    "bench": 8, "api": 8, "sweep": 8,
    "cli": 9,
}
TOP = 10  # ssvi_cli/__init__.py and ssvi_cli/__main__.py
MAX_LINES = 320  # "about 300": a module a newcomer reads in one sitting
# Modules allowed past MAX_LINES, each with the reason (README says the same).
LONG_MODULES: dict[str, str] = {
    "ssvi_cli.config": "the whole run schema in one place: every knob's dataclass, its coercion from "
                       "YAML/overrides and its validation, one name per knob",
}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, known: set[str]) -> set[str]:
    """The ssvi_cli modules that ``path`` imports (a ``from pkg import sub`` names the submodule)."""
    found: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _is_type_checking(block.test)
                   for stmt in block.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "ssvi_cli"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "ssvi_cli":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
    return found & known


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def floor(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "__main__":
        return TOP
    return FLOORS[parts[1]]


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(path, set(mods)) - {name} for name, path in mods.items()}


def test_every_module_has_a_floor(graph):
    unplaced = [m for m in graph if len(m.split(".")) > 1 and m.split(".")[1] not in FLOORS
                and m.split(".")[1] != "__main__"]
    assert unplaced == [], "give these modules a floor in FLOORS (and in README's layout)"


def test_imports_flow_down_the_floors(graph):
    wrong = []
    for module, targets in graph.items():
        for target in targets:
            same_package = package_of(module) == package_of(target) and package_of(module) != ""
            if not same_package and floor(target) >= floor(module):
                wrong.append(f"{module} (floor {floor(module)}) imports {target} (floor {floor(target)})")
    assert wrong == []


def test_no_import_circle(graph):
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    circles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert circles == []


def test_the_check_would_catch_a_circle_and_an_upward_import(tmp_path):
    """The graph reader sees imports inside functions and resolves ``from pkg import submodule``."""
    pkg = tmp_path / "ssvi_cli"
    (pkg / "core").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "core" / "__init__.py").write_text("")
    (pkg / "core" / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                       "    from ssvi_cli import data\ndef f():\n    from ssvi_cli.cli import app\n")
    (pkg / "cli").mkdir()
    (pkg / "cli" / "__init__.py").write_text("")
    (pkg / "cli" / "app.py").write_text("from ssvi_cli.core import a\n")
    known = {"ssvi_cli.core.a", "ssvi_cli.cli.app", "ssvi_cli.core", "ssvi_cli.cli", "ssvi_cli"}
    assert imports(pkg / "core" / "a.py", known) == {"ssvi_cli.cli.app"}
    assert imports(pkg / "cli" / "app.py", known) == {"ssvi_cli.core.a"}
    assert floor("ssvi_cli.cli.app") > floor("ssvi_cli.core.a")


def test_modules_stay_small():
    long = {name: n for name, path in modules().items()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES and name not in LONG_MODULES}
    assert long == {}, f"split these by concept (or justify them in LONG_MODULES): {long}"


def test_the_ground_floor_does_not_import_torch():
    """``ssvi presets`` and config validation stay cheap: nothing below ``core`` needs torch."""
    for name in (m for m, f in FLOORS.items() if f < FLOORS["core"]):
        tree = ast.parse((PACKAGE / f"{name}.py").read_text(encoding="utf-8"))
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not any(n.split(".")[0] == "torch" for n in names), name
