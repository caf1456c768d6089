"""The layout rules a newcomer relies on: ``eagrl/`` never imports ``lightning_modules/`` or ``datamodules/`` (not even
inside a function), and nothing but the entry points imports from ``eagrl/cli.py`` other than ``main``."""

from __future__ import annotations

import ast

from tests.conftest import REPO


def _imports(path) -> list[tuple[str, list[str]]]:
    """(module, names) of every import in ``path``, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, [alias.name for alias in node.names]))
    return found


def test_the_library_never_imports_the_lightning_side():
    offenders = [
        f"{path.relative_to(REPO)}: {module}"
        for path in sorted((REPO / "eagrl").rglob("*.py"))
        for module, _ in _imports(path)
        if module.split(".")[0] in ("lightning_modules", "datamodules")
    ]
    assert offenders == []


def test_only_main_is_imported_from_the_cli():
    roots = [REPO / d for d in ("eagrl", "lightning_modules", "datamodules", "benchmarks", "tests")]
    offenders = [
        f"{path.relative_to(REPO)}: {names}"
        for root in roots
        for path in sorted(root.rglob("*.py"))
        if path != REPO / "eagrl" / "cli.py"
        for module, names in _imports(path)
        if module == "eagrl.cli" and set(names) - {"main"}
    ]
    assert offenders == []
