"""The layering of docs/ARCHITECTURE.md, checked on the source: no import circle (imports under
TYPE_CHECKING and inside functions included), peewee only under storage/, the archive format
independent of the server, no production module reading a test-only setting, no module past
the size where it should be split."""

from __future__ import annotations

import ast
from pathlib import Path

import cfms_trio

PACKAGE_DIR = Path(cfms_trio.__file__).parent
MAX_MODULE_LINES = 650


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE_DIR.rglob("*.py")}


def _imports(name: str, path: Path) -> set[str]:
    """Every module of the package (or outside name) that `name` imports, anywhere in it."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            submodules = {f"{module}.{alias.name}" for alias in node.names} & MODULES.keys()
            # `from . import accounts` imports the submodule; `from .storage import Store`
            # imports the package itself.
            found |= submodules if len(submodules) == len(node.names) else submodules | {module}
    return found


GRAPH = {name: {m for m in _imports(name, path) if m in MODULES and m != name}
         for name, path in MODULES.items()}


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in GRAPH[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for node in GRAPH:
        if node not in index:
            visit(node)
    return out


def _importers_of(prefix: str) -> set[str]:
    return {name for name, path in MODULES.items()
            if any(m == prefix or m.startswith(prefix + ".") for m in _imports(name, path))}


def test_no_import_circle():
    assert _cycles() == []


def test_only_storage_imports_peewee_or_the_models():
    outside = {name for name in _importers_of("peewee") | _importers_of("cfms_trio.storage.models")
               if not name.startswith("cfms_trio.storage")}
    assert outside == set()


def test_archive_format_knows_nothing_of_the_server():
    allowed = {"cfms_trio.errors", "cfms_trio.config", "cfms_trio.conventions"}
    for name, path in MODULES.items():
        if name.startswith("cfms_trio.backup.format"):
            ours = {m for m in _imports(name, path) if m.startswith("cfms_trio")}
            assert {m for m in ours if not m.startswith("cfms_trio.backup.format")} <= allowed, name
            assert "trio" not in _imports(name, path), name


def test_outside_code_uses_only_the_format_entry_points():
    for name, path in MODULES.items():
        if not name.startswith("cfms_trio.backup.format"):
            deep = {m for m in _imports(name, path) if m.startswith("cfms_trio.backup.format.")}
            assert deep == set(), name


def test_no_production_module_reads_a_test_setting():
    for name, path in MODULES.items():
        assert "CFMS_TEST" not in path.read_text(), name


def test_no_module_grows_past_its_split_point():
    sizes = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    assert {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES} == {}
