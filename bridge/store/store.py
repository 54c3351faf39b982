"""The durable store: the encrypted audit records, the work queue, executor actions, state.

All writes that must be atomic go through one method each (``ingest_transaction``,
``complete_work``), so callers cannot split what belongs in one commit. Appends to the
record sequence are serialised by an in-process lock: one bridge process owns a store
(another process appending, e.g. ``audit export`` recording itself, makes a concurrent
append fail on the seq primary key; the store then reloads the chain head and retries once).

Records are the audit store of issue 3 (see :mod:`bridge.audit.crypto` and
:mod:`bridge.audit.chain`): each record's JSON is AES-256-GCM ciphertext under its room's
data key (wrapped by the keyring's current KEK), queryable fields are blind indexes, and
every record is hash-chained to the previous one. The chain head is kept in memory (read
from the last row at open, never recomputed); a signed checkpoint is written every
``checkpoint_every`` records and at :meth:`Store.close`, into the ``checkpoints`` table and
appended to the checkpoint log file (outside the database).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import bindparam, delete, event, func, insert, inspect, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from ..audit.chain import (
    GENESIS,
    ChainFields,
    ChainRecord,
    Checkpoint,
    record_hash,
    sign_checkpoint,
)
from ..audit.crypto import (
    GLOBAL_SCOPE,
    OPERATIONAL_SCOPE,
    BlindIndexer,
    CryptoError,
    DataKey,
    KeyUnwrapError,
    RecordDecryptError,
    WrappedKey,
    decrypt_record,
    encrypt_record,
    field_aad,
    rewrap,
    seal,
    unseal,
    unwrap_with_keyring,
    wrap,
)
from ..audit.keyring import Keyring, KeyringMissingError
from . import schema
from .schema import (
    actions,
    checkpoints,
    data_keys,
    legal_holds,
    records,
    rooms,
    state,
    transactions,
)

T = TypeVar("T")
_RECORD_COLS = (
    "seq",
    "ts",
    "kind",
    "event_id_idx",
    "room_idx",
    "sender_idx",
    "type_idx",
    "origin_ts",
    "key_id",
    "nonce",
    "ciphertext",
    "ct_digest",
    "hash",
)
_SQLITE_INSERT_RECORDS = (
    f"INSERT INTO records ({', '.join(_RECORD_COLS)}) "  # noqa: S608 - constant column names
    f"VALUES ({', '.join('?' * len(_RECORD_COLS))})"
)
_sha256 = hashlib.sha256
# Statements of the ingest path, built once (no per-call construction or cache-key work).
_SEEN_TXN = select(transactions.c.id).where(transactions.c.txn_id == bindparam("txn_id"))
_KNOWN_EVENTS = select(records.c.event_id_idx).where(
    records.c.event_id_idx.in_(bindparam("ids", expanding=True))
)
_INSERT_TXN = insert(transactions)
_INSERT_RECORDS = insert(records)
INDEX_CHECK_KEY = "audit_index_check"
EXPIRY_CURSOR_KEY = "audit_expiry_cursor"
#: ``bridge_state`` keys kept in plaintext: the store reads them before the keys are
#: unlocked, and they name no one. Every other value is sealed (``enc:`` + base64).
PLAIN_STATE_KEYS = frozenset({"schema_version", INDEX_CHECK_KEY, EXPIRY_CURSOR_KEY})
_SEALED = "enc:"
_MIGRATE_BATCH = 2000
HOLD_SCOPES = ("room", "user")
#: Kinds of non-event records; ``--type`` with one of these filters on the kind.
AUDIT_KINDS = (
    "decision",
    "gate",
    "action",
    "command",
    "config",
    "export",
    "hold",
    "retention",
    "error",
)

log = logging.getLogger(__name__)


class StoreUnavailable(Exception):
    """The database could not be reached or refused the write; the caller should retry."""


class StoreError(Exception):
    """The store is in a state the code cannot work with (e.g. a newer schema)."""


def now_ms() -> int:
    return int(time.time() * 1000)


def _json_dumps(obj: Any) -> bytes:
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (JSON allows "\ud800"): keep it escaped
        return json.dumps(obj, separators=(",", ":")).encode("ascii")


def _orjson_dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON through orjson (≈ 5x faster), the stdlib where orjson differs.

    orjson refuses lone surrogates, integers beyond 64 bits and non-string keys (the stdlib
    path then takes them as before) and writes NaN/Infinity as ``null``: any output holding
    ``null`` is redone by the stdlib, so the archive stays lossless.
    """
    try:
        out = _orjson.dumps(obj)
    except TypeError:  # orjson.JSONEncodeError
        return _json_dumps(obj)
    if b"null" in out:
        return _json_dumps(obj)
    return out


try:
    import orjson as _orjson
except ImportError:  # pragma: no cover - orjson is a dependency; keep working without it
    _dumps = _json_dumps
else:
    _dumps = _orjson_dumps


@dataclass(frozen=True, slots=True)
class IngestResult:
    """Outcome of one transaction: ``duplicate`` if its txnId was already committed."""

    duplicate: bool
    stored: int
    skipped: int


@dataclass(frozen=True, slots=True)
class StoredEvent:
    seq: int
    event: dict[str, Any]


@dataclass(frozen=True, slots=True)
class WorkItem:
    """One committed transaction waiting to be processed."""

    queue_id: int
    txn_id: str
    received_ts: int
    events: list[StoredEvent]


@dataclass(frozen=True, slots=True)
class NewAction:
    """An action for the executor. ``id`` doubles as the Matrix transaction ID."""

    kind: str
    payload: Mapping[str, Any]
    room_id: str | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    not_before: float = 0.0  # unix time; spreads bulk work (policy rollouts) over time


@dataclass(frozen=True, slots=True)
class ActionRow:
    id: str
    kind: str
    room_id: str | None
    payload: dict[str, Any]
    status: str
    attempts: int
    next_at: float
    last_error: str | None


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """A non-event record: a gate decision, an executor outcome, a command."""

    kind: str
    data: Mapping[str, Any]
    room_id: str | None = None
    sender: str | None = None
    type: str | None = None


class Holds(NamedTuple):
    """Room IDs and user IDs on legal hold."""

    rooms: frozenset[str]
    users: frozenset[str]


@dataclass(frozen=True, slots=True)
class HoldInfo:
    """One legal hold: ``scope`` room or user, ``source`` command or config."""

    scope: str
    target: str
    source: str
    set_ts: int
    by: str | None
    reason: str | None


@dataclass(frozen=True, slots=True)
class RecordMeta:
    """What a summary may show of a record: never its content."""

    seq: int
    ts: int
    kind: str
    origin_ts: int
    event_id: str | None
    room_id: str | None
    sender: str | None
    type: str | None
    readable: bool


@dataclass(frozen=True, slots=True)
class SearchGroup:
    kind: str
    room_id: str | None
    type: str | None
    count: int
    latest_ts: int
    readable: bool


@dataclass(frozen=True, slots=True)
class SearchSummary:
    total: int
    groups: list[SearchGroup]
    more_groups: bool
    latest: list[RecordMeta]


@dataclass(frozen=True, slots=True)
class ExpiryReport:
    """One archive-expiry run."""

    cutoff_ts: int
    expired: int
    skipped_on_hold: int
    rooms_shredded: int
    through_seq: int


@dataclass(frozen=True, slots=True)
class StoreStats:
    events: int
    records: int
    queue_depth: int
    queue_lag_s: float
    actions_pending: int
    actions_failed: int
    rooms_known: int


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    # FULL: a commit is on disk before we answer 200 to Synapse, even across power loss.
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


