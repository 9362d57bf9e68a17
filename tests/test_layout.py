"""The layout of ``musiclib`` follows the data path: stage packages, no import circle, no import backwards.

The imports are read from the source with ``ast`` (nothing is imported), every one of them: at module
level, inside functions and under ``TYPE_CHECKING`` alike.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

LIBRARY = Path(__file__).resolve().parents[1] / "musiclib"
STAGES = ("core", "catalog", "audio", "train", "embed", "probe", "tag", "study")  # the data path, in order
MODULE_STAGES = ("catalog", "audio")  # stages that are one module at the top; every other is a package
BESIDE = "datasets"  # generated data beside the path: may import any stage, no stage may import it
ENTRY = "cli"  # the musiclib command, above every stage: may import any module, no module may import it


def module_name(path: Path, library: Path) -> str:
    parts = path.relative_to(library.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_files(library: Path) -> dict[str, Path]:
    """Every module of the library by dotted name (a package by its ``__init__.py``)."""
    return {module_name(p, library): p for p in sorted(library.rglob("*.py"))}


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The library modules ``path`` imports, anywhere in it; ``from package import module`` names the module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per dot after the first
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in found if m in known and m != name}


def import_graph(library: Path = LIBRARY) -> dict[str, set[str]]:
    files = module_files(library)
    return {name: imports(path, name, set(files)) for name, path in files.items()}


def stage(module: str) -> str | None:
    """The stage a module belongs to (``datasets`` for generated data), None for the top package."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` as the modules along it (first repeated last), or None."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return path[path.index(target) :] + [target]
            if target not in state and (found := visit(target)):
                return found
        state[module] = "done"
        path.pop()
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module)):
            return found
    return None


def backward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Imports of a later stage, or of ``datasets``, by a stage module, and of the command by any module:
    ``module -> target`` each."""
    wrong = []
    for module, targets in sorted(graph.items()):
        here = stage(module)
        wrong += [f"{module} -> {target}" for target in sorted(targets) if stage(target) == ENTRY]
        if here is None or here in (BESIDE, ENTRY):
            continue
        for target in sorted(targets):
            there = stage(target)
            if there == BESIDE or (there not in (None, ENTRY) and STAGES.index(there) > STAGES.index(here)):
                wrong.append(f"{module} -> {target}")
    return wrong


def layout_problems(library: Path = LIBRARY) -> list[str]:
    """What breaks the shape: a top-level entry other than the module stages and the packages, a stage
    package without ``__init__.py``, a package nested in a stage."""
    packages = [s for s in STAGES if s not in MODULE_STAGES] + [BESIDE]
    expected = {"__init__.py", f"{ENTRY}.py"} | {f"{s}.py" for s in MODULE_STAGES} | set(packages)
    found = {p.name for p in library.iterdir() if p.name != "__pycache__" and not p.name.startswith(".")}
    problems = [f"musiclib/{n} is not a stage" for n in sorted(found - expected)]
    problems += [
        f"musiclib/{p}/__init__.py is missing"
        for p in packages
        if not (library / p / "__init__.py").is_file()
    ]
    for package in packages:
        nested = [p for p in (library / package).iterdir() if p.is_dir() and p.name != "__pycache__"]
        problems += [f"musiclib/{package}/{p.name}/ nests a package in a stage" for p in nested]
    return problems


def test_the_import_graph_has_no_circle():
    found = circle(import_graph())
    assert found is None, "import circle: " + " -> ".join(found)


def test_no_stage_imports_a_later_one_or_the_generated_data():
    assert backward_imports(import_graph()) == []


def test_musiclib_holds_the_stages_and_nothing_else():
    assert layout_problems() == []


@pytest.fixture
def library(tmp_path) -> Path:
    """A small library of the right shape: ``core.storage`` <- ``tag.tags`` (a function-level import)."""
    root = tmp_path / "musiclib"
    for package in [s for s in STAGES if s not in MODULE_STAGES] + [BESIDE]:
        (root / package).mkdir(parents=True)
        (root / package / "__init__.py").write_text('"""A stage."""\n')
    (root / "__init__.py").write_text("")
    (root / "catalog.py").write_text("from musiclib.core import storage\n")
    (root / "audio.py").write_text("")
    (root / "cli.py").write_text("from musiclib.tag import tags\n")
    (root / "core" / "storage.py").write_text("import os\n")
    (root / "tag" / "tags.py").write_text("def f():\n    from musiclib.core import storage\n")
    return root


def test_the_checks_see_what_breaks_the_layout(library):
    assert circle(import_graph(library)) is None and not backward_imports(import_graph(library))
    assert layout_problems(library) == []

    (library / "core" / "storage.py").write_text("def g():\n    from musiclib.tag import tags\n")
    assert circle(import_graph(library)) == [
        "musiclib.core.storage",
        "musiclib.tag.tags",
        "musiclib.core.storage",
    ]
    assert backward_imports(import_graph(library)) == ["musiclib.core.storage -> musiclib.tag.tags"]

    (library / "core" / "storage.py").write_text("from ..datasets import demo\n")
    (library / "datasets" / "demo.py").write_text("from musiclib.tag.tags import f\n")
    assert backward_imports(import_graph(library)) == ["musiclib.core.storage -> musiclib.datasets.demo"]

    (library / "datasets" / "demo.py").write_text("from musiclib import cli\n")
    assert backward_imports(import_graph(library)) == [
        "musiclib.core.storage -> musiclib.datasets.demo",
        "musiclib.datasets.demo -> musiclib.cli",
    ]

    (library / "neighbors.py").write_text("")
    (library / "tag" / "index").mkdir()
    assert layout_problems(library) == [
        "musiclib/neighbors.py is not a stage",
        "musiclib/tag/index/ nests a package in a stage",
    ]
