"""The package's layers, checked from the source (issue 10's definition of done: no import
cycle between packages; the pure policy core imports nothing with I/O).

Every module under ``bridge/`` is parsed with :mod:`ast` (nothing is imported or run), and
every import statement counts: at module level, inside functions and under
``if TYPE_CHECKING:`` alike. A *part* is a package directly under ``bridge/`` (``policy``,
``store``, ...) or a top-level module (``app``, ``config``, ...). The checks:

- the imports between parts form no cycle;
- each part imports only the parts :data:`ALLOWED` gives it (the layers; the table itself is
  acyclic, and :data:`RULES` restates the issue's rules so that loosening the table is a
  visible decision);
- the policy core imports no module that does I/O (:data:`POLICY_IO`) and calls no I/O
  builtin, apart from the reads listed in :data:`POLICY_IO_EXCEPTIONS`.

A failure names the file, the line and the import statement.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import pytest

BRIDGE = Path(__file__).resolve().parents[2] / "bridge"
ROOT = "bridge"  # the package itself: only ``__version__``, importable from anywhere

#: Which parts each part may import (besides itself and ``bridge.__version__``). From the
#: bottom: the pure policy core and the audit primitives, the store, the commands, the
#: pipeline (which runs the commands), the archive's tools (whose jobs post through the
#: executor), the HTTP endpoints (whose gate audits through the archive's sink), then the
#: wiring (app) and the entry points. ``dev`` (demo, throwaway homeserver) serves only the CLI.
ALLOWED: Mapping[str, frozenset[str]] = {
    "policy": frozenset(),
    "audit": frozenset(),
    "metrics": frozenset(),
    "logs": frozenset(),
    "scheduler": frozenset(),
    "matrix": frozenset(),
    "roles": frozenset(),
    "e2ee": frozenset(),  # the crypto seam and its libolm implementation (issue 14)
    # attachments (issue 12): file readers, pure decision over the DLP engine
    "attachments": frozenset({"policy"}),
    "store": frozenset({"audit"}),
    "config": frozenset({"attachments", "policy", "roles"}),
    "registration": frozenset({"config"}),
    "commands": frozenset({"audit", "config", "metrics", "policy", "roles", "store"}),
    "pipeline": frozenset(
        {
            "attachments",
            "audit",
            "commands",
            "config",
            "e2ee",
            "logs",
            "matrix",
            "metrics",
            "policy",
            "roles",
            "scheduler",
            "store",
        }
    ),
    "archive": frozenset({"audit", "config", "pipeline", "policy", "scheduler", "store"}),
    "http": frozenset({"archive", "attachments", "audit", "config", "metrics", "policy", "store"}),
    "dev": frozenset({"config", "registration"}),
    # the compliance console: reads through the store, commands' policy view (issue 15)
    "console": frozenset({"archive", "audit", "commands", "config", "policy", "roles", "store"}),
    "app": frozenset(
        {
            "archive",
            "attachments",
            "audit",
            "commands",
            "config",
            "console",
            "e2ee",
            "http",
            "matrix",
            "metrics",
            "pipeline",
            "policy",
            "scheduler",
            "store",
        }
    ),
    "cli": frozenset(
        {"app", "archive", "audit", "config", "dev", "logs", "matrix", "registration", "store"}
    ),
    "entrypoint": frozenset({"cli", "config", "registration"}),
    "__main__": frozenset({"cli"}),
}

#: The issue's rules: (part, parts it must never import). The table above must keep them.
RULES: Mapping[str, frozenset[str]] = {
    "policy": frozenset(ALLOWED) - {"policy"},  # pure: nothing above it, not even config
    "audit": frozenset({"store", "pipeline", "commands", "http", "archive", "app"}),
    "store": frozenset(ALLOWED) - {"store", "audit"},
    "commands": frozenset({"pipeline", "http", "app", "archive", "dev"}),
    "pipeline": frozenset({"http", "app", "dev"}),
}

#: Modules that do I/O (files, processes, network, databases, the event loop, logging
#: handlers, the Matrix client, the config file), which the policy core must not import.
#: A module is matched with its submodules (``os`` covers ``os.path``).
POLICY_IO = frozenset(
    {
        # stdlib: files and the file system
        "os",
        "io",
        "pathlib",
        "shutil",
        "tempfile",
        "glob",
        "fileinput",
        "mmap",
        "importlib",
        "pkgutil",
        "zipfile",
        "tarfile",
        "sqlite3",
        "dbm",
        "shelve",
        "pickle",
        "logging",
        # stdlib: processes, threads, the event loop
        "subprocess",
        "multiprocessing",
        "concurrent",
        "threading",
        "asyncio",
        "signal",
        # stdlib: network
        "socket",
        "ssl",
        "select",
        "selectors",
        "http",
        "urllib",
        "ftplib",
        "smtplib",
        "email",
        # third-party
        "aiohttp",
        "yarl",
        "requests",
        "httpx",
        "mautrix",
        "sqlalchemy",
        "aiosqlite",
        "asyncpg",
        "psycopg",
        "psycopg2",
        "prometheus_client",
        "ruamel",
    }
)

#: Builtins that do I/O, which the policy core must not call.
POLICY_IO_BUILTINS = frozenset({"open", "print", "input", "breakpoint", "__import__"})

#: (module, imported module) pairs allowed despite POLICY_IO, with why. Judging stays free of
#: I/O: these read data shipped with an installed package, once, when the module is imported.
POLICY_IO_EXCEPTIONS: Mapping[tuple[str, str], str] = {
    ("bridge.policy.confusables", "importlib.resources"): (
        "Unicode's TR39 confusables data, read once at import from the installed "
        "confusable-homoglyphs package (no network, nothing read while judging)"
    ),
}


@dataclass(frozen=True, slots=True)
class Import:
    """One imported module, as a statement of a module under bridge/ names it."""

    importer: str  # dotted module name, e.g. bridge.pipeline.worker
    path: Path
    line: int
    statement: str  # the statement's source, on one line
    target: str  # dotted name of the imported module (``from a import b``: a.b if a module)

    def where(self) -> str:
        return f"{self.path.relative_to(BRIDGE.parent)}:{self.line}: {self.statement}"


def module_name(path: Path, root: Path) -> str:
    """The dotted name of the module at ``path`` in the package directory ``root``."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str, root: Path) -> bool:
    """Whether the dotted ``name`` is a module or package under ``root``."""
    parts = name.split(".")
    if parts[0] != root.name:
        return False
    base = root.parent.joinpath(*parts)
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imports_of(path: Path, root: Path) -> Iterator[Import]:
    """Every module the source at ``path`` imports, wherever the statement stands."""
    source = path.read_text(encoding="utf-8")
    importer = module_name(path, root)
    package = importer if path.name == "__init__.py" else importer.rpartition(".")[0]
    lines = source.splitlines()
    for node in ast.walk(ast.parse(source, filename=str(path))):
        if not isinstance(node, ast.Import | ast.ImportFrom):
            continue
        end = node.end_lineno or node.lineno
        statement = " ".join(line.strip() for line in lines[node.lineno - 1 : end])
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(importer, path, node.lineno, statement, alias.name)
        else:
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                # ``from a import b``: the module a.b when it is one (ours, or a name that
                # may be a submodule elsewhere), else the module a
                ours = module.split(".")[0] == root.name
                if alias.name != "*" and (_is_module(sub, root) or not ours):
                    target = sub
                else:
                    target = module
                yield Import(importer, path, node.lineno, statement, target)


