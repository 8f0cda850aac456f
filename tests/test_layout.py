"""The shape of the code, checked: layers import only downward, no import cycles, torch and
transformers only in the worker, no oversized source file, and the README's layout table
matches the tree. Pure `ast`; nothing is imported."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bot", "adapters", "storage", "migrations")

# Lowest first. A module may import its own layer or any layer below it, never one above.
LAYERS = (
    "bot.core",  # value types, errors, contracts, config (and `bot` itself, which re-exports them)
    "storage",
    "bot.generation",
    "bot.worker",
    "bot.conversation",
    "bot.jobs",
    "adapters",
    "bot.runtime",
    "migrations",
)
HEAVY = ("torch", "transformers", "accelerate", "bitsandbytes", "gguf")
MAX_LINES = 600


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


MODULES = source_files()


def imports_of(name: str, path: Path) -> set[str]:
    """Every module `name` imports, anywhere in the file (functions and TYPE_CHECKING blocks too)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from package import module` imports the module; the package's own __init__ runs for
            # any import of something inside it, so it is not counted as an edge of its own.
            modules = {f"{base}.{alias.name}" for alias in node.names} & MODULES.keys()
            found.update(modules or {base})
    return found


def project_imports(name: str, path: Path) -> set[str]:
    """The project modules among `name`'s imports (a `from x import y` counts y when it is a module)."""
    return {target for target in imports_of(name, path) if target in MODULES and target != name}


def layer_of(module: str) -> str:
    if module == "bot":
        return "bot.core"
    for layer in sorted(LAYERS, key=len, reverse=True):
        if module == layer or module.startswith(layer + "."):
            return layer
    raise AssertionError(f"{module} is in no layer of tests/test_layout.py; add its folder to LAYERS")


GRAPH = {name: project_imports(name, path) for name, path in MODULES.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if state.get(nxt) is None and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if state.get(node) is None and (cycle := visit(node)):
            return cycle
    return None


def test_the_walker_sees_imports_of_every_kind(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from typing import TYPE_CHECKING\nimport os.path\nfrom . import queue\nfrom ..core.errors import StorageError\n"
        "if TYPE_CHECKING:\n    from bot.core import types\n"
        "def later():\n    import torch\n"
    )
    found = imports_of("bot.jobs.probe", probe)
    assert {"os.path", "bot.jobs.queue", "bot.core.errors", "bot.core.types", "torch"} <= found
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_module_is_in_a_layer():
    assert len(MODULES) > 40
    for name in MODULES:
        layer_of(name)


def test_no_import_cycle_between_modules():
    assert find_cycle(GRAPH) is None, f"import cycle: {' → '.join(find_cycle(GRAPH) or [])}"


def test_no_import_cycle_between_folders():
    folders: dict[str, set[str]] = defaultdict(set)
    for name, targets in GRAPH.items():
        for target in targets:
            if layer_of(target) != layer_of(name):
                folders[layer_of(name)].add(layer_of(target))
    assert find_cycle(folders) is None, f"folder cycle: {' → '.join(find_cycle(folders) or [])}"


def test_layers_import_only_downward():
    rank = {layer: index for index, layer in enumerate(LAYERS)}
    upward = [
        f"{name} ({layer_of(name)}) imports {target} ({layer_of(target)})"
        for name, targets in GRAPH.items()
        for target in sorted(targets)
        if rank[layer_of(target)] > rank[layer_of(name)]
    ]
    assert not upward, "\n".join(upward)


def test_the_core_reaches_adapters_only_through_the_runtime():
    offenders = [
        f"{name} imports {target}"
        for name, targets in GRAPH.items()
        if name.startswith("bot") and not name.startswith("bot.runtime")
        for target in targets
        if target.split(".")[0] == "adapters"
    ]
    assert not offenders, offenders


def test_torch_and_transformers_only_in_the_worker():
    offenders = [
        f"{name} imports {target}"
        for name, path in MODULES.items()
        if not name.startswith("bot.worker")
        for target in sorted(imports_of(name, path))
        if target.split(".")[0] in HEAVY
    ]
    assert not offenders, offenders


def test_no_source_file_is_oversized():
    files = [p for p in ROOT.rglob("*.py") if not {".venv", "tests", ".git"} & set(p.relative_to(ROOT).parts)]
    assert files
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines: {long}"


def test_every_package_says_what_it_owns():
    for name, path in MODULES.items():
        if path.name == "__init__.py" and name.count(".") <= 1 and name != "migrations.versions":
            tree = ast.parse(path.read_text())
            doc = ast.get_docstring(tree)
            assert doc and "TODO" not in doc and len(doc) > 40, f"{path} needs a docstring saying what it owns"


def readme_layout() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Layout", 1)
    assert len(section) == 2, "README.md has no '## Layout' section"
    rows = re.findall(r"^\| `([^`]+)` \|", section[1].split("\n## ", 1)[0], re.M)
    return {row.rstrip("/"): row for row in rows}


def test_the_readme_layout_table_matches_the_tree():
    table = readme_layout()
    missing_on_disk = [row for row in table if not (ROOT / row).exists()]
    assert not missing_on_disk, f"README lists paths that do not exist: {missing_on_disk}"
    expected = {"adapters", "storage", "migrations", "tests", "bench"}
    for path in sorted((ROOT / "bot").rglob("*.py")):
        relative = path.relative_to(ROOT)
        expected.add(str(relative.parent) if path.name == "__init__.py" else str(relative))
    missing_in_table = sorted(expected - set(table))
    assert not missing_in_table, f"README's layout table lacks: {missing_in_table}"


@pytest.mark.parametrize("layer", LAYERS)
def test_each_layer_has_modules(layer):
    assert any(layer_of(name) == layer for name in MODULES)
