"""Reading a file from Synapse's media store, when the bridge shares it with Synapse.

With ``attachments.shared_media_store`` set and the module's ``media_delivery: path``, the
module names the file Synapse just wrote (its path as Synapse sees it) instead of sending
its bytes: the second copy of every upload over HTTP is saved (BENCHMARKS.md, "Synapse
module: upload latency").

The path comes from a caller holding the gate token and is still not trusted: it must lie
inside Synapse's media store (no ``..``, no other root), it is mapped onto the store as
mounted here, its last component must not be a symbolic link, and it must be a regular
file (a FIFO or a device would block or never end). Symbolic links an administrator made
inside the store (a directory moved to another disk) are followed. Nothing is ever
written.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import unquote

#: The longest path accepted (Linux's PATH_MAX).
MAX_PATH = 4096
#: Bytes read first, to tell a file that needs no reading (an image, a video) from its head.
HEAD_BYTES = 4096
#: Bytes read from the end as well: where a zip appended to an image would end (its
#: end-of-central-directory record and comment).
TAIL_BYTES = 22 + 65_535


class StoredFileError(Exception):
    """The named file cannot be read from the shared store; the message says why (no
    content, no path)."""


@dataclass(frozen=True, slots=True)
class StoredFile:
    """A file of the store, opened: its size and first bytes (the whole of a file of at
    most :data:`HEAD_BYTES`), and, when the rest is to be read, the open descriptor (the
    caller closes it with :meth:`close`; the extraction workers read it themselves)."""

    size: int
    head: bytes = b""
    over: bool = False  # larger than the cap: not read at all
    fd: int | None = None

    @property
    def complete(self) -> bool:
        """Whether ``head`` is the whole file."""
        return len(self.head) == self.size

    def close(self) -> None:
        """Close the descriptor, if one is open."""
        if self.fd is not None:
            os.close(self.fd)


def locate(synapse_root: Path, local_root: Path, reported: str) -> Path:
    """The local path of ``reported`` (percent-encoded, as Synapse names it), or
    :class:`StoredFileError` when it is not a file inside Synapse's media store."""
    if not reported or len(reported) > MAX_PATH * 3:
        raise StoredFileError("empty or overlong path")
    try:
        decoded = unquote(reported, errors="strict")
    except UnicodeDecodeError:
        raise StoredFileError("path is not UTF-8") from None
    if "\x00" in decoded or not decoded.startswith("/"):
        raise StoredFileError("path is not absolute")
    path = PurePosixPath(decoded)
    root = PurePosixPath(synapse_root.as_posix())
    try:
        inside = path.relative_to(root)
    except ValueError:
        raise StoredFileError("path is outside Synapse's media store") from None
    if not inside.parts or any(part in ("..", ".") for part in inside.parts):
        raise StoredFileError("path is outside Synapse's media store")
    return local_root.joinpath(*inside.parts)


def open_stored(
    path: Path, cap: int, done: Callable[[bytes], bool] = lambda head: False
) -> StoredFile:
    """Open the regular file at ``path`` and read its first :data:`HEAD_BYTES`; keep it
    open unless it is larger than ``cap`` (not read at all), no larger than its head, or
    ``done`` says its head and tail tell enough (asked of the head, then, only if that is
    enough, of the head followed by the last :data:`TAIL_BYTES`, where an appended archive
    would end). :class:`StoredFileError`
    when it cannot be opened or is not a regular file."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise StoredFileError("no such file in the shared media store") from None
    except OSError as e:
        raise StoredFileError(f"cannot open the file ({e.__class__.__name__})") from None
    keep = False
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise StoredFileError("not a regular file")
        if info.st_size > cap:
            return StoredFile(info.st_size, over=True)
        head = os.pread(fd, HEAD_BYTES, 0)
        if len(head) < HEAD_BYTES:
            return StoredFile(len(head), head)
        # The tail is read only when the head alone says enough (an image): a PDF or a
        # document goes to the workers without this second read.
        if done(head):
            tail_at = max(HEAD_BYTES, info.st_size - TAIL_BYTES)
            if done(head + os.pread(fd, info.st_size - tail_at, tail_at)):
                return StoredFile(info.st_size, head)
        keep = True
        return StoredFile(info.st_size, head, fd=fd)
    except OSError as e:
        raise StoredFileError(f"cannot read the file ({e.__class__.__name__})") from None
    finally:
        if not keep:
            os.close(fd)