def io_calls_of(path: Path) -> Iterator[tuple[int, str]]:
    """(line, name) of every call of an I/O builtin in the source at ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in POLICY_IO_BUILTINS
        ):
            yield node.lineno, node.func.id


def part_of(module: str) -> str | None:
    """The part of bridge a dotted module belongs to (ROOT for the package itself), or None
    for a module outside bridge."""
    parts = module.split(".")
    if parts[0] != ROOT:
        return None
    return parts[1] if len(parts) > 1 else ROOT


def _matches(module: str, names: frozenset[str]) -> str | None:
    parts = module.split(".")
    for i in range(1, len(parts) + 1):
        if ".".join(parts[:i]) in names:
            return ".".join(parts[:i])
    return None


def find_cycle(graph: Mapping[str, frozenset[str] | set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None if it has none."""
    done: set[str] = set()
    for start in sorted(graph):
        if start in done:
            continue
        path: list[str] = []
        on_path: set[str] = set()
        stack: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(graph.get(start, ()))))]
        path.append(start)
        on_path.add(start)
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                path.pop()
                on_path.discard(node)
                done.add(node)
            elif child in on_path:
                return [*path[path.index(child) :], child]
            elif child not in done:
                stack.append((child, iter(sorted(graph.get(child, ())))))
                path.append(child)
                on_path.add(child)
    return None


def _all_imports() -> list[Import]:
    return [imp for path in sorted(BRIDGE.rglob("*.py")) for imp in imports_of(path, BRIDGE)]


IMPORTS = _all_imports()


def _between_parts() -> dict[tuple[str, str], list[Import]]:
    edges: dict[tuple[str, str], list[Import]] = {}
    for imp in IMPORTS:
        src, dst = part_of(imp.importer), part_of(imp.target)
        if src is None or dst is None or src == dst or dst == ROOT:
            continue
        edges.setdefault((src, dst), []).append(imp)
    return edges


# -- the checks -----------------------------------------------------------------------------


