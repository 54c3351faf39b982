"""Reading a file Synapse named from the shared media store: confinement to the store and
what is read."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.attachments.shared_store import (
    HEAD_BYTES,
    StoredFileError,
    locate,
    read_stored,
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


def test_reads_the_whole_file_or_only_its_head_when_that_is_enough(tmp_path: Path) -> None:
    path = tmp_path / "f"
    data = b"x" * (3 * HEAD_BYTES)
    path.write_bytes(data)
    whole = read_stored(path, cap=len(data))
    assert (whole.data, whole.size, whole.over) == (data, len(data), False)
    head = read_stored(path, cap=len(data), done=lambda h: h.startswith(b"x"))
    assert (head.data, head.size, head.over) == (data[:HEAD_BYTES], len(data), False)
    over = read_stored(path, cap=len(data) - 1)
    assert (over.data, over.size, over.over) == (b"", len(data), True)
    small = tmp_path / "s"
    small.write_bytes(b"abc")
    assert read_stored(small, cap=10, done=lambda h: True).data == b"abc"


def test_directories_links_and_missing_files_are_errors(tmp_path: Path) -> None:
    (tmp_path / "target").write_bytes(b"secret")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    for name in ("link", "missing", "."):
        with pytest.raises(StoredFileError):
            read_stored(tmp_path / name, cap=100)
