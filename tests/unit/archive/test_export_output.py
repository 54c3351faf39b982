"""``audit export -o FILE``: the file is created 0600, never over an existing file or through
a symlink; ``--force`` replaces it by a rename, still 0600, leaving a symlink's target alone."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.archive.export import OutputExists, PrivateOutput
from tests.unit.store.test_audit_store import Env, env, fill  # noqa: F401


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def open_umask() -> Iterator[None]:
    """A umask that lets anyone read new files (the export must not rely on the umask)."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_a_new_output_is_0600_whatever_the_umask(tmp_path: Path, open_umask: None) -> None:
    out = PrivateOutput(tmp_path / "out.jsonl")
    out.file.write(b"{}\n")
    out.commit()
    assert (tmp_path / "out.jsonl").read_bytes() == b"{}\n"
    assert mode(tmp_path / "out.jsonl") == 0o600


def test_an_existing_file_or_symlink_is_refused_without_replace(tmp_path: Path) -> None:
    existing = tmp_path / "existing"
    existing.write_bytes(b"keep")
    target = tmp_path / "target"
    target.write_bytes(b"target")
    link = tmp_path / "link"
    link.symlink_to(target)
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    for path in (existing, link, dangling):
        with pytest.raises(OutputExists, match="already exists; pass --force"):
            PrivateOutput(path)
    assert existing.read_bytes() == b"keep"
    assert target.read_bytes() == b"target"
    assert not (tmp_path / "nowhere").exists()


def test_replace_renames_a_new_0600_file_over_the_old_one(tmp_path: Path, open_umask: None) -> None:
    old = tmp_path / "out.jsonl"
    old.write_bytes(b"old")
    old.chmod(0o644)
    out = PrivateOutput(old, replace=True)
    out.file.write(b"new")
    assert old.read_bytes() == b"old"  # untouched until the export is complete
    out.commit()
    assert old.read_bytes() == b"new" and mode(old) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


def test_replace_never_writes_through_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"not yours")
    link = tmp_path / "out.jsonl"
    link.symlink_to(target)
    out = PrivateOutput(link, replace=True)
    out.file.write(b"export")
    out.commit()
    assert target.read_bytes() == b"not yours"
    assert not link.is_symlink() and link.read_bytes() == b"export" and mode(link) == 0o600


def test_a_failed_replace_leaves_the_old_file(tmp_path: Path) -> None:
    old = tmp_path / "out.jsonl"
    old.write_bytes(b"old")
    out = PrivateOutput(old, replace=True)
    out.file.write(b"half")
    out.discard()
    assert old.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


async def test_the_cli_refuses_an_existing_output_unless_forced(
    env: Env,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    await fill(env)
    out = env.tmp / "export.jsonl"
    out.write_bytes(b"earlier export")
    target = env.tmp / "target"
    target.write_bytes(b"target")
    link = env.tmp / "link.jsonl"
    link.symlink_to(target)
    for path in (out, link):
        capsys.readouterr()
        assert await env.cli("export", "-o", str(path)) == 2
        assert f"{path} already exists; pass --force to replace it" in capsys.readouterr().err
    assert out.read_bytes() == b"earlier export" and target.read_bytes() == b"target"
    # nothing was exported, so nothing is recorded
    assert await env.scalar("SELECT count(*) FROM records WHERE kind = 'export'") == 0
    for path in (out, link):
        assert await env.cli("export", "--force", "-o", str(path)) == 0
        assert b'"seq": 1' in path.read_bytes() or b'"seq":1' in path.read_bytes()
        assert not path.is_symlink() and mode(path) == 0o600
    assert target.read_bytes() == b"target"
    fresh = env.tmp / "fresh.csv"
    assert await env.cli("export", "--format", "csv", "-o", str(fresh)) == 0
    assert mode(fresh) == 0o600
    assert await env.scalar("SELECT count(*) FROM records WHERE kind = 'export'") == 3