class Store:
    """Async facade over the database. Create with :meth:`open`.

    ``keyring`` unlocks the data keys; without one, a fresh in-memory keyring is generated
    for an empty database (saved to ``keyring_path`` when given, else ephemeral: tests and
    benchmarks) and a non-empty database is refused. ``signing_key`` signs checkpoints
    (ephemeral when omitted); ``checkpoint_log`` is the file checkpoints are appended to.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        keyring: Keyring | None = None,
        keyring_path: Path | None = None,
        signing_key: Ed25519PrivateKey | None = None,
        checkpoint_every: int = 1000,
        checkpoint_log: Path | None = None,
    ) -> None:
        self.engine = engine
        self.backend = "postgresql" if engine.dialect.name == "postgresql" else "sqlite"
        self._append_lock = asyncio.Lock()
        self._op_lock = asyncio.Lock()
        self._next_seq: int | None = None
        self._head: bytes | None = None
        self._last_cp_seq = 0
        self.keyring: Keyring | None = keyring
        self.keyring_path = keyring_path
        self.signing_key = signing_key or Ed25519PrivateKey.generate()
        self.checkpoint_every = max(1, checkpoint_every)
        self.checkpoint_log = checkpoint_log
        self._idx: BlindIndexer | None = None
        self._idx_cache: dict[tuple[str, str], bytes] = {}
        self._keys_by_scope: dict[bytes, DataKey] = {}
        self._keys_by_id: dict[str, DataKey] = {}
        self._uncommitted_keys: list[DataKey] = []
        self._tentative: tuple[int, bytes, Checkpoint | None] | None = None
        self._events: int | None = None  # events stored, counted once, then kept up to date
        self._tentative_events = 0
        #: Called (in the event loop, after the commit) with every new signed checkpoint.
        self.on_checkpoint: Callable[[Checkpoint], None] | None = None

    # -- lifecycle -----------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        pool_size: int = 10,
        create: bool = True,
        keyring: Keyring | None = None,
        keyring_path: Path | None = None,
        signing_key: Ed25519PrivateKey | None = None,
        checkpoint_every: int = 1000,
        checkpoint_log: Path | None = None,
        rewrap_keys: bool = False,
    ) -> Store:
        """Connect, create or migrate the schema, unlock the audit keys.

        With ``rewrap_keys``, data keys still wrapped by an older KEK of the keyring are
        re-wrapped under the current one (finishing a ``rotate-key`` done while a bridge
        with the old keyring kept creating data keys).

        Raises StoreUnavailable if unreachable, StoreError if the keyring does not fit the
        stored data keys, KeyringMissingError if the database holds records but no keyring
        was given.
        """
        parsed = make_url(url)
        kwargs: dict[str, Any] = {}
        if parsed.get_backend_name() == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                try:
                    Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    raise StoreUnavailable(
                        f"cannot create the directory for database {parsed.database}: {e}"
                    ) from e
        else:
            kwargs.update(
                pool_size=pool_size,
                pool_pre_ping=True,
                # asyncpg prepares every statement; after 5 runs PostgreSQL may switch to a
                # generic plan chosen while a table was empty (a full scan forever after)
                connect_args={"server_settings": {"plan_cache_mode": "force_custom_plan"}},
            )
        engine = create_async_engine(url, **kwargs)
        if parsed.get_backend_name() == "sqlite":
            event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        store = cls(
            engine,
            keyring=keyring,
            keyring_path=keyring_path,
            signing_key=signing_key,
            checkpoint_every=checkpoint_every,
            checkpoint_log=checkpoint_log,
        )
        try:
            await store.migrate(create=create)
            if rewrap_keys:
                await store._rewrap_stale_keys()
        except (SQLAlchemyError, OSError) as e:
            await engine.dispose()
            raise StoreUnavailable(f"cannot open database {parsed.render_as_string()}: {e}") from e
        except BaseException:
            await engine.dispose()
            raise
        return store

    async def close(self) -> None:
        """Write a final signed checkpoint of the chain head, then disconnect."""
        try:
            await self.checkpoint()
        except Exception as e:  # never block shutdown on it; the next start continues
            log.warning("could not write the shutdown checkpoint: %s", e)
        await self.engine.dispose()

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
            with contextlib.suppress(SQLAlchemyError):
                async with self.engine.connect() as conn:
                    await conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
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
        query = (
            "SELECT seq, ts, kind, event_id, room_id, sender, type, origin_ts, data "  # noqa: S608
            f"FROM {quote(old)} WHERE seq > :after ORDER BY seq LIMIT {_MIGRATE_BATCH}"
        )
        stmt = text(query)
        after = -(1 << 62)
        remap: dict[int, int] = {}
        count = 0
        while True:
            rows = (await conn.execute(stmt, {"after": after})).all()
            if not rows:
                break
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
                    plaintext = _dumps(
                        {"room_id": room_id, "sender": sender, "type": etype, "data": inner}
                    )
                items.append(
                    _Plain(
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
            after = rows[-1][0]
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
            after = ""
            while True:
                rows = (
                    await conn.execute(
                        text(
                            "SELECT room_id, joined, lacking, updated_ts "  # noqa: S608
                            f"FROM {quote(old_rooms)} WHERE room_id > :after "
                            f"ORDER BY room_id LIMIT {_MIGRATE_BATCH}"
                        ),
                        {"after": after},
                    )
                ).all()
                if not rows:
                    break
                await conn.execute(
                    insert(rooms),
                    [
                        self._room_values(dk, room_id, lacking or "")
                        | {"joined": bool(joined), "updated_ts": updated}
                        for room_id, joined, lacking, updated in rows
                    ],
                )
                after = rows[-1][0]
            await conn.exec_driver_sql(f"DROP TABLE {quote(old_rooms)}")
        if old_actions is not None:
            after = ""
            while True:
                rows = (
                    await conn.execute(
                        text(
                            "SELECT id, kind, room_id, payload, status, attempts, "  # noqa: S608
                            f"next_at, last_error, created_ts, updated_ts FROM "
                            f"{quote(old_actions)} WHERE id > :after ORDER BY id "
                            f"LIMIT {_MIGRATE_BATCH}"
                        ),
                        {"after": after},
                    )
                ).all()
                if not rows:
                    break
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
                after = rows[-1][0]
            await conn.exec_driver_sql(f"DROP TABLE {quote(old_actions)}")
        for key, value in (await conn.execute(select(state.c.key, state.c.value))).all():
            if key not in PLAIN_STATE_KEYS and not value.startswith(_SEALED):
                await self._put_state(conn, key, value)

    async def _unlock(self, conn: AsyncConnection) -> None:
        """Check the keyring against the stored data keys; read the chain head (no scan)."""
        last = (
            await conn.execute(
                select(records.c.seq, records.c.hash).order_by(records.c.seq.desc()).limit(1)
            )
        ).first()
        any_key = (await conn.execute(select(data_keys.c.key_id).limit(1))).first()
        empty = last is None and any_key is None
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
        self._next_seq = (last[0] if last else 0) + 1
        self._head = last[1] if last else GENESIS
        self._last_cp_seq = (await conn.execute(select(func.max(checkpoints.c.seq)))).scalar() or 0

    # -- keys ------------------------------------------------------------------------------

    def _bidx(self, field_name: str, value: str) -> bytes:
        key = (field_name, value)
        out = self._idx_cache.get(key)
        if out is None:
            if len(self._idx_cache) > 200_000:
                self._idx_cache.clear()
            assert self._idx is not None
            out = self._idx(field_name, value)
            assert out is not None
            self._idx_cache[key] = out
        return out

    def blind(self, field_name: str, value: str | None) -> bytes | None:
        """The blind index of ``value`` in ``field_name`` (event_id, room, sender, type)."""
        return None if value is None else self._bidx(field_name, value)

    def _unwrap(self, wk: WrappedKey) -> DataKey:
        assert self.keyring is not None
        try:
            dk = unwrap_with_keyring(self.keyring, wk)
        except KeyUnwrapError as e:
            raise StoreError(f"audit data key {wk.key_id!r}: {e}") from None
        self._keys_by_scope[dk.scope] = dk
        self._keys_by_id[dk.key_id] = dk
        return dk

    async def _load_keys(self, conn: AsyncConnection, where: Any) -> None:
        rows = await conn.execute(
            select(
                data_keys.c.key_id, data_keys.c.scope, data_keys.c.kek_id, data_keys.c.blob
            ).where(where)
        )
        for key_id, scope, kek_id, blob in rows:
            self._unwrap(WrappedKey(key_id, bytes(scope), kek_id, bytes(blob)))

    async def _keys_for_scopes(self, conn: AsyncConnection, scopes: set[bytes]) -> None:
        """Make sure every scope has a data key in the cache, creating new ones."""
        missing = [s for s in scopes if s not in self._keys_by_scope]
        if not missing:
            return
        await self._load_keys(conn, data_keys.c.scope.in_(missing))
        new = [s for s in missing if s not in self._keys_by_scope]
        if not new:
            return
        assert self.keyring is not None
        kek = self.keyring.current
        rows = []
        ts = now_ms()
        for scope in new:
            dk = DataKey.generate(scope)
            wk = wrap(kek, dk)
            rows.append(
                {
                    "key_id": wk.key_id,
                    "scope": wk.scope,
                    "kek_id": wk.kek_id,
                    "blob": wk.blob,
                    "created_ts": ts,
                }
            )
            self._keys_by_scope[scope] = dk
            self._keys_by_id[dk.key_id] = dk
            self._uncommitted_keys.append(dk)
        await conn.execute(insert(data_keys), rows)

    async def _keys_by_ids(self, conn: AsyncConnection, key_ids: Iterable[str | None]) -> None:
        missing = {k for k in key_ids if k is not None and k not in self._keys_by_id}
        if missing:
            await self._load_keys(conn, data_keys.c.key_id.in_(missing))

    # -- appends ------------------------------------------------------------------------

    def _reset(self) -> None:
        """Forget the in-memory head after a failure: it is re-read from the last row."""
        self._next_seq = None
        self._head = None
        self._tentative = None
        self._tentative_events = 0
        for dk in self._uncommitted_keys:
            self._keys_by_scope.pop(dk.scope, None)
            self._keys_by_id.pop(dk.key_id, None)
        self._uncommitted_keys.clear()

    async def _seq_start(self, conn: AsyncConnection) -> int:
        if self._next_seq is None or self._head is None:
            last = (
                await conn.execute(
                    select(records.c.seq, records.c.hash).order_by(records.c.seq.desc()).limit(1)
                )
            ).first()
            self._next_seq = (last[0] if last else 0) + 1
            self._head = bytes(last[1]) if last else GENESIS
            self._last_cp_seq = (
                await conn.execute(select(func.max(checkpoints.c.seq)))
            ).scalar() or 0
        return self._next_seq

    async def _append_records(
        self, conn: AsyncConnection, items: Sequence[_Plain], ts: int, *, checkpoints: bool = True
    ) -> tuple[int, int]:
        """Encrypt, chain and insert ``items``; returns (first_seq, last_seq).

        ``ts`` is the archive time of items without one of their own. The new head is only
        adopted after the commit (:meth:`_write`).
        """
        seq0 = await self._seq_start(conn)
        if not items:
            return seq0, seq0 - 1
        bidx = self._bidx
        scopes = [GLOBAL_SCOPE if p.room_id is None else bidx("room", p.room_id) for p in items]
        await self._keys_for_scopes(conn, set(scopes))
        keys = self._keys_by_scope
        prev = self._head
        assert prev is not None
        rows: list[tuple[Any, ...]] = []
        seq = seq0
        for p, scope in zip(items, scopes, strict=True):
            record_ts = ts if p.ts is None else p.ts
            dk = keys[scope]
            nonce, ct = encrypt_record(dk, seq, scope, p.plaintext)
            digest = _sha256(ct).digest()
            eid = p.event_id_idx
            room = scope or None
            sender = None if p.sender is None else bidx("sender", p.sender)
            etype = None if p.type is None else bidx("type", p.type)
            prev = record_hash(
                prev,
                ChainFields(
                    seq,
                    record_ts,
                    p.kind,
                    eid,
                    room,
                    sender,
                    etype,
                    dk.key_id,
                    nonce,
                    digest,
                    p.origin_ts,
                ),
            )
            rows.append(
                (
                    seq,
                    record_ts,
                    p.kind,
                    eid,
                    room,
                    sender,
                    etype,
                    p.origin_ts,
                    dk.key_id,
                    nonce,
                    ct,
                    digest,
                    prev,
                )
            )
            seq += 1
        if self.backend == "sqlite":
            # executemany straight to the driver: skips per-value bind processing
            await conn.exec_driver_sql(_SQLITE_INSERT_RECORDS, rows)
        else:
            await conn.execute(
                _INSERT_RECORDS, [dict(zip(_RECORD_COLS, r, strict=True)) for r in rows]
            )
        last = seq - 1
        self._tentative_events += sum(1 for p in items if p.kind == "event")
        cp = None
        if checkpoints and last - self._last_cp_seq >= self.checkpoint_every:
            cp = await self._insert_checkpoint(conn, last, prev, ts)
        self._tentative = (last + 1, prev, cp)
        return seq0, last

    async def _insert_checkpoint(
        self, conn: AsyncConnection, seq: int, head: bytes, ts: int
    ) -> Checkpoint:
        cp = sign_checkpoint(self.signing_key, seq, head, ts, seq)
        await conn.execute(
            insert(checkpoints).values(
                seq=cp.seq,
                head_hash=cp.head_hash,
                ts=cp.ts,
                record_count=cp.record_count,
                key_id=cp.key_id,
                signature=cp.signature,
            )
        )
        return cp

    def _committed(self) -> None:
        self._uncommitted_keys.clear()
        if self._events is not None:
            self._events += self._tentative_events
        self._tentative_events = 0
        if self._tentative is None:
            return
        next_seq, head, cp = self._tentative
        self._tentative = None
        self._next_seq, self._head = next_seq, head
        if cp is not None:
            self._last_cp_seq = cp.seq
            self._publish_checkpoint(cp)

    def _publish_checkpoint(self, cp: Checkpoint) -> None:
        """Log the checkpoint and append it to the checkpoint log file (outside the DB)."""
        line = json.dumps(cp.to_dict(), separators=(",", ":"))
        log.info(
            "audit checkpoint: seq %d head %s signed by %s", cp.seq, cp.head_hash.hex(), cp.key_id
        )
        if self.on_checkpoint is not None:
            try:
                self.on_checkpoint(cp)
            except Exception:
                log.exception("checkpoint callback failed")
        if self.checkpoint_log is None:
            return
        try:
            fd = os.open(self.checkpoint_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line.encode() + b"\n")
            finally:
                os.close(fd)
        except OSError as e:
            log.error("cannot append to the checkpoint log %s: %s", self.checkpoint_log, e)

    async def _write(self, fn: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """Run ``fn`` in one transaction under the append lock; adopt the head on commit.

        A seq conflict (another process appended) reloads the head and retries once.
        """
        async with self._append_lock:
            for attempt in (0, 1):
                try:
                    async with self.engine.begin() as conn:
                        result = await fn(conn)
                except IntegrityError:
                    self._reset()
                    if attempt:
                        raise
                    continue
                except BaseException:
                    self._reset()
                    raise
                self._committed()
                return result
        raise AssertionError("unreachable")

    async def checkpoint(self) -> Checkpoint | None:
        """Sign the current head now (if not yet signed); done at close."""

        async def run(conn: AsyncConnection) -> Checkpoint | None:
            seq = await self._seq_start(conn) - 1
            if seq < 1 or seq <= self._last_cp_seq:
                return None
            assert self._head is not None
            exists = (
                await conn.execute(select(checkpoints.c.seq).where(checkpoints.c.seq == seq))
            ).first()
            if exists:
                return None
            cp = await self._insert_checkpoint(conn, seq, self._head, now_ms())
            self._tentative = (seq + 1, self._head, cp)
            return cp

        return await self._write(run)

    def _audit_items(self, entries: Iterable[AuditEntry], ts: int) -> list[_Plain]:
        return [
            _Plain(
                e.kind,
                None,
                e.room_id,
                e.sender,
                e.type,
                ts,
                _dumps(
                    {"room_id": e.room_id, "sender": e.sender, "type": e.type, "data": dict(e.data)}
                ),
            )
            for e in entries
        ]

    async def ingest_transaction(
        self, txn_id: str, events: Sequence[Mapping[str, Any]]
    ) -> IngestResult:
        """Store a transaction's events and its work-queue entry in ONE commit.

        Returns once the commit is durable. A txnId seen before stores nothing; an event_id
        seen before (in an earlier transaction or twice in this one) is skipped.
        """
        try:
            return await self._write(lambda conn: self._ingest(conn, txn_id, events))
        except SQLAlchemyError as e:
            raise StoreUnavailable(str(e.__class__.__name__)) from e
        except OSError as e:
            raise StoreUnavailable(str(e)) from e

    async def _ingest(
        self, conn: AsyncConnection, txn_id: str, events: Sequence[Mapping[str, Any]]
    ) -> IngestResult:
        ts = now_ms()
        seen = (await conn.execute(_SEEN_TXN, {"txn_id": txn_id})).first()
        ids = [e.get("event_id") for e in events]
        index = self._idx
        assert index is not None
        eidx = [index("event_id", i) if isinstance(i, str) else None for i in ids]
        wanted = {i for i in eidx if i is not None}
        known: set[bytes] = set()
        if wanted:
            result = await conn.execute(_KNOWN_EVENTS, {"ids": list(wanted)})
            known = {bytes(r[0]) for r in result}
        if seen is not None:
            # A retry of a committed transaction: nothing new in it. But Synapse on SQLite
            # restarts its txnIds at 1 after a restart (they come from max(txn_id) of its
            # table of unsent transactions), so a known txnId may carry new events: those
            # are stored, under a queue key of their own.
            if wanted <= known:
                return IngestResult(duplicate=True, stored=0, skipped=len(events))
            log.warning(
                "transaction id %s reused with new events (homeserver restarted?); storing them",
                txn_id,
            )
            txn_id = f"{txn_id[:200]}~{uuid.uuid4().hex}"
        items = []
        for ev, key in zip(events, eidx, strict=True):
            if key is not None:
                if key in known:
                    continue
                known.add(key)
            origin = ev.get("origin_server_ts")
            items.append(
                _Plain(
                    "event",
                    key,
                    _str_or_none(ev.get("room_id")),
                    _str_or_none(ev.get("sender")),
                    _str_or_none(ev.get("type")),
                    origin if type(origin) is int and 0 <= origin < 1 << 62 else ts,
                    _dumps(ev),
                )
            )
        first, last = await self._append_records(conn, items, ts)
        await conn.execute(
            _INSERT_TXN,
            {
                "txn_id": txn_id,
                "received_ts": ts,
                "first_seq": first if items else None,
                "last_seq": last if items else None,
                "event_count": len(items),
                "processed": not items,
            },
        )
        return IngestResult(duplicate=False, stored=len(items), skipped=len(events) - len(items))

    async def append(self, entries: Sequence[AuditEntry]) -> None:
        """Append audit records (gate decisions, outcomes, commands) in one commit."""
        if not entries:
            return

        async def run(conn: AsyncConnection) -> None:
            ts = now_ms()
            await self._append_records(conn, self._audit_items(entries, ts), ts)

        try:
            await self._write(run)
        except (SQLAlchemyError, OSError) as e:
            raise StoreUnavailable(str(e.__class__.__name__)) from e

    # -- work queue ---------------------------------------------------------------------

    async def pending_work(self, limit: int = 10) -> list[WorkItem]:
        """The oldest unprocessed transactions with their stored events (decrypted), in order."""
        async with self.engine.connect() as conn:
            txns = (
                await conn.execute(
                    select(
                        transactions.c.id,
                        transactions.c.txn_id,
                        transactions.c.received_ts,
                        transactions.c.first_seq,
                        transactions.c.last_seq,
                    )
                    .where(transactions.c.processed.is_(False))
                    .order_by(transactions.c.id)
                    .limit(limit)
                )
            ).all()
            items = []
            for qid, txn_id, received, first, last in txns:
                rows = (
                    await conn.execute(
                        select(
                            records.c.seq,
                            records.c.room_idx,
                            records.c.key_id,
                            records.c.nonce,
                            records.c.ciphertext,
                        )
                        .where(records.c.seq.between(first, last), records.c.kind == "event")
                        .order_by(records.c.seq)
                    )
                ).all()
                await self._keys_by_ids(conn, {r[2] for r in rows})
                evs = []
                for seq, room, key_id, nonce, ct in rows:
                    pt = self._decrypt(seq, room, key_id, nonce, ct)
                    if pt is None:
                        raise StoreError(f"audit record seq {seq}: its ciphertext is gone")
                    evs.append(StoredEvent(seq, json.loads(pt)))
                items.append(WorkItem(qid, txn_id, received, evs))
            return items

    def _decrypt(
        self, seq: int, room: bytes | None, key_id: str | None, nonce: bytes, ct: bytes | None
    ) -> bytes | None:
        """Plaintext of a record; None if its ciphertext expired or its room key was shredded.

        Raises StoreError naming the record if it fails to authenticate.
        """
        if ct is None or key_id is None:
            return None
        dk = self._keys_by_id.get(key_id)
        if dk is None:
            return None
        try:
            return decrypt_record(
                dk, seq, bytes(room) if room is not None else GLOBAL_SCOPE, bytes(nonce), bytes(ct)
            )
        except RecordDecryptError as e:
            raise StoreError(str(e)) from None

    async def complete_work(
        self,
        queue_ids: Sequence[int],
        new_actions: Sequence[NewAction] = (),
        audit: Sequence[AuditEntry] = (),
        state_updates: Mapping[str, str] | None = None,
    ) -> None:
        """Mark transactions processed together with everything processing produced."""
        if new_actions or any(k not in PLAIN_STATE_KEYS for k in state_updates or {}):
            await self._op_key()

        async def run(conn: AsyncConnection) -> None:
            if queue_ids:
                await conn.execute(
                    update(transactions)
                    .where(transactions.c.id.in_(list(queue_ids)))
                    .values(processed=True)
                )
            await self._insert_actions(conn, new_actions)
            if audit:
                ts = now_ms()
                await self._append_records(conn, self._audit_items(audit, ts), ts)
            for key, value in (state_updates or {}).items():
                await self._put_state(conn, key, value)

        try:
            await self._write(run)
        except (SQLAlchemyError, OSError) as e:
            raise StoreUnavailable(str(e.__class__.__name__)) from e

    # -- operational data (rooms, actions, state): sealed under the operational key -------

    async def _op_key_in(self, conn: AsyncConnection) -> DataKey:
        """The operational data key, loaded or created inside ``conn``'s transaction.

        The caller must drop the store (or call :meth:`_reset`) if that transaction fails.
        """
        dk = self._keys_by_scope.get(OPERATIONAL_SCOPE)
        if dk is None:
            await self._load_keys(conn, data_keys.c.scope == OPERATIONAL_SCOPE)
            dk = self._keys_by_scope.get(OPERATIONAL_SCOPE)
        if dk is None:
            assert self.keyring is not None
            dk = DataKey.generate(OPERATIONAL_SCOPE)
            wk = wrap(self.keyring.current, dk)
            await conn.execute(
                insert(data_keys).values(
                    key_id=wk.key_id,
                    scope=wk.scope,
                    kek_id=wk.kek_id,
                    blob=wk.blob,
                    created_ts=now_ms(),
                )
            )
            self._keys_by_scope[OPERATIONAL_SCOPE] = dk
            self._keys_by_id[dk.key_id] = dk
        return dk

    async def _op_key(self, *, create: bool = True) -> DataKey | None:
        """The operational data key; created (own commit) on first need unless ``create``
        is False (readers: None means nothing sealed can exist yet).

        Call it BEFORE opening a write transaction: on SQLite a second writer would wait.
        """
        dk = self._keys_by_scope.get(OPERATIONAL_SCOPE)
        if dk is not None:
            return dk
        async with self._op_lock:
            dk = self._keys_by_scope.get(OPERATIONAL_SCOPE)
            if dk is not None:
                return dk
            async with self.engine.connect() as conn:
                await self._load_keys(conn, data_keys.c.scope == OPERATIONAL_SCOPE)
            dk = self._keys_by_scope.get(OPERATIONAL_SCOPE)
            if dk is not None or not create:
                return dk
            try:
                async with self.engine.begin() as conn:
                    dk = await self._op_key_in(conn)
            except IntegrityError:  # another process created it first
                self._keys_by_scope.pop(OPERATIONAL_SCOPE, None)
                async with self.engine.connect() as conn:
                    await self._load_keys(conn, data_keys.c.scope == OPERATIONAL_SCOPE)
                dk = self._keys_by_scope.get(OPERATIONAL_SCOPE)
                if dk is None:
                    raise StoreError("the operational data key could not be created") from None
            except BaseException:
                popped = self._keys_by_scope.pop(OPERATIONAL_SCOPE, None)
                if popped is not None:
                    self._keys_by_id.pop(popped.key_id, None)
                raise
            return dk

    async def _op_key_needed(self, what: str) -> DataKey:
        """The operational key for reading sealed data that exists (``what`` names it)."""
        dk = await self._op_key(create=False)
        if dk is None:
            raise StoreError(
                f"{what} is sealed but the operational data key is missing from data_keys "
                f"(the table was altered)"
            )
        return dk

    def _op_seal(self, dk: DataKey, table: str, key: str | bytes, column: str, pt: bytes) -> bytes:
        return seal(dk, field_aad(table, key, column), pt)

    def _op_open(
        self, dk: DataKey, table: str, key: str | bytes, column: str, blob: bytes, what: str
    ) -> bytes:
        try:
            return unseal(dk, field_aad(table, key, column), bytes(blob))
        except CryptoError as e:
            raise StoreError(f"{what} ({table}.{column}): {e}") from None

    def _seal_state(self, dk: DataKey | None, key: str, value: str) -> str:
        if key in PLAIN_STATE_KEYS:
            return value
        if dk is None:
            dk = self._keys_by_scope.get(OPERATIONAL_SCOPE)
        if dk is None:
            raise StoreError(f"cannot seal bridge_state {key!r}: no operational key loaded")
        blob = self._op_seal(
            dk, "bridge_state", key, "value", value.encode("utf-8", "surrogatepass")
        )
        return _SEALED + base64.b64encode(blob).decode("ascii")

    def _open_state(self, dk: DataKey | None, key: str, stored: str) -> str:
        if key in PLAIN_STATE_KEYS:
            return stored
        if not stored.startswith(_SEALED):
            raise StoreError(f"bridge_state {key!r} holds a plaintext value (not sealed)")
        if dk is None:
            raise StoreError(f"bridge_state {key!r} is sealed but the operational key is missing")
        try:
            blob = base64.b64decode(stored[len(_SEALED) :], validate=True)
        except ValueError:
            raise StoreError(f"bridge_state {key!r}: not valid base64") from None
        pt = self._op_open(dk, "bridge_state", key, "value", blob, f"state {key!r}")
        return pt.decode("utf-8", "surrogatepass")

    def _room_values(self, dk: DataKey, room_id: str, lacking: str) -> dict[str, Any]:
        idx = self._bidx("room", room_id)
        data = _dumps({"room_id": room_id, "lacking": lacking})
        return {"room_idx": idx, "data": self._op_seal(dk, "rooms", idx, "data", data)}

    def _action_values(
        self, dk: DataKey, action_id: str, room_id: str | None, payload: Any
    ) -> dict[str, Any]:
        data = _dumps({"room_id": room_id, "payload": payload})
        return {
            "id": action_id,
            "room_idx": None if room_id is None else self._bidx("room", room_id),
            "data": self._op_seal(dk, "actions", action_id, "data", data),
        }

    def _seal_error(self, dk: DataKey, action_id: str, error: str | None) -> bytes | None:
        if error is None:
            return None
        pt = error.encode("utf-8", "surrogatepass")
        return self._op_seal(dk, "actions", action_id, "last_error", pt)

    def _action_row(self, dk: DataKey, row: Any) -> ActionRow:
        aid = row["id"]
        what = f"action {aid}"
        obj = json.loads(self._op_open(dk, "actions", aid, "data", row["data"], what))
        err = row["last_error"]
        return ActionRow(
            id=aid,
            kind=row["kind"],
            room_id=obj.get("room_id"),
            payload=obj.get("payload") or {},
            status=row["status"],
            attempts=row["attempts"],
            next_at=row["next_at"],
            last_error=None
            if err is None
            else self._op_open(dk, "actions", aid, "last_error", err, what).decode(
                "utf-8", "surrogatepass"
            ),
        )

    async def _action_rows(self, rows: Sequence[Any]) -> list[ActionRow]:
        if not rows:
            return []
        dk = await self._op_key_needed("an executor action")
        return [self._action_row(dk, r) for r in rows]

    # -- executor actions ---------------------------------------------------------------

    async def _insert_actions(
        self, conn: AsyncConnection, new_actions: Sequence[NewAction]
    ) -> None:
        """Insert sealed actions; the operational key must be loaded (:meth:`_op_key`)."""
        if not new_actions:
            return
        dk = self._keys_by_scope[OPERATIONAL_SCOPE]
        ts = now_ms()
        await conn.execute(
            insert(actions),
            [
                self._action_values(dk, a.id, a.room_id, dict(a.payload))
                | {
                    "kind": a.kind,
                    "status": "pending",
                    "attempts": 0,
                    "next_at": a.not_before,
                    "last_error": None,
                    "created_ts": ts,
                    "updated_ts": ts,
                }
                for a in new_actions
            ],
        )

    async def enqueue_actions(self, new_actions: Sequence[NewAction]) -> None:
        if not new_actions:
            return
        await self._op_key()
        async with self.engine.begin() as conn:
            await self._insert_actions(conn, new_actions)

    async def due_actions(self, now: float, limit: int = 50) -> list[ActionRow]:
        async with self.engine.connect() as conn:
            result = await conn.execute(
                select(actions)
                .where(actions.c.status == "pending", actions.c.next_at <= now)
                .order_by(actions.c.next_at, actions.c.created_ts)
                .limit(limit)
            )
            rows = result.mappings().all()
        return await self._action_rows(rows)

    async def next_action_time(self) -> float | None:
        async with self.engine.connect() as conn:
            return (
                await conn.execute(
                    select(func.min(actions.c.next_at)).where(actions.c.status == "pending")
                )
            ).scalar()

    async def get_action(self, action_id: str) -> ActionRow | None:
        async with self.engine.connect() as conn:
            row = (
                (await conn.execute(select(actions).where(actions.c.id == action_id)))
                .mappings()
                .first()
            )
        if row is None:
            return None
        return (await self._action_rows([row]))[0]

    async def count_actions(
        self, kind: str, status: str, payload_match: Mapping[str, Any] | None = None
    ) -> int:
        """How many actions of ``kind`` have ``status`` (and a payload with these items).

        Payloads are sealed, so matching on them decrypts each candidate (used at start,
        e.g. for a rollout's remaining actions).
        """
        query = select(actions.c.id, actions.c.data).where(
            actions.c.status == status, actions.c.kind == kind
        )
        if not payload_match:
            async with self.engine.connect() as conn:
                return int(
                    (
                        await conn.execute(select(func.count()).select_from(query.subquery()))
                    ).scalar_one()
                )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        if not rows:
            return 0
        dk = await self._op_key_needed("an executor action")
        n = 0
        for aid, data in rows:
            obj = json.loads(self._op_open(dk, "actions", aid, "data", data, f"action {aid}"))
            payload = obj.get("payload") or {}
            if all(payload.get(k) == v for k, v in payload_match.items()):
                n += 1
        return n

    async def finish_action(
        self,
        action_id: str,
        *,
        status: str,
        attempts: int,
        next_at: float = 0.0,
        error: str | None = None,
        audit: AuditEntry | None = None,
    ) -> None:
        """Record an attempt's outcome (and its audit record) in one commit."""
        dk = await self._op_key() if error is not None else None

        async def run(conn: AsyncConnection) -> None:
            await conn.execute(
                update(actions)
                .where(actions.c.id == action_id)
                .values(
                    status=status,
                    attempts=attempts,
                    next_at=next_at,
                    last_error=None if dk is None else self._seal_error(dk, action_id, error),
                    updated_ts=now_ms(),
                )
            )
            if audit is not None:
                ts = now_ms()
                await self._append_records(conn, self._audit_items([audit], ts), ts)

        await self._write(run)

    async def actions_by_status(self, status: str, limit: int = 100) -> list[ActionRow]:
        async with self.engine.connect() as conn:
            result = await conn.execute(
                select(actions)
                .where(actions.c.status == status)
                .order_by(actions.c.updated_ts.desc())
                .limit(limit)
            )
            rows = result.mappings().all()
        return await self._action_rows(rows)

    # -- state and rooms ----------------------------------------------------------------

    async def _put_state(self, conn: AsyncConnection, key: str, value: str) -> None:
        """Write a state value (sealed unless plain; the operational key must be loaded)."""
        stored = self._seal_state(None, key, value)
        updated = await conn.execute(update(state).where(state.c.key == key).values(value=stored))
        if updated.rowcount == 0:
            await conn.execute(insert(state).values(key=key, value=stored))

    async def get_state(self, key: str) -> str | None:
        async with self.engine.connect() as conn:
            stored = (await conn.execute(select(state.c.value).where(state.c.key == key))).scalar()
        if stored is None:
            return None
        dk = None if key in PLAIN_STATE_KEYS else await self._op_key(create=False)
        return self._open_state(dk, key, stored)

    async def get_states(self, keys: Sequence[str]) -> dict[str, str]:
        """Several state values at once (missing keys left out)."""
        if not keys:
            return {}
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(state.c.key, state.c.value).where(state.c.key.in_(list(keys)))
                )
            ).all()
        if not rows:
            return {}
        dk = await self._op_key(create=False)
        return {k: self._open_state(dk, k, v) for k, v in rows}

    async def set_state(self, key: str, value: str) -> None:
        if key not in PLAIN_STATE_KEYS:
            await self._op_key()
        async with self.engine.begin() as conn:
            await self._put_state(conn, key, value)

    async def upsert_room(
        self, room_id: str, *, joined: bool | None = None, lacking: str | None = None
    ) -> None:
        dk = await self._op_key()
        assert dk is not None
        idx = self._bidx("room", room_id)
        values: dict[str, Any] = {"updated_ts": now_ms()}
        if joined is not None:
            values["joined"] = joined
        if lacking is not None:
            values["data"] = self._room_values(dk, room_id, lacking)["data"]
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(rooms).where(rooms.c.room_idx == idx).values(**values)
            )
            if result.rowcount == 0:
                values.setdefault("joined", False)
                values.setdefault("data", self._room_values(dk, room_id, "")["data"])
                await conn.execute(insert(rooms).values(room_idx=idx, **values))

    async def upsert_rooms(self, room_ids: Iterable[str], *, joined: bool) -> None:
        """Mark many rooms joined (or not) in one commit; new ones lack nothing."""
        dk = await self._op_key()
        assert dk is not None
        by_idx = {self._bidx("room", r): r for r in room_ids}
        ts = now_ms()
        async with self.engine.begin() as conn:
            have: set[bytes] = set()
            idxs = list(by_idx)
            for i in range(0, len(idxs), 500):
                chunk = idxs[i : i + 500]
                have.update(
                    bytes(r[0])
                    for r in await conn.execute(
                        select(rooms.c.room_idx).where(rooms.c.room_idx.in_(chunk))
                    )
                )
                await conn.execute(
                    update(rooms)
                    .where(rooms.c.room_idx.in_(chunk))
                    .values(joined=joined, updated_ts=ts)
                )
            new = [
                self._room_values(dk, room, "") | {"joined": joined, "updated_ts": ts}
                for idx, room in by_idx.items()
                if idx not in have
            ]
            if new:
                await conn.execute(insert(rooms), new)

    def _room_row(self, dk: DataKey, row: Any) -> dict[str, Any]:
        idx = bytes(row["room_idx"])
        obj = json.loads(self._op_open(dk, "rooms", idx, "data", row["data"], "a known room"))
        return {
            "room_id": obj["room_id"],
            "joined": bool(row["joined"]),
            "lacking": obj.get("lacking") or "",
            "updated_ts": row["updated_ts"],
        }

    async def list_rooms(self) -> list[dict[str, Any]]:
        """Every known room (room_id, joined, lacking, updated_ts), by room ID."""
        async with self.engine.connect() as conn:
            rows = (await conn.execute(select(rooms))).mappings().all()
        if not rows:
            return []
        dk = await self._op_key_needed("a known room")
        return sorted((self._room_row(dk, r) for r in rows), key=lambda r: r["room_id"])

    def room_order_key(self, room_id: str) -> bytes:
        """Where ``room_id`` sorts in :meth:`joined_rooms_page` ("" sorts first)."""
        return b"" if not room_id else self._bidx("room", room_id)

    async def joined_rooms_page(self, after: str, limit: int) -> list[tuple[str, str]]:
        """Joined rooms after ``after`` in :meth:`room_order_key` order (blind-index order,
        not ID order: the IDs are sealed): ``(room_id, lacking)``."""
        query = select(rooms.c.room_idx, rooms.c.joined, rooms.c.data, rooms.c.updated_ts).where(
            rooms.c.joined.is_(True)
        )
        if after:
            query = query.where(rooms.c.room_idx > self.room_order_key(after))
        query = query.order_by(rooms.c.room_idx).limit(limit)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).mappings().all()
        if not rows:
            return []
        dk = await self._op_key_needed("a known room")
        out = []
        for r in rows:
            room = self._room_row(dk, r)
            out.append((room["room_id"], room["lacking"]))
        return out

    # -- reads --------------------------------------------------------------------------

    async def stats(self) -> StoreStats:
        """Counters for status and metrics; cheap: index lookups, no scan of the records.

        The number of events is counted once (on first use) and then kept up to date in
        memory by the appends of this process.
        """
        async with self.engine.connect() as conn:
            if self._events is None:
                self._events = (
                    await conn.execute(select(func.count()).where(records.c.kind == "event"))
                ).scalar_one()
            events = self._events
            total = (await conn.execute(select(func.max(records.c.seq)))).scalar() or 0
            depth, oldest = (
                await conn.execute(
                    select(func.count(), func.min(transactions.c.received_ts)).where(
                        transactions.c.processed.is_(False)
                    )
                )
            ).one()
            by_status: dict[str, int] = dict(
                (
                    await conn.execute(
                        select(actions.c.status, func.count())
                        .where(actions.c.status.in_(("pending", "failed")))
                        .group_by(actions.c.status)
                    )
                ).all()
            )
            known = (await conn.execute(select(func.count()).select_from(rooms))).scalar_one()
        lag = max(0.0, (now_ms() - oldest) / 1000) if oldest else 0.0
        return StoreStats(
            events=events,
            records=total,
            queue_depth=depth,
            queue_lag_s=lag,
            actions_pending=by_status.get("pending", 0),
            actions_failed=by_status.get("failed", 0),
            rooms_known=known,
        )

    async def iter_record_batches(
        self,
        *,
        kind: str | None = None,
        batch: int = 2000,
        room: str | None = None,
        sender: str | None = None,
        type: str | None = None,
        since: int | None = None,
        until: int | None = None,
        after: int = 0,
        raw_json: bool = False,
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """Stream records in sequence order, decrypted, in constant memory, by batches.

        Filters: room, sender and type by blind-index equality; ``since``/``until`` (ms,
        inclusive/exclusive) on the event's origin_server_ts; ``after`` a seq. Each dict has
        seq, ts, kind, event_id, room_id, sender, type, origin_ts and data (the event, or the
        audit entry's data); ``data`` is None when the ciphertext expired or the room key was
        destroyed (``unreadable`` says which). With ``raw_json`` an event's dict also holds
        ``json``: its stored JSON text, exactly as archived (exports copy it instead of
        serialising ``data`` again). A record that fails to authenticate raises StoreError.
        """
        conds = self._record_conds(kind, room, sender, type, since, until)
        cols = (
            records.c.seq,
            records.c.ts,
            records.c.kind,
            records.c.origin_ts,
            records.c.room_idx,
            records.c.key_id,
            records.c.nonce,
            records.c.ciphertext,
        )
        loads = json.loads
        decrypt = self._decrypt
        query = select(*cols).where(*conds).order_by(records.c.seq).limit(batch)

        async def fetch(last: int) -> Sequence[Any]:
            async with self.engine.connect() as conn:
                rows = (await conn.execute(query.where(records.c.seq > last))).all()
                await self._keys_by_ids(conn, {r[5] for r in rows})
            return rows

        async for rows in _prefetched(fetch, after):
            out: list[dict[str, Any]] = []
            append = out.append
            for seq, ts, rkind, origin, room_idx, key_id, nonce, ct in rows:
                pt = decrypt(seq, room_idx, key_id, nonce, ct)
                if pt is None:
                    append(
                        {
                            "seq": seq,
                            "ts": ts,
                            "kind": rkind,
                            "event_id": None,
                            "room_id": None,
                            "sender": None,
                            "type": None,
                            "origin_ts": origin,
                            "data": None,
                            "unreadable": (
                                "ciphertext expired (archive retention)"
                                if ct is None
                                else f"data key {key_id} destroyed"
                            ),
                        }
                    )
                    continue
                try:
                    text = pt.decode("utf-8")
                    obj = loads(text)
                except ValueError:
                    raise StoreError(f"audit record seq {seq}: plaintext is not JSON") from None
                if not isinstance(obj, dict):
                    raise StoreError(f"audit record seq {seq}: plaintext is not a JSON object")
                get = obj.get
                if rkind == "event":
                    rec = {
                        "seq": seq,
                        "ts": ts,
                        "kind": rkind,
                        "event_id": _str_or_none(get("event_id")),
                        "room_id": _str_or_none(get("room_id")),
                        "sender": _str_or_none(get("sender")),
                        "type": _str_or_none(get("type")),
                        "origin_ts": origin,
                        "data": obj,
                    }
                    if raw_json:
                        rec["json"] = text
                    append(rec)
                else:
                    append(
                        {
                            "seq": seq,
                            "ts": ts,
                            "kind": rkind,
                            "event_id": None,
                            "room_id": get("room_id"),
                            "sender": get("sender"),
                            "type": get("type"),
                            "origin_ts": origin,
                            "data": get("data"),
                        }
                    )
            yield out

    async def iter_records(
        self,
        *,
        kind: str | None = None,
        batch: int = 2000,
        room: str | None = None,
        sender: str | None = None,
        type: str | None = None,
        since: int | None = None,
        until: int | None = None,
        after: int = 0,
        raw_json: bool = False,
    ) -> AsyncIterator[dict[str, Any]]:
        """Stream records in sequence order, decrypted (see :meth:`iter_record_batches`)."""
        async for recs in self.iter_record_batches(
            kind=kind,
            batch=batch,
            room=room,
            sender=sender,
            type=type,
            since=since,
            until=until,
            after=after,
            raw_json=raw_json,
        ):
            for rec in recs:
                yield rec

    def _record_conds(
        self,
        kind: str | None,
        room: str | None,
        sender: str | None,
        type: str | None,
        since: int | None,
        until: int | None,
    ) -> list[Any]:
        conds: list[Any] = []
        if kind is not None:
            conds.append(records.c.kind == kind)
        if room is not None:
            conds.append(records.c.room_idx == self._bidx("room", room))
        if sender is not None:
            conds.append(records.c.sender_idx == self._bidx("sender", sender))
        if type is not None:
            conds.append(records.c.type_idx == self._bidx("type", type))
        if since is not None:
            conds.append(records.c.origin_ts >= since)
        if until is not None:
            conds.append(records.c.origin_ts < until)
        return conds

    async def _describe(self, conn: AsyncConnection, seqs: Iterable[int]) -> dict[int, RecordMeta]:
        """Metadata (never content) of the records ``seqs``, decrypted where readable."""
        rows = (
            await conn.execute(
                select(
                    records.c.seq,
                    records.c.ts,
                    records.c.kind,
                    records.c.origin_ts,
                    records.c.room_idx,
                    records.c.key_id,
                    records.c.nonce,
                    records.c.ciphertext,
                ).where(records.c.seq.in_(list(seqs)))
            )
        ).all()
        await self._keys_by_ids(conn, {r[5] for r in rows})
        out = {}
        for seq, ts, rkind, origin, room_idx, key_id, nonce, ct in rows:
            pt = self._decrypt(seq, room_idx, key_id, nonce, ct)
            obj: Any = {}
            if pt is not None:
                try:
                    obj = json.loads(pt)
                except ValueError:
                    raise StoreError(f"audit record seq {seq}: plaintext is not JSON") from None
            if not isinstance(obj, dict):
                obj = {}
            out[seq] = RecordMeta(
                seq,
                ts,
                rkind,
                origin,
                _str_or_none(obj.get("event_id")) if rkind == "event" else None,
                _str_or_none(obj.get("room_id")),
                _str_or_none(obj.get("sender")),
                _str_or_none(obj.get("type")),
                pt is not None,
            )
        return out

    async def search_summary(
        self,
        *,
        kind: str | None = None,
        room: str | None = None,
        sender: str | None = None,
        type: str | None = None,
        since: int | None = None,
        until: int | None = None,
        groups: int = 15,
        latest: int = 5,
    ) -> SearchSummary:
        """How many records match, per (kind, room, type), and the latest few, no content.

        Counting runs in the database over the blind indexes; only one record per group
        and the ``latest`` ones are decrypted, for their room ID, type and event ID.
        """
        conds = self._record_conds(kind, room, sender, type, since, until)
        async with self.engine.connect() as conn:
            total = (
                await conn.execute(select(func.count()).select_from(records).where(*conds))
            ).scalar_one()
            count = func.count().label("n")
            grouped = (
                await conn.execute(
                    select(
                        records.c.kind,
                        records.c.room_idx,
                        records.c.type_idx,
                        count,
                        func.max(records.c.seq),
                    )
                    .where(*conds)
                    .group_by(records.c.kind, records.c.room_idx, records.c.type_idx)
                    .order_by(count.desc(), func.max(records.c.seq).desc())
                    .limit(groups + 1)
                )
            ).all()
            last = (
                await conn.execute(
                    select(records.c.seq).where(*conds).order_by(records.c.seq.desc()).limit(latest)
                )
            ).all()
            metas = await self._describe(
                conn, {g[4] for g in grouped[:groups]} | {r[0] for r in last}
            )
        out_groups = [
            SearchGroup(
                metas[g[4]].kind,
                metas[g[4]].room_id,
                metas[g[4]].type,
                g[3],
                metas[g[4]].origin_ts,
                metas[g[4]].readable,
            )
            for g in grouped[:groups]
        ]
        return SearchSummary(total, out_groups, len(grouped) > groups, [metas[r[0]] for r in last])

    async def count_events(self, event_id: str) -> int:
        async with self.engine.connect() as conn:
            return (
                await conn.execute(
                    select(func.count()).where(
                        records.c.event_id_idx == self._bidx("event_id", event_id)
                    )
                )
            ).scalar_one()

    # -- audit maintenance --------------------------------------------------------------

    async def rewrap_data_keys(self, batch: int = 500) -> int:
        """Re-wrap every data key under the keyring's current KEK; returns how many changed.

        Records are not touched. Run after ``keyring.add_kek()``; afterwards the old KEK
        can be removed from the keyring.
        """
        assert self.keyring is not None
        keyring = self.keyring
        changed = 0
        last = ""
        while True:
            async with self._append_lock, self.engine.begin() as conn:
                rows = (
                    await conn.execute(
                        select(
                            data_keys.c.key_id,
                            data_keys.c.scope,
                            data_keys.c.kek_id,
                            data_keys.c.blob,
                        )
                        .where(data_keys.c.key_id > last)
                        .order_by(data_keys.c.key_id)
                        .limit(batch)
                    )
                ).all()
                for key_id, scope, kek_id, blob in rows:
                    wk = WrappedKey(key_id, bytes(scope), kek_id, bytes(blob))
                    try:
                        new = rewrap(keyring, wk)
                    except KeyUnwrapError as e:
                        raise StoreError(f"audit data key {key_id!r}: {e}") from None
                    if new is not wk:
                        await conn.execute(
                            update(data_keys)
                            .where(data_keys.c.key_id == key_id)
                            .values(kek_id=new.kek_id, blob=new.blob)
                        )
                        changed += 1
            if not rows:
                return changed
            last = rows[-1][0]

    async def _rewrap_stale_keys(self) -> None:
        assert self.keyring is not None
        current = self.keyring.current.id
        stale = {k: n for k, n in (await self.kek_usage()).items() if k != current}
        if not stale:
            return
        changed = await self.rewrap_data_keys()
        log.warning(
            "re-wrapped %d audit data keys under the current KEK %s (they used %s); once "
            "the keyring file is backed up, the old KEKs can be removed with "
            "`audit rotate-key --remove-old`",
            changed,
            current,
            ", ".join(sorted(stale)),
        )

    async def kek_usage(self) -> dict[str, int]:
        """How many data keys each KEK wraps."""
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(data_keys.c.kek_id, func.count()).group_by(data_keys.c.kek_id)
            )
            return {k: n for k, n in rows}

    async def destroy_room_key(self, room_id: str) -> bool:
        """Crypto-shred a room: delete its data key (records stay, chain still verifies)."""
        scope = self._bidx("room", room_id)
        async with self._append_lock, self.engine.begin() as conn:
            result = await conn.execute(delete(data_keys).where(data_keys.c.scope == scope))
        dk = self._keys_by_scope.pop(scope, None)
        if dk is not None:
            self._keys_by_id.pop(dk.key_id, None)
        return bool(result.rowcount)

    # -- legal hold -----------------------------------------------------------------------

    def _hold_aad(self, scope: str, target_idx: bytes) -> bytes:
        return b"PBHOLD1" + scope.encode() + b"\x00" + target_idx

    def _hold_idx(self, scope: str, target: str) -> bytes:
        if scope not in HOLD_SCOPES:
            raise ValueError(f"hold scope must be room or user, not {scope!r}")
        return self._bidx("room" if scope == "room" else "sender", target)

    async def _read_holds(self, conn: AsyncConnection) -> list[HoldInfo]:
        rows = (
            await conn.execute(
                select(
                    legal_holds.c.scope,
                    legal_holds.c.target_idx,
                    legal_holds.c.source,
                    legal_holds.c.set_ts,
                    legal_holds.c.key_id,
                    legal_holds.c.nonce,
                    legal_holds.c.ciphertext,
                ).order_by(legal_holds.c.set_ts)
            )
        ).all()
        await self._keys_by_ids(conn, {r[4] for r in rows})
        out = []
        for scope, tidx, source, set_ts, key_id, nonce, ct in rows:
            dk = self._keys_by_id.get(key_id)
            if dk is None:
                raise StoreError(f"legal hold on a {scope}: its data key {key_id!r} is missing")
            try:
                obj = json.loads(
                    dk.aead.decrypt(bytes(nonce), bytes(ct), self._hold_aad(scope, bytes(tidx)))
                )
            except Exception:
                raise StoreError(
                    f"legal hold on a {scope} (set at {set_ts}) fails to authenticate: the "
                    f"legal_holds table was altered"
                ) from None
            out.append(
                HoldInfo(
                    scope, str(obj["target"]), source, set_ts, obj.get("by"), obj.get("reason")
                )
            )
        return out

    async def list_holds(self) -> list[HoldInfo]:
        """Every legal hold (rooms and users), oldest first, decrypted."""
        async with self.engine.connect() as conn:
            return await self._read_holds(conn)

    async def holds(self) -> Holds:
        """The room IDs and user IDs on legal hold (config and commands alike).

        Archive expiry skips their records; the room-retention purge must skip these rooms
        and should leave held users' messages alone.
        """
        infos = await self.list_holds()
        return Holds(
            frozenset(h.target for h in infos if h.scope == "room"),
            frozenset(h.target for h in infos if h.scope == "user"),
        )

    async def _put_hold(
        self,
        conn: AsyncConnection,
        scope: str,
        target: str,
        *,
        source: str,
        by: str | None,
        reason: str | None,
        ts: int,
    ) -> None:
        tidx = self._hold_idx(scope, target)
        await self._keys_for_scopes(conn, {GLOBAL_SCOPE})
        dk = self._keys_by_scope[GLOBAL_SCOPE]
        nonce = os.urandom(12)
        ct = dk.aead.encrypt(
            nonce,
            _dumps({"target": target, "by": by, "reason": reason}),
            self._hold_aad(scope, tidx),
        )
        await conn.execute(
            delete(legal_holds).where(
                legal_holds.c.scope == scope, legal_holds.c.target_idx == tidx
            )
        )
        await conn.execute(
            insert(legal_holds).values(
                scope=scope,
                target_idx=tidx,
                source=source,
                set_ts=ts,
                key_id=dk.key_id,
                nonce=nonce,
                ciphertext=ct,
            )
        )

    def _hold_entry(
        self, action: str, scope: str, target: str, by: str | None, reason: str | None, source: str
    ) -> AuditEntry:
        return AuditEntry(
            "hold",
            {
                "action": action,
                "scope": scope,
                "target": target,
                "by": by,
                "reason": reason,
                "source": source,
            },
            room_id=target if scope == "room" else None,
            sender=by,
            type=f"hold.{action}",
        )

    async def set_hold(
        self,
        scope: str,
        target: str,
        on: bool,
        *,
        by: str | None,
        reason: str | None = None,
    ) -> str:
        """Put a room or user on legal hold, or lift it; audited in the same commit.

        Returns "on", "off", "unchanged" (already in that state) or "config" (an ``off`` of
        a hold that comes from the configuration, which only the config can lift).
        """
        tidx = self._hold_idx(scope, target)

        async def run(conn: AsyncConnection) -> str:
            row = (
                await conn.execute(
                    select(legal_holds.c.source).where(
                        legal_holds.c.scope == scope, legal_holds.c.target_idx == tidx
                    )
                )
            ).first()
            ts = now_ms()
            if on:
                if row is not None:
                    return "unchanged"
                await self._put_hold(
                    conn, scope, target, source="command", by=by, reason=reason, ts=ts
                )
            else:
                if row is None:
                    return "unchanged"
                if row[0] == "config":
                    return "config"
                await conn.execute(
                    delete(legal_holds).where(
                        legal_holds.c.scope == scope, legal_holds.c.target_idx == tidx
                    )
                )
                # lifted: the next expiry run looks at the records it skipped again
                await self._put_state(conn, EXPIRY_CURSOR_KEY, "0")
            entry = self._hold_entry("on" if on else "off", scope, target, by, reason, "command")
            await self._append_records(conn, self._audit_items([entry], ts), ts)
            return "on" if on else "off"

        return await self._write(run)

    async def sync_config_holds(self, rooms: Iterable[str], users: Iterable[str]) -> int:
        """Make the config-sourced holds equal ``audit.legal_hold``; audit each change.

        A target already held by a command becomes config-held; a config hold that left the
        configuration is lifted. Returns the number of changes.
        """
        wanted = {("room", r) for r in rooms} | {("user", u) for u in users}

        async def run(conn: AsyncConnection) -> int:
            current = {(h.scope, h.target): h for h in await self._read_holds(conn)}
            ts = now_ms()
            entries = []
            for scope, target in sorted(wanted):
                have = current.get((scope, target))
                if have is not None and have.source == "config":
                    continue
                await self._put_hold(
                    conn, scope, target, source="config", by="config", reason=None, ts=ts
                )
                entries.append(self._hold_entry("on", scope, target, "config", None, "config"))
            for (scope, target), h in current.items():
                if h.source == "config" and (scope, target) not in wanted:
                    await conn.execute(
                        delete(legal_holds).where(
                            legal_holds.c.scope == scope,
                            legal_holds.c.target_idx == self._hold_idx(scope, target),
                        )
                    )
                    entries.append(self._hold_entry("off", scope, target, "config", None, "config"))
                    await self._put_state(conn, EXPIRY_CURSOR_KEY, "0")
            if entries:
                await self._append_records(conn, self._audit_items(entries, ts), ts)
            return len(entries)

        return await self._write(run)

    # -- archive retention -----------------------------------------------------------------

    async def expire_archive(
        self, retention_ms: int, *, now: int | None = None, batch: int = 2000
    ) -> ExpiryReport:
        """Drop the ciphertext of records older than ``retention_ms`` (by archive time).

        Records of rooms and senders on legal hold are skipped. Rooms whose records are
        all expired lose their data key too (crypto-shredding). ``ct_digest`` stays, so
        the chain still verifies. Works in batches of ``batch`` records, one commit each,
        and resumes where it stopped (a cursor in ``bridge_state``); lifting a hold resets
        the cursor. The run itself is appended as an audit record (kind ``retention``).
        """
        cutoff = (now_ms() if now is None else now) - retention_ms
        held = await self.holds()
        held_rooms = {self._bidx("room", r) for r in held.rooms}
        held_users = {self._bidx("sender", u) for u in held.users}
        expired = skipped = 0
        sqlite = self.backend == "sqlite"
        cursor = int(await self.get_state(EXPIRY_CURSOR_KEY) or 0)
        done = False
        while not done:
            async with self.engine.begin() as conn:
                if sqlite:  # freed bytes are overwritten, not left in free pages
                    await conn.exec_driver_sql("PRAGMA secure_delete=ON")
                rows = (
                    await conn.execute(
                        select(
                            records.c.seq,
                            records.c.ts,
                            records.c.room_idx,
                            records.c.sender_idx,
                            records.c.ciphertext.is_(None),
                        )
                        .where(records.c.seq > cursor)
                        .order_by(records.c.seq)
                        .limit(batch)
                    )
                ).all()
                if len(rows) < batch:
                    done = True
                todo = []
                last = cursor
                for seq, ts, room_idx, sender_idx, gone in rows:
                    if ts >= cutoff:
                        done = True
                        break
                    last = seq
                    if gone:
                        continue
                    if (room_idx is not None and bytes(room_idx) in held_rooms) or (
                        sender_idx is not None and bytes(sender_idx) in held_users
                    ):
                        skipped += 1
                        continue
                    todo.append(seq)
                for i in range(0, len(todo), 500):
                    await conn.execute(
                        update(records)
                        .where(records.c.seq.in_(todo[i : i + 500]))
                        .values(ciphertext=None)
                    )
                expired += len(todo)
                if last != cursor:
                    cursor = last
                    await self._put_state(conn, EXPIRY_CURSOR_KEY, str(cursor))
        shredded = await self._shred_expired_rooms(cutoff, held_rooms)
        if sqlite and (expired or shredded):
            with contextlib.suppress(SQLAlchemyError):
                async with self.engine.connect() as conn:
                    await conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        report = ExpiryReport(cutoff, expired, skipped, shredded, cursor)
        await self.append(
            [
                AuditEntry(
                    "retention",
                    {
                        "job": "archive_expiry",
                        "retention_ms": retention_ms,
                        "cutoff_ts": cutoff,
                        "expired": expired,
                        "skipped_on_hold": skipped,
                        "rooms_shredded": shredded,
                        "through_seq": cursor,
                        "held_rooms": len(held.rooms),
                        "held_users": len(held.users),
                    },
                    type="archive_expiry",
                )
            ]
        )
        return report

    async def _shred_expired_rooms(self, cutoff: int, held_rooms: set[bytes]) -> int:
        """Destroy the data key of every room whose records have all expired."""
        async with self.engine.connect() as conn:
            scopes = [
                bytes(r[0])
                for r in await conn.execute(
                    select(data_keys.c.scope).where(
                        data_keys.c.scope.not_in((GLOBAL_SCOPE, OPERATIONAL_SCOPE))
                    )
                )
            ]
        shredded = 0
        for scope in scopes:
            if scope in held_rooms:
                continue
            async with self.engine.connect() as conn:
                newest = (
                    await conn.execute(
                        select(func.max(records.c.origin_ts)).where(records.c.room_idx == scope)
                    )
                ).scalar()
            if newest is not None and newest >= cutoff:
                continue  # cheap (index) test first: the room has recent events
            async with self._append_lock, self.engine.begin() as conn:
                alive = (
                    await conn.execute(
                        select(records.c.seq)
                        .where(
                            records.c.room_idx == scope,
                            (records.c.ts >= cutoff) | records.c.ciphertext.is_not(None),
                        )
                        .limit(1)
                    )
                ).first()
                if alive is not None:
                    continue
                result = await conn.execute(delete(data_keys).where(data_keys.c.scope == scope))
            dk = self._keys_by_scope.pop(scope, None)
            if dk is not None:
                self._keys_by_id.pop(dk.key_id, None)
            shredded += bool(result.rowcount)
        return shredded


