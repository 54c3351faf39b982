"""Creating the schema, the numbered one-way migrations, and unlocking the keys at open.

Each schema step is one module ``NNN_name.py`` in this package: ``VERSION`` (the schema it
produces), ``RETIRES`` (tables renamed to ``<name>_old`` before the new schema is created,
so their rows can be carried over) and ``upgrade(ctx, conn, retired)``. :func:`migrate`
runs every step above the stored version, in order, in ONE transaction with the schema
creation and the unlocking: a crash (or error) part-way rolls the whole migration back, so
the next start finds the old schema and begins again.
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

from sqlalchemy import inspect, select, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection

from bridge.store import schema
from bridge.store.actions import ActionQueue
from bridge.store.database import SCHEMA_LOCK_KEY, Backend, Database, advisory_xact_lock, log
from bridge.store.keys import INDEX_CHECK_KEY, KeyRepository
from bridge.store.models import StoreError
from bridge.store.records import RecordLog
from bridge.store.rooms import RoomRepository
from bridge.store.schema import data_keys, state
from bridge.store.state import StateRepository

_MIGRATE_BATCH = 2000


@dataclass(frozen=True, slots=True)
class MigrationContext:
    """What a schema step works with: the database and the repositories it writes through."""

    db: Database
    keys: KeyRepository
    records: RecordLog
    state: StateRepository
    rooms: RoomRepository
    actions: ActionQueue


class Step(Protocol):
    """One ``NNN_name.py`` module."""

    VERSION: int
    RETIRES: tuple[str, ...]

    @property
    def upgrade(
        self,
    ) -> Callable[[MigrationContext, AsyncConnection, Mapping[str, str]], Awaitable[None]]: ...


def steps() -> list[Step]:
    """The schema steps of this package, by version."""
    found = []
    for info in pkgutil.iter_modules(__path__):
        if re.fullmatch(r"\d{3}_\w+", info.name):
            found.append(cast(Step, importlib.import_module(f"{__name__}.{info.name}")))
    found.sort(key=lambda m: m.VERSION)
    assert [m.VERSION for m in found] == list(range(2, schema.SCHEMA_VERSION + 1))
    return found


async def old_rows(
    conn: AsyncConnection, table: str, columns: str, key: str, after: Any
) -> AsyncIterator[Sequence[Any]]:
    """The rows of the retired ``table`` in batches, ordered by ``key`` (the first of
    ``columns``), from after ``after``."""
    stmt = text(
        f"SELECT {columns} FROM {conn.dialect.identifier_preparer.quote(table)} "  # noqa: S608
        f"WHERE {key} > :after ORDER BY {key} LIMIT {_MIGRATE_BATCH}"
    )
    while True:
        rows = (await conn.execute(stmt, {"after": after})).all()
        if not rows:
            return
        yield rows
        after = rows[-1][0]


async def drop_retired(conn: AsyncConnection, table: str) -> None:
    """Drop a retired table once its rows are carried over."""
    await conn.exec_driver_sql(f"DROP TABLE {conn.dialect.identifier_preparer.quote(table)}")


async def migrate(ctx: MigrationContext, *, create: bool = True) -> None:
    """Create the schema, or migrate an older one in place, all in ONE transaction.

    Schema 1 (plaintext records): every record is encrypted and chained in seq order;
    schema 2: the operational tables (rooms, actions, state values) are encrypted. The
    work queue and the executor's actions are kept. ``create=False`` (the audit CLI)
    never writes a migration: it refuses an old schema.
    """
    db = ctx.db
    sqlite = db.backend is Backend.SQLITE
    async with db.connect() as conn:
        if sqlite:
            # pysqlite begins a transaction only before DML: BEGIN now, so the DDL of a
            # migration (renames, new tables, drops) is inside the one transaction too
            await conn.exec_driver_sql("BEGIN IMMEDIATE" if create else "BEGIN")
        try:
            if not sqlite:  # replicas starting together: one creates/migrates, the rest wait
                await advisory_xact_lock(conn, SCHEMA_LOCK_KEY)
            migrated = await _migrate(ctx, conn, create)
        except BaseException:
            await conn.rollback()
            ctx.records.reset()
            raise
        await conn.commit()
    ctx.records.committed()
    if migrated and sqlite:
        # the freed plaintext pages were zeroed (secure_delete); push them into the
        # database file and empty the WAL, which held the old pages
        await db.truncate_wal()
    elif migrated:
        # old row versions of bridge_state (plaintext) stay on disk until rewritten
        with contextlib.suppress(SQLAlchemyError):
            async with db.engine.connect() as conn:
                conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
                await conn.exec_driver_sql("VACUUM FULL bridge_state")


async def _migrate(ctx: MigrationContext, conn: AsyncConnection, create: bool) -> bool:
    """The body of :func:`migrate`; True if an older schema was migrated."""
    version = await stored_version(conn)
    if version is not None and version > schema.SCHEMA_VERSION:
        raise StoreError(
            f"the database has schema version {version}, newer than this bridge "
            f"understands ({schema.SCHEMA_VERSION}); upgrade the bridge"
        )
    old = version is not None and version < schema.SCHEMA_VERSION
    if old and not create:
        raise StoreError(
            f"the database has schema version {version}; this bridge uses "
            f"{schema.SCHEMA_VERSION}. Back the database up, then start the bridge once: "
            f"it migrates the database (one way) before it serves"
        )
    retired: dict[str, str] = {}
    pending: list[Step] = []
    if old:
        assert version is not None
        log.warning(
            "migrating the database from schema %d to %d (one way; in one transaction)",
            version,
            schema.SCHEMA_VERSION,
        )
        if ctx.db.backend is Backend.SQLITE:  # freed pages (old plaintext) are overwritten
            await conn.exec_driver_sql("PRAGMA secure_delete=ON")
        pending = [s for s in steps() if s.VERSION > version]
        for step in pending:
            for name in step.RETIRES:
                old_name = await _retire(ctx.db, conn, name)
                if old_name is not None:
                    retired[name] = old_name
    if create:
        await conn.run_sync(schema.metadata.create_all)
    await _unlock(ctx, conn)
    if version is None:
        await ctx.state.put(conn, "schema_version", str(schema.SCHEMA_VERSION))
    if not old:
        return False
    for step in pending:
        await step.upgrade(ctx, conn, retired)
    await ctx.state.put(conn, "schema_version", str(schema.SCHEMA_VERSION))
    if ctx.db.backend is Backend.SQLITE:
        await conn.exec_driver_sql("PRAGMA secure_delete=OFF")
    log.warning("database migrated to schema %d", schema.SCHEMA_VERSION)
    return True


async def stored_version(conn: AsyncConnection) -> int | None:
    """The schema version of the database; None for an empty one."""

    def probe(sync_conn: Any) -> tuple[bool, list[str]]:
        insp = inspect(sync_conn)
        cols = [c["name"] for c in insp.get_columns("records")] if insp.has_table("records") else []
        return insp.has_table("bridge_state"), cols

    has_state, record_cols = await conn.run_sync(probe)
    version: int | None = None
    if has_state:
        raw = (
            await conn.execute(select(state.c.value).where(state.c.key == "schema_version"))
        ).scalar()
        if raw is not None:
            try:
                version = int(raw)
            except ValueError:
                raise StoreError(f"bridge_state.schema_version is {raw!r}, not a number") from None
    if record_cols and "ciphertext" not in record_cols:
        version = 1  # plaintext records, whatever the state says
    return version


async def _retire(db: Database, conn: AsyncConnection, name: str) -> str | None:
    """Rename table ``name`` to ``<name>_old`` (freeing its index names); None if absent."""
    old = f"{name}_old"
    quote = conn.dialect.identifier_preparer.quote

    def probe(sync_conn: Any) -> tuple[list[str], str | None, bool] | None:
        insp = inspect(sync_conn)
        if not insp.has_table(name):
            return None
        indexes = [
            ix["name"]
            for ix in insp.get_indexes(name)
            if ix.get("name") and not ix.get("duplicates_constraint")
        ]
        return indexes, insp.get_pk_constraint(name).get("name"), insp.has_table(old)

    found = await conn.run_sync(probe)
    if found is None:
        return None
    indexes, pk, stale = found
    if stale:  # left by an interrupted migration of an older release: start over
        await conn.exec_driver_sql(f"DROP TABLE {quote(old)}")
    for ix in indexes:
        await conn.exec_driver_sql(f"DROP INDEX {quote(ix)}")
    await conn.exec_driver_sql(f"ALTER TABLE {quote(name)} RENAME TO {quote(old)}")
    if db.backend is Backend.POSTGRESQL and pk:
        await conn.exec_driver_sql(f"ALTER INDEX {quote(pk)} RENAME TO {quote(old + '_pkey')}")
    return old


async def _unlock(ctx: MigrationContext, conn: AsyncConnection) -> None:
    """Check the keyring against the stored data keys; read the chain head (no scan)."""
    any_record = await ctx.records.load_head(conn)
    any_key = (await conn.execute(select(data_keys.c.key_id).limit(1))).first()
    if await ctx.keys.unlock(conn, empty=not any_record and any_key is None):
        await ctx.state.put(conn, INDEX_CHECK_KEY, ctx.keys.index_check())
