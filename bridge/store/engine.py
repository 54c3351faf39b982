"""The database engine: connection settings per backend, and SQLite's WAL truncation."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from bridge.store.models import StoreUnavailable


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    # FULL: a commit is on disk before we answer 200 to Synapse, even across power loss.
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


PRIVATE_FILE = 0o600
SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")


def private_sqlite_file(database: Path) -> None:
    """Make the SQLite database file readable by its owner only, before SQLite opens it.

    SQLite creates the WAL, shared-memory and journal files with the database file's
    permissions, so a database created here (mode 0600) keeps all of them private. An
    existing database (and its companions) readable by others is made 0600.
    """
    try:
        fd = os.open(database, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, PRIVATE_FILE)
    except FileExistsError:
        pass
    else:
        os.close(fd)
    for path in (database, *(Path(f"{database}{s}") for s in SQLITE_COMPANIONS)):
        with contextlib.suppress(FileNotFoundError):
            st = os.stat(path)
            if stat.S_IMODE(st.st_mode) & 0o077 and st.st_uid == os.getuid():
                os.chmod(path, stat.S_IMODE(st.st_mode) & 0o700)


def connect(url: str, *, pool_size: int) -> tuple[AsyncEngine, URL]:
    """An engine for ``url`` (not connected yet) and the parsed URL.

    Raises StoreUnavailable if the directory of a SQLite database cannot be created.
    """
    parsed = make_url(url)
    kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            try:
                Path(parsed.database).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as e:
                raise StoreUnavailable(
                    f"cannot create the directory for database {parsed.database}: {e}"
                ) from e
            try:
                private_sqlite_file(Path(parsed.database))
            except OSError as e:
                raise StoreUnavailable(
                    f"cannot create the database file {parsed.database}: {e}"
                ) from e
    else:
        kwargs.update(
            pool_size=pool_size,
            pool_pre_ping=True,
            # asyncpg prepares every statement; after 5 runs PostgreSQL may switch to a
            # generic plan chosen while a table was empty (a full scan forever after)
            connect_args={"server_settings": {"plan_cache_mode": "force_custom_plan"}},
        )
    # Errors quote their SQL; never their parameters (sealed values, but also blind indexes
    # and IDs that have no business in a log).
    engine = create_async_engine(url, hide_parameters=True, **kwargs)
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    return engine, parsed


async def truncate_wal(engine: AsyncEngine) -> None:
    """Push SQLite's WAL into the database file and empty it (best effort).

    After a secure delete, the WAL still holds the old pages: this leaves them nowhere.
    """
    with contextlib.suppress(SQLAlchemyError):
        async with engine.connect() as conn:
            await conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