async def iter_chain_batches(
    engine: AsyncEngine, *, after: int = 0, batch: int = 10_000
) -> AsyncIterator[Sequence[Any]]:
    """Batches of rows ``(*ChainFields, hash, ciphertext)`` in seq order, read ahead.

    For :meth:`bridge.audit.chain.ChainVerifier.feed_rows`; constant memory (two batches).
    """
    cols = (
        records.c.seq,
        records.c.ts,
        records.c.kind,
        records.c.event_id_idx,
        records.c.room_idx,
        records.c.sender_idx,
        records.c.type_idx,
        records.c.key_id,
        records.c.nonce,
        records.c.ct_digest,
        records.c.origin_ts,
        records.c.hash,
        records.c.ciphertext,
    )
    query = select(*cols).order_by(records.c.seq).limit(batch)

    async def fetch(last: int) -> Sequence[Any]:
        async with engine.connect() as conn:
            return (await conn.execute(query.where(records.c.seq > last))).all()

    async for rows in _prefetched(fetch, after):
        yield rows


async def iter_chain(
    engine: AsyncEngine, *, after: int = 0, batch: int = 10_000
) -> AsyncIterator[ChainRecord]:
    """Stream every record's hashed fields, stored hash and ciphertext, in seq order."""
    async for rows in iter_chain_batches(engine, after=after, batch=batch):
        for r in rows:
            yield ChainRecord(ChainFields(*r[:11]), r[11], r[12])


