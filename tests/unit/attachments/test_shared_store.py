"""Reading a file Synapse named from the shared media store: confinement to the store and
what is read."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.attachments.pool import read_at
from bridge.attachments.shared_store import (
    HEAD_BYTES,
    StoredFileError,
    locate,
    open_stored,
)

STORE = Path("/data/media_store")


def test_a_path_in_the_store_maps_onto_the_local_mount(tmp_path: Path) -> None:
    got = locate(STORE, tmp_path, "/data/media_store/local_content/ab/cd/ef%20gh")
    assert got == tmp_path / "local_content" / "ab" / "cd" / "ef gh"
    assert locate(STORE, tmp_path, "/data/media_store//x/./y") == tmp_path / "x" / "y"


@pytest.mark.parametrize(
    "reported",
    [
        "",
        "/data/media_store",
        "/data/media_store/..",
        "/data/media_store/a/../../etc/passwd",
        "/data/media_store/a/%2e%2e/%2e%2e/etc/passwd",
        "/data/media_storex/a",
        "/etc/passwd",
        "data/media_store/a",
        "/data/media_store/a%00b",
        "/data/media_store/%ff",
        "/data/media_store/" + "a" * 20_000,
    ],
)
def test_anything_else_is_refused(tmp_path: Path, reported: str) -> None:
    with pytest.raises(StoredFileError):
        locate(STORE, tmp_path, reported)


def test_a_file_is_kept_open_unless_its_head_is_all_or_enough(tmp_path: Path) -> None:
    path = tmp_path / "f"
    data = b"x" * (3 * HEAD_BYTES)
    path.write_bytes(data)
    opened = open_stored(path, cap=len(data))
    try:
        assert opened.fd is not None and (opened.size, opened.over) == (len(data), False)
        assert opened.head == data[:HEAD_BYTES] and read_at(opened.fd, opened.size) == data
    finally:
        opened.close()
    enough = open_stored(path, cap=len(data), done=lambda h: h.startswith(b"x"))
    assert enough.fd is None and enough.head == data[:HEAD_BYTES] and enough.size == len(data)
    assert not enough.complete
    over = open_stored(path, cap=len(data) - 1)
    assert (over.fd, over.head, over.size, over.over) == (None, b"", len(data), True)
    small = tmp_path / "s"
    small.write_bytes(b"abc")
    whole = open_stored(small, cap=10, done=lambda h: False)
    assert whole.fd is None and whole.head == b"abc" and whole.complete


def test_directories_links_and_missing_files_are_errors(tmp_path: Path) -> None:
    (tmp_path / "target").write_bytes(b"secret")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    for name in ("link", "missing", "."):
        with pytest.raises(StoredFileError):
            open_stored(tmp_path / name, cap=100)
