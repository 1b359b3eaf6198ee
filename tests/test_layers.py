"""The package's layers, read from the source: imports point down, and no task imports another task.

kernels ← adapters ← tasks ← pipelines ← apps / cli; ``visadapt.utils`` (and ``visadapt.version``) may be used by
every layer and uses none; its ``worlds`` (the embedded worlds and their shipped models) sit on top of the other
helpers: they use utils, and no other helper uses them; ``visadapt.training`` and ``visadapt.run_config`` are the
tasks' shared core. Every import counts, those
inside functions too.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Folders installed into the visadapt namespace (pyproject's package-dir).
FOLDERS = {"visadapt": "visadapt", "kernels/visadapt_kernels": "visadapt.kernels", "pipelines": "visadapt.pipelines",
           "apps": "visadapt.apps"}
TASKS = ("fewshot", "hyperspectral", "diffusion", "incremental", "tracking")
UTILS, WORLDS, KERNELS, ADAPTERS, TASK, PIPELINES, FACES = -2, -1, 0, 1, 2, 3, 4
LAYER_NAMES = {UTILS: "utils", WORLDS: "worlds", KERNELS: "kernels", ADAPTERS: "adapters", TASK: "tasks",
               PIPELINES: "pipelines", FACES: "apps/cli"}


def module_of(path: Path) -> str:
    folder = next(f for f in FOLDERS if path.is_relative_to(ROOT / f))
    parts = [FOLDERS[folder], *path.relative_to(ROOT / folder).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer(module: str) -> tuple[int, Optional[str]]:
    """(layer, task name) of a visadapt module."""
    parts = module.split(".")
    second = parts[1] if len(parts) > 1 else ""
    if parts[1:3] == ["utils", "worlds"]:
        return WORLDS, None
    if second in ("utils", "version"):
        return UTILS, None
    if second == "kernels":
        return KERNELS, None
    if second in ("", "adapters", "_registry"):  # the root package exports the adapters
        return ADAPTERS, None
    if second in ("training", "run_config"):  # the tasks' shared core
        return TASK, None
    if second in TASKS:
        return TASK, second
    if second == "pipelines":
        return PIPELINES, None
    if second in ("apps", "cli"):
        return FACES, None
    raise AssertionError(f"{module}: a module outside the known layers; add it to tests/test_layers.py")


def imports(path: Path, module: Optional[str] = None) -> Iterator[tuple[int, str]]:
    """(line, absolute module) of every visadapt import in the file (of module ``module``, or read from the path)."""
    module = module or module_of(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "visadapt":
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "visadapt":
                continue
            # ``from visadapt import kernels`` / ``from . import model`` import submodules by name.
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                yield node.lineno, sub if _is_module(sub) else target


def _is_module(module: str) -> bool:
    parts = module.split(".")
    for folder, prefix in sorted(FOLDERS.items(), key=lambda item: -len(item[1])):  # visadapt.kernels first
        head = prefix.split(".")
        if parts[:len(head)] == head:
            base = ROOT / folder / Path(*parts[len(head):]) if parts[len(head):] else ROOT / folder
            return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()
    return False


def sources() -> list[Path]:
    return sorted(p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py"))


def violation(importer: str, imported: str) -> Optional[str]:
    (low, task_a), (high, task_b) = layer(importer), layer(imported)
    if low == UTILS:
        return None if high == UTILS else "utils may import nothing else of visadapt"
    if high > low:
        return f"{LAYER_NAMES[low]} may not import {LAYER_NAMES[high]}"
    if low == high == TASK and task_b is not None and task_a != task_b:
        return f"task {task_a} may not import task {task_b}"
    return None


def test_imports_point_down_and_tasks_stay_apart():
    found = []
    for path in sources():
        importer = module_of(path)
        for line, imported in imports(path):
            problem = violation(importer, imported)
            if problem:
                found.append(f"{path.relative_to(ROOT)}:{line}: {importer} imports {imported} ({problem})")
    assert not found, "\n".join(found)


def import_cycle(graph: dict[str, set[str]]) -> Optional[list[str]]:
    """One cycle of the module graph (importer → imported), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> Optional[list[str]]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    return next((c for node in sorted(graph) if node not in state and (c := visit(node))), None)


def test_the_import_graph_has_no_cycle():
    """Every module-to-module import (function-level ones too; a package's ``__init__`` importing its own
    submodules is the package, not a cycle)."""
    graph: dict[str, set[str]] = {}
    for path in sources():
        importer = module_of(path)
        graph.setdefault(importer, set()).update(
            imported for _, imported in imports(path)
            if imported != importer and not importer.startswith(imported + "."))
    assert import_cycle(graph) is None, " → ".join(import_cycle(graph))
    assert import_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


@pytest.mark.parametrize("importer, imported, allowed", [
    ("visadapt.hyperspectral.train", "visadapt.fewshot.data", False),
    ("visadapt.adapters.layer", "visadapt.fewshot.model", False),
    ("visadapt.kernels.ops", "visadapt.adapters.layer", False),
    ("visadapt.fewshot.train", "visadapt.pipelines.fewshot_clip", False),
    ("visadapt.utils.io", "visadapt.training", False),
    ("visadapt.utils.io", "visadapt.utils.worlds.shapes", False),
    ("visadapt.utils.worlds.models", "visadapt.tracking.model", False),
    ("visadapt.utils.worlds.judge", "visadapt.adapters.layer", False),
    ("visadapt.utils.worlds.shapes", "visadapt.kernels", False),
    ("visadapt.utils.worlds.judge", "visadapt.utils.worlds.shapes", True),
    ("visadapt.utils.worlds.models", "visadapt.utils.io", True),
    ("visadapt.tracking.train", "visadapt.utils.worlds.models", True),
    ("visadapt.apps.composer", "visadapt.utils.worlds.models", True),
    ("visadapt.fewshot.train", "visadapt.training", True),
    ("visadapt.pipelines.lora_composer", "visadapt.diffusion.composer.attention", True),
    ("visadapt.apps.composer", "visadapt.pipelines", True),
    ("visadapt.adapters.layer", "visadapt.kernels", True),
])
def test_the_rule_itself(importer, imported, allowed):
    assert (violation(importer, imported) is None) == allowed


def test_relative_and_function_level_imports_are_seen(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from ..fewshot import data\n    from visadapt import kernels\n    return data\n")
    found = [m for _, m in imports(probe, "visadapt.hyperspectral.probe")]
    assert found == ["visadapt.fewshot.data", "visadapt.kernels"]


def test_nothing_cites_files_outside_the_repository():
    """Docstrings and docs cite papers, official code and docs inside the repository, never the design notes that
    sit beside a developer's checkout."""
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    texts = sources() + docs + sorted((ROOT / "tests").glob("*.py"))
    found = [f"{path.relative_to(ROOT)}:{n}" for path in texts
             for n, line in enumerate(path.read_text().splitlines(), 1)
             if ("specs/" in line or "shared/" in line or "DESIGN.md" in line) and path.name != "test_layers.py"]
    assert not found, found


def test_every_package_is_installed_by_pyproject():
    """A package missing from pyproject's list works in an editable install and vanishes from a wheel."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {module_of(init) for folder in FOLDERS for init in (ROOT / folder).rglob("__init__.py")}
    assert found <= listed, sorted(found - listed)