async def _prefetched(
    fetch: Callable[[int], Awaitable[Sequence[Any]]], after: int
) -> AsyncIterator[Sequence[Any]]:
    """Batches of rows keyed by their first column (seq), the next one read ahead.

    While the caller works through one batch (CPU: hashing, decrypting), the database
    driver already reads the next one (I/O, and SQLite steps without holding the GIL).
    """
    task = asyncio.ensure_future(fetch(after))
    try:
        while True:
            rows = await task
            if not rows:
                return
            task = asyncio.ensure_future(fetch(rows[-1][0]))
            await asyncio.sleep(0)  # let the read start before the caller's CPU work
            yield rows
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def load_checkpoints(engine: AsyncEngine) -> list[Checkpoint]:
    """Every checkpoint stored in the database, by seq."""
    async with engine.connect() as conn:
        rows = await conn.execute(
            select(
                checkpoints.c.seq,
                checkpoints.c.head_hash,
                checkpoints.c.ts,
                checkpoints.c.record_count,
                checkpoints.c.key_id,
                checkpoints.c.signature,
            ).order_by(checkpoints.c.seq)
        )
        return [
            Checkpoint(seq, bytes(h), ts, n, kid, bytes(sig)) for seq, h, ts, n, kid, sig in rows
        ]


@dataclass(frozen=True, slots=True)
class _Plain:
    """One record before encryption."""

    kind: str
    event_id_idx: bytes | None
    room_id: str | None
    sender: str | None
    type: str | None
    origin_ts: int
    plaintext: bytes
    ts: int | None = None  # when recorded, if not now (records migrated from schema 1)


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None
