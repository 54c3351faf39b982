"""The commands reach the pipeline and the app only through the CommandServices seam."""

from __future__ import annotations

import ast
from pathlib import Path

import bridge.commands

FORBIDDEN = ("bridge.pipeline", "bridge.app", "bridge.http")


def imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_commands_import_nothing_from_the_pipeline_or_the_app() -> None:
    package = Path(bridge.commands.__file__).parent
    offending = {
        f"{path.name}: {name}"
        for path in package.glob("*.py")
        for name in imported(path)
        if name.startswith(FORBIDDEN)
    }
    assert not offending
