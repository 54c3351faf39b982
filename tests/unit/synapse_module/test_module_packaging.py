"""The Synapse module is a distribution of its own that Synapse's Python can take as is:
installed with ``pip install --no-deps`` it imports, and it imports nothing but the standard
library, Twisted and Synapse (no dependency of the bridge can sneak in)."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
MODULE_DIR = ROOT / "synapse_module"
PACKAGE = MODULE_DIR / "policy_bridge_synapse"
ALLOWED_THIRD_PARTY = {"twisted", "synapse", "treq", "zope"}


def top_level_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text("utf-8"), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_imports_only_stdlib_twisted_and_synapse() -> None:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) >= 4
    found: dict[str, set[str]] = {}
    for path in files:
        for name in top_level_imports(path):
            if name in sys.stdlib_module_names or name == "__future__":
                continue
            if name == "policy_bridge_synapse" or name in ALLOWED_THIRD_PARTY:
                continue
            found.setdefault(name, set()).add(path.name)
    assert found == {}


def test_declares_no_dependencies() -> None:
    text = (MODULE_DIR / "pyproject.toml").read_text("utf-8")
    assert "dependencies = []" in text


@pytest.mark.skipif(os.environ.get("BRIDGE_SKIP_SLOW") == "1", reason="BRIDGE_SKIP_SLOW=1")
def test_pip_install_no_deps_into_a_throwaway_venv(tmp_path: Path) -> None:
    """A venv standing in for Synapse's: it sees this environment's Twisted and Synapse
    (through a .pth file), gets the module by ``pip install --no-deps``, and imports it in a
    fresh interpreter where neither the repository nor the bridge is on the path."""
    venv = tmp_path / "synapse-env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    ours = sysconfig.get_paths()["purelib"]  # where this environment's synapse lives
    Path(site, "synapse_env.pth").write_text(ours + "\n")
    source = tmp_path / "src"  # built from a copy: no build files in the checkout
    shutil.copytree(MODULE_DIR, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    target = tmp_path / "installed"
    pip = subprocess.run(
        [
            sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
            "--target", str(target), str(source),
        ],
        capture_output=True,
        text=True,
        check=False,
    )  # fmt: skip
    assert pip.returncode == 0, pip.stderr[-2000:]
    assert sorted(p.name for p in target.iterdir() if not p.name.endswith(".dist-info")) == [
        "policy_bridge_synapse"
    ]
    Path(site, "module_under_test.pth").write_text(str(target) + "\n")
    probe = (
        "import sys, policy_bridge_synapse as m\n"
        "assert m.PolicyBridgeModule.__module__ == 'policy_bridge_synapse.module'\n"
        "assert 'bridge' not in sys.modules and 'aiohttp' not in sys.modules\n"
        "print(m.__file__)\n"
    )
    run = subprocess.run(
        [str(python), "-I", "-c", probe], capture_output=True, text=True, check=False, cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().startswith(str(target))
