"""The database: one engine per store, its backend, and the connection context managers.

Repositories never make connections of their own for writes that belong together: they
take the ``conn`` of a transaction opened here (or by :meth:`RecordLog.write`, which adds
the chain's append lock and head bookkeeping), so several of them commit as one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from bridge.store.models import StoreUnavailable

#: One logger for every part of the store (its name as before the store was split up).
log = logging.getLogger("bridge.store.store")


class Backend(StrEnum):
    """The two databases the store runs on."""

    SQLITE = "sqlite"
    POSTGRESQL = "postgresql"


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    # FULL: a commit is on disk before we answer 200 to Synapse, even across power loss.
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


#: PostgreSQL advisory lock keys (transaction-scoped, ``pg_advisory_xact_lock``): replicas
#: on one database serialise on them. CHAIN: every transaction that appends to the record
#: chain (the head is re-read under it); SCHEMA: creating or migrating the schema.
CHAIN_LOCK_KEY = 0x62726964_63686E  # "bridchn"
SCHEMA_LOCK_KEY = 0x62726964_736368  # "bridsch"


async def advisory_xact_lock(conn: AsyncConnection, key: int) -> None:
    """Hold the PostgreSQL advisory lock ``key`` until ``conn``'s transaction ends."""
    await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})


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


class Database:
    """An engine (not connected until first use), its backend and parsed URL."""

    def __init__(self, engine: AsyncEngine, url: URL) -> None:
        self.engine = engine
        self.url = url
        self.backend = Backend.POSTGRESQL if engine.dialect.name == "postgresql" else Backend.SQLITE
        #: Serialises, within this process, the writes that append to the record chain and
        #: those that must not interleave with one (expiry batches, key re-wrapping).
        self.write_lock = asyncio.Lock()
        #: Run first in every write transaction (:meth:`transaction`): replicas install the
        #: leader lease's fence here, which refuses a deposed leader's writes.
        self.fence: Callable[[AsyncConnection], Awaitable[None]] | None = None

    @classmethod
    def create(cls, url: str, *, pool_size: int) -> Database:
        """An engine for ``url`` (not connected yet).

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
        # Errors quote their SQL; never their parameters (sealed values, but also blind
        # indexes and IDs that have no business in a log).
        engine = create_async_engine(url, hide_parameters=True, **kwargs)
        if parsed.get_backend_name() == "sqlite":
            event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return cls(engine, parsed)

    @property
    def sqlite(self) -> bool:
        """Whether this is SQLite (WAL, secure_delete and driver fast paths apply)."""
        return self.backend is Backend.SQLITE

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection]:
        """A connection in a transaction: committed at the end, rolled back on error."""
        async with self.engine.begin() as conn:
            if self.fence is not None:
                await self.fence(conn)
            yield conn

    @contextlib.asynccontextmanager
    async def connect(self) -> AsyncIterator[AsyncConnection]:
        """A connection for reads (its implicit transaction is rolled back at the end)."""
        async with self.engine.connect() as conn:
            yield conn

    async def reachable(self) -> bool:
        """Whether the database answers a trivial query right now."""
        try:
            async with self.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except (SQLAlchemyError, OSError):
            return False
        return True

    async def truncate_wal(self) -> None:
        """Push SQLite's WAL into the database file and empty it (best effort).

        After a secure delete, the WAL still holds the old pages: this leaves them nowhere.
        """
        with contextlib.suppress(SQLAlchemyError):
            async with self.engine.connect() as conn:
                await conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")

    async def close(self) -> None:
        """Close every pooled connection."""
        await self.engine.dispose()