def test_every_part_is_in_the_table() -> None:
    parts = {part_of(module_name(p, BRIDGE)) for p in BRIDGE.rglob("*.py")} - {ROOT}
    missing = sorted(p for p in parts if p is not None and p not in ALLOWED)
    stale = sorted(set(ALLOWED) - parts)
    assert not missing, f"parts of bridge with no row in ALLOWED (place them in a layer): {missing}"
    assert not stale, f"rows of ALLOWED for parts that no longer exist: {stale}"


def test_the_package_root_imports_nothing() -> None:
    own = [imp.where() for imp in IMPORTS if imp.importer == ROOT]
    assert not own, "bridge/__init__.py is imported by every part; it must import nothing:\n" + (
        "\n".join(own)
    )


def test_no_import_cycle_between_parts() -> None:
    edges = _between_parts()
    graph: dict[str, set[str]] = {}
    for src, dst in edges:
        graph.setdefault(src, set()).add(dst)
    cycle = find_cycle(graph)
    if cycle:
        lines = [edges[(a, b)][0].where() for a, b in pairwise(cycle)]
        pytest.fail("import cycle " + " -> ".join(cycle) + ":\n" + "\n".join(lines))


def test_every_import_between_parts_is_allowed() -> None:
    problems = [
        f"{imp.where()}\n    {src} may not import {dst} "
        f"(allowed: {', '.join(sorted(ALLOWED.get(src, ()))) or 'nothing'})"
        for (src, dst), imps in sorted(_between_parts().items())
        if dst not in ALLOWED.get(src, frozenset())
        for imp in imps
    ]
    assert not problems, "imports against the layers (see ALLOWED):\n" + "\n".join(problems)


def test_the_table_is_acyclic_and_keeps_the_rules() -> None:
    assert find_cycle(ALLOWED) is None, f"ALLOWED has a cycle: {find_cycle(ALLOWED)}"
    broken = {
        part: sorted(ALLOWED[part] & forbidden)
        for part, forbidden in RULES.items()
        if ALLOWED[part] & forbidden
    }
    assert not broken, f"ALLOWED breaks the issue's rules: {broken}"
    importers_of_dev = sorted(p for p, allowed in ALLOWED.items() if "dev" in allowed)
    assert importers_of_dev == ["cli"], "only the CLI (for the demo) may import dev/"


def test_the_policy_core_imports_nothing_with_io() -> None:
    problems = []
    for imp in IMPORTS:
        if part_of(imp.importer) != "policy" or part_of(imp.target) is not None:
            continue
        hit = _matches(imp.target, POLICY_IO)
        if hit and (imp.importer, imp.target) not in POLICY_IO_EXCEPTIONS:
            problems.append(f"{imp.where()}\n    {hit} does I/O")
    for path in sorted((BRIDGE / "policy").rglob("*.py")):
        for line, name in io_calls_of(path):
            problems.append(f"{path.relative_to(BRIDGE.parent)}:{line}: calls {name}()")
    assert not problems, "the policy core must stay pure:\n" + "\n".join(problems)


def test_the_policy_exceptions_are_still_needed() -> None:
    found = {(imp.importer, imp.target) for imp in IMPORTS}
    stale = sorted(set(POLICY_IO_EXCEPTIONS) - found)
    assert not stale, f"POLICY_IO_EXCEPTIONS names imports that are gone: {stale}"


# -- the checker itself ---------------------------------------------------------------------


def test_the_parser_sees_every_kind_of_import(tmp_path: Path) -> None:
    root = tmp_path / "bridge"
    (root / "policy").mkdir(parents=True)
    (root / "store").mkdir()
    for name in ("__init__.py", "policy/__init__.py", "policy/model.py", "store/__init__.py"):
        (root / name).write_text("")
    (root / "store" / "reader.py").write_text("")
    (root / "policy" / "engine.py").write_text(
        "from __future__ import annotations\n"
        "from typing import TYPE_CHECKING\n"
        "import os.path\n"
        "from . import model\n"
        "from .model import Thing\n"
        "from importlib import resources\n"
        "if TYPE_CHECKING:\n"
        "    from bridge.store import reader\n"
        "def f() -> None:\n"
        "    from ..store.reader import read\n"
        "    open('x')\n"
    )
    found = {(imp.line, imp.target) for imp in imports_of(root / "policy" / "engine.py", root)}
    assert found == {
        (1, "__future__.annotations"),
        (2, "typing.TYPE_CHECKING"),
        (3, "os.path"),
        (4, "bridge.policy.model"),
        (5, "bridge.policy.model"),
        (6, "importlib.resources"),
        (8, "bridge.store.reader"),
        (10, "bridge.store.reader"),
    }
    assert list(io_calls_of(root / "policy" / "engine.py")) == [(11, "open")]
    assert _matches("os.path", POLICY_IO) == "os"
    assert _matches("html.parser", POLICY_IO) is None  # "http" is not a prefix of "html"


def test_cycles_are_found() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"y"}, "y": {"y"}}) == ["y", "y"]
