"""One bridge process per SQLite database: an exclusive lock file next to the database.

SQLite has no way to coordinate replicas (no leader lease, no LISTEN/NOTIFY), so a second
``bridge run`` on the same file would run a second worker and executor over the same
queue. :class:`SqliteProcessLock` holds ``<database>.lock`` with ``fcntl.flock`` for the
life of the process; the kernel releases it when the process dies, however it dies, so a
stale file never blocks a restart. The audit CLI (``audit verify``/``export``) does not
take it: it may run next to the bridge.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from bridge.store.models import StoreUnavailable

LOCK_SUFFIX = ".lock"


class DatabaseInUse(StoreUnavailable):
    """Another bridge process already runs on this SQLite database."""


class SqliteProcessLock:
    """An exclusive, process-lifetime lock on ``<database>.lock``."""

    def __init__(self, database: Path) -> None:
        self.path = Path(f"{database}{LOCK_SUFFIX}")
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`DatabaseInUse` naming the file and the holder
        (StoreUnavailable if the lock file cannot be made)."""
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except OSError as e:
            raise StoreUnavailable(f"cannot create the lock file {self.path}: {e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise DatabaseInUse(
                f"the SQLite database {self.path.with_suffix('')} is in use by another bridge "
                f"process (pid {holder}, lock file {self.path}); SQLite allows one bridge "
                "process per database: stop the other one, or use PostgreSQL "
                "(database.url) to run several replicas"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        """Give the lock up (the process exiting does the same)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
