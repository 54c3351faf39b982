"""Creating the schema, migrating schemas 1 and 2 in place, unlocking the keys."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

from sqlalchemy import func, insert, inspect, select, text, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection

from bridge.audit.crypto import BlindIndexer
from bridge.audit.keyring import Keyring, KeyringMissingError
from bridge.store import schema
from bridge.store.codec import dumps
from bridge.store.core import log
from bridge.store.engine import truncate_wal
from bridge.store.models import Plain, StoreError, now_ms
from bridge.store.operational import (
    INDEX_CHECK_KEY,
    PLAIN_STATE_KEYS,
    SEALED_PREFIX,
    OperationalMixin,
)
from bridge.store.schema import actions, data_keys, rooms, state, transactions

_MIGRATE_BATCH = 2000


async def _old_rows(
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


class MigrationsMixin(OperationalMixin):
    """Schema creation and the one-way in-place migrations; unlocking at open."""

    async def migrate(self, *, create: bool = True) -> None:
        """Create the schema, or migrate an older one in place, all in ONE transaction.

        Schema 1 (plaintext records): every record is encrypted and chained in seq order;
        schema 2: the operational tables (rooms, actions, state values) are encrypted. The
        work queue and the executor's actions are kept. A crash (or error) part-way rolls
        the whole migration back, so the next start finds the old schema and begins again.
        ``create=False`` (the audit CLI) never writes a migration: it refuses an old schema.
        """
        sqlite = self.backend == "sqlite"
        async with self.engine.connect() as conn:
            if sqlite:
                # pysqlite begins a transaction only before DML: BEGIN now, so the DDL of a
                # migration (renames, new tables, drops) is inside the one transaction too
                await conn.exec_driver_sql("BEGIN IMMEDIATE" if create else "BEGIN")
            try:
                migrated = await self._migrate(conn, create)
            except BaseException:
                await conn.rollback()
                self._reset()
                raise
            await conn.commit()
        self._committed()
        if migrated and sqlite:
            # the freed plaintext pages were zeroed (secure_delete); push them into the
            # database file and empty the WAL, which held the old pages
            await truncate_wal(self.engine)
        elif migrated:
            # old row versions of bridge_state (plaintext) stay on disk until rewritten
            with contextlib.suppress(SQLAlchemyError):
                async with self.engine.connect() as conn:
                    conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
                    await conn.exec_driver_sql("VACUUM FULL bridge_state")

    async def _migrate(self, conn: AsyncConnection, create: bool) -> bool:
        """The body of :meth:`migrate`; True if an older schema was migrated."""
        version = await self._stored_version(conn)
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
        if old:
            assert version is not None
            log.warning(
                "migrating the database from schema %d to %d (one way; in one transaction)",
                version,
                schema.SCHEMA_VERSION,
            )
            if self.backend == "sqlite":  # freed pages (old plaintext) are overwritten
                await conn.exec_driver_sql("PRAGMA secure_delete=ON")
            for name in (("records",) if version < 2 else ()) + ("rooms", "actions"):
                old_name = await self._retire(conn, name)
                if old_name is not None:
                    retired[name] = old_name
        if create:
            await conn.run_sync(schema.metadata.create_all)
        await self._unlock(conn)
        if version is None:
            await self._put_state(conn, "schema_version", str(schema.SCHEMA_VERSION))
        if not old:
            return False
        if "records" in retired:
            await self._migrate_records_v1(conn, retired["records"])
        await self._migrate_operational(conn, retired.get("rooms"), retired.get("actions"))
        await self._put_state(conn, "schema_version", str(schema.SCHEMA_VERSION))
        if self.backend == "sqlite":
            await conn.exec_driver_sql("PRAGMA secure_delete=OFF")
        log.warning("database migrated to schema %d", schema.SCHEMA_VERSION)
        return True

    @staticmethod
    async def _stored_version(conn: AsyncConnection) -> int | None:
        """The schema version of the database; None for an empty one."""

        def probe(sync_conn: Any) -> tuple[bool, list[str]]:
            insp = inspect(sync_conn)
            cols = (
                [c["name"] for c in insp.get_columns("records")]
                if insp.has_table("records")
                else []
            )
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
                    raise StoreError(
                        f"bridge_state.schema_version is {raw!r}, not a number"
                    ) from None
        if record_cols and "ciphertext" not in record_cols:
            version = 1  # plaintext records, whatever the state says
        return version

    async def _retire(self, conn: AsyncConnection, name: str) -> str | None:
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
        if self.backend == "postgresql" and pk:
            await conn.exec_driver_sql(f"ALTER INDEX {quote(pk)} RENAME TO {quote(old + '_pkey')}")
        return old

    async def _migrate_records_v1(self, conn: AsyncConnection, old: str) -> None:
        """Encrypt and chain the plaintext records of schema 1, in seq order.

        Seqs are renumbered 1, 2, 3 … when the old ones had gaps (the chain has none), and
        the work queue's seq ranges follow. Checkpoints: one, at the end.
        """
        quote = conn.dialect.identifier_preparer.quote
        bounds: set[int] = set()
        for first, last in await conn.execute(
            select(transactions.c.first_seq, transactions.c.last_seq)
        ):
            bounds.update(x for x in (first, last) if x is not None)
        index = self._idx
        assert index is not None
        columns = "seq, ts, kind, event_id, room_id, sender, type, origin_ts, data"
        remap: dict[int, int] = {}
        count = 0
        async for rows in _old_rows(conn, old, columns, "seq", -(1 << 62)):
            items = []
            for seq, ts, kind, event_id, room_id, sender, etype, origin, data in rows:
                raw = bytes(data)
                if kind == "event":
                    plaintext = raw
                else:
                    try:
                        inner = json.loads(raw)
                    except ValueError:
                        raise StoreError(
                            f"schema 1 record seq {seq} ({kind}): its data is not JSON"
                        ) from None
                    plaintext = dumps(
                        {"room_id": room_id, "sender": sender, "type": etype, "data": inner}
                    )
                items.append(
                    Plain(
                        str(kind),
                        index("event_id", event_id) if isinstance(event_id, str) else None,
                        room_id,
                        sender,
                        etype,
                        origin if isinstance(origin, int) else ts,
                        plaintext,
                        ts,
                    )
                )
            first_new, _ = await self._append_records(conn, items, 0, checkpoints=False)
            assert self._tentative is not None
            self._next_seq, self._head, _cp = self._tentative
            self._tentative = None
            for offset, row in enumerate(rows):
                if row[0] != first_new + offset and row[0] in bounds:
                    remap[row[0]] = first_new + offset
            count += len(rows)
        for col in (transactions.c.first_seq, transactions.c.last_seq):
            for old_seq, new_seq in remap.items():
                await conn.execute(
                    update(transactions).where(col == old_seq).values({col.name: new_seq})
                )
        await conn.exec_driver_sql(f"DROP TABLE {quote(old)}")
        if count:
            assert self._head is not None and self._next_seq is not None
            last = self._next_seq - 1
            cp = await self._insert_checkpoint(conn, last, self._head, now_ms())
            self._tentative = (last + 1, self._head, cp)
        log.warning("encrypted and chained %d plaintext records of schema 1", count)

    async def _migrate_operational(
        self, conn: AsyncConnection, old_rooms: str | None, old_actions: str | None
    ) -> None:
        """Seal the plaintext rooms, actions and state values of schemas 1 and 2."""
        quote = conn.dialect.identifier_preparer.quote
        dk = await self._op_key_in(conn)
        if old_rooms is not None:
            columns = "room_id, joined, lacking, updated_ts"
            async for rows in _old_rows(conn, old_rooms, columns, "room_id", ""):
                await conn.execute(
                    insert(rooms),
                    [
                        self._room_values(dk, room_id, lacking or "")
                        | {"joined": bool(joined), "updated_ts": updated}
                        for room_id, joined, lacking, updated in rows
                    ],
                )
            await conn.exec_driver_sql(f"DROP TABLE {quote(old_rooms)}")
        if old_actions is not None:
            columns = (
                "id, kind, room_id, payload, status, attempts, next_at, last_error, "
                "created_ts, updated_ts"
            )
            async for rows in _old_rows(conn, old_actions, columns, "id", ""):
                out = []
                for aid, kind, room_id, payload, status, attempts, nxt, err, cts, uts in rows:
                    try:
                        body = json.loads(payload)
                    except ValueError:
                        raise StoreError(f"action {aid}: its payload is not JSON") from None
                    out.append(
                        self._action_values(dk, aid, room_id, body)
                        | {
                            "kind": kind,
                            "status": status,
                            "attempts": attempts,
                            "next_at": nxt,
                            "last_error": self._seal_error(dk, aid, err),
                            "created_ts": cts,
                            "updated_ts": uts,
                        }
                    )
                await conn.execute(insert(actions), out)
            await conn.exec_driver_sql(f"DROP TABLE {quote(old_actions)}")
        for key, value in (await conn.execute(select(state.c.key, state.c.value))).all():
            if key not in PLAIN_STATE_KEYS and not value.startswith(SEALED_PREFIX):
                await self._put_state(conn, key, value)

    async def _unlock(self, conn: AsyncConnection) -> None:
        """Check the keyring against the stored data keys; read the chain head (no scan)."""
        any_record = await self._load_head(conn)
        any_key = (await conn.execute(select(data_keys.c.key_id).limit(1))).first()
        empty = not any_record and any_key is None
        if self.keyring is None:
            if not empty:
                where = f" ({self.keyring_path} does not exist)" if self.keyring_path else ""
                raise KeyringMissingError(
                    f"no audit keyring{where}, but the database already holds encrypted "
                    f"audit records: restore the keyring from your backup (file, or the "
                    f"environment variable BRIDGE_AUDIT_KEYRING); without it the archive "
                    f"cannot be read"
                )
            self.keyring = Keyring.generate()
            if self.keyring_path is not None:
                self.keyring_path.parent.mkdir(parents=True, exist_ok=True)
                self.keyring.save(self.keyring_path)
                log.warning(
                    "GENERATED A NEW AUDIT KEYRING at %s (KEK %s). BACK IT UP NOW and keep "
                    "it apart from the database backups: without it the audit archive "
                    "cannot be decrypted, with it anyone holding the database can read it",
                    self.keyring_path,
                    self.keyring.current.id,
                )
            else:
                log.info("audit store uses an ephemeral in-memory keyring (no keyring given)")
        keyring = self.keyring
        self._idx = BlindIndexer(keyring.index_key)
        self._idx_cache.clear()
        # One data key per KEK proves the KEK's material; missing KEKs are named.
        by_kek = (
            await conn.execute(
                select(data_keys.c.kek_id, func.count(), func.min(data_keys.c.key_id)).group_by(
                    data_keys.c.kek_id
                )
            )
        ).all()
        missing = [(kek, n) for kek, n, _ in by_kek if kek not in keyring]
        if missing:
            needed = ", ".join(f"{kek!r} ({n} data keys)" for kek, n in missing)
            raise StoreError(
                f"{keyring.source} cannot unwrap the stored data keys: missing KEK {needed}; "
                f"the keyring has: {', '.join(keyring.kek_ids)}. Restore the keyring that "
                f"contains them"
            )
        for _kek, _n, key_id in by_kek:
            await self._load_keys(conn, data_keys.c.key_id.in_([key_id]))
        check = self._idx("keycheck", "bridge-audit-index-v1")
        assert check is not None
        stored = (
            await conn.execute(select(state.c.value).where(state.c.key == INDEX_CHECK_KEY))
        ).scalar()
        if stored is None:
            await self._put_state(conn, INDEX_CHECK_KEY, check.hex())
        elif stored != check.hex():
            raise StoreError(
                f"{keyring.source}: its index_key is not the one this database was written "
                f"with (blind indexes would not match); restore the original keyring"
            )
