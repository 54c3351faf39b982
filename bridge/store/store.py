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
import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import delete, event, func, insert, inspect, select, update
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
    BlindIndexer,
    DataKey,
    KeyUnwrapError,
    RecordDecryptError,
    WrappedKey,
    decrypt_record,
    encrypt_record,
    rewrap,
    unwrap_with_keyring,
    wrap,
)
from ..audit.keyring import Keyring, KeyringMissingError
from . import schema
from .schema import actions, checkpoints, data_keys, records, rooms, state, transactions

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
INDEX_CHECK_KEY = "audit_index_check"

log = logging.getLogger(__name__)


class StoreUnavailable(Exception):
    """The database could not be reached or refused the write; the caller should retry."""


class StoreError(Exception):
    """The store is in a state the code cannot work with (e.g. a newer schema)."""


def now_ms() -> int:
    return int(time.time() * 1000)


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


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
    ) -> Store:
        """Connect, create or migrate the schema, unlock the audit keys.

        Raises StoreUnavailable if unreachable, StoreError if the keyring does not fit the
        stored data keys, KeyringMissingError if the database holds records but no keyring
        was given.
        """
        parsed = make_url(url)
        kwargs: dict[str, Any] = {}
        if parsed.get_backend_name() == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        else:
            kwargs.update(pool_size=pool_size, pool_pre_ping=True)
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
        """Create the schema, or check the stored version is one this code understands."""
        async with self.engine.begin() as conn:
            if create:
                await self._upgrade_v1(conn)
                await conn.run_sync(schema.metadata.create_all)
            row = (
                await conn.execute(select(state.c.value).where(state.c.key == "schema_version"))
            ).first()
            if row is None:
                await conn.execute(
                    insert(state).values(key="schema_version", value=str(schema.SCHEMA_VERSION))
                )
            elif int(row[0]) > schema.SCHEMA_VERSION:
                raise StoreError(
                    f"the database has schema version {row[0]}, newer than this bridge "
                    f"understands ({schema.SCHEMA_VERSION}); upgrade the bridge"
                )
            elif int(row[0]) < schema.SCHEMA_VERSION:
                await self._put_state(conn, "schema_version", str(schema.SCHEMA_VERSION))
            await self._unlock(conn)

    @staticmethod
    async def _upgrade_v1(conn: AsyncConnection) -> None:
        """Schema 1 kept plaintext records: an empty one is replaced, a full one refused."""

        def columns(sync_conn: Any) -> list[str]:
            insp = inspect(sync_conn)
            if not insp.has_table("records"):
                return []
            return [c["name"] for c in insp.get_columns("records")]

        cols = await conn.run_sync(columns)
        if not cols or "ciphertext" in cols:
            return
        n = (await conn.exec_driver_sql("SELECT count(*) FROM records")).scalar_one()
        if n:
            raise StoreError(
                f"the database holds {n} plaintext records of schema 1; this bridge only "
                f"keeps encrypted records (schema {schema.SCHEMA_VERSION}) and cannot "
                f"convert them: archive that database and start on an empty one"
            )
        await conn.exec_driver_sql("DROP TABLE records")

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
        self, conn: AsyncConnection, items: Sequence[_Plain], ts: int
    ) -> tuple[int, int]:
        """Encrypt, chain and insert ``items``; returns (first_seq, last_seq).

        The new head is only adopted after the commit (:meth:`_write`).
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
                    seq, ts, p.kind, eid, room, sender, etype, dk.key_id, nonce, digest, p.origin_ts
                ),
            )
            rows.append(
                (
                    seq,
                    ts,
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
                insert(records), [dict(zip(_RECORD_COLS, r, strict=True)) for r in rows]
            )
        last = seq - 1
        cp = None
        if last - self._last_cp_seq >= self.checkpoint_every:
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
        seen = (
            await conn.execute(select(transactions.c.id).where(transactions.c.txn_id == txn_id))
        ).first()
        if seen is not None:
            return IngestResult(duplicate=True, stored=0, skipped=len(events))
        ids = [e.get("event_id") for e in events]
        index = self._idx
        assert index is not None
        eidx = [index("event_id", i) if isinstance(i, str) else None for i in ids]
        wanted = {i for i in eidx if i is not None}
        known: set[bytes] = set()
        if wanted:
            result = await conn.execute(
                select(records.c.event_id_idx).where(records.c.event_id_idx.in_(wanted))
            )
            known = {bytes(r[0]) for r in result}
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
            insert(transactions).values(
                txn_id=txn_id,
                received_ts=ts,
                first_seq=first if items else None,
                last_seq=last if items else None,
                event_count=len(items),
                processed=not items,
            )
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

    # -- executor actions ---------------------------------------------------------------

    @staticmethod
    async def _insert_actions(conn: AsyncConnection, new_actions: Sequence[NewAction]) -> None:
        if not new_actions:
            return
        ts = now_ms()
        await conn.execute(
            insert(actions),
            [
                {
                    "id": a.id,
                    "kind": a.kind,
                    "room_id": a.room_id,
                    "payload": json.dumps(dict(a.payload), ensure_ascii=False),
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
            return [_action_row(r) for r in result.mappings()]

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
            return _action_row(row) if row else None

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

        async def run(conn: AsyncConnection) -> None:
            await conn.execute(
                update(actions)
                .where(actions.c.id == action_id)
                .values(
                    status=status,
                    attempts=attempts,
                    next_at=next_at,
                    last_error=error,
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
            return [_action_row(r) for r in result.mappings()]

    # -- state and rooms ----------------------------------------------------------------

    @staticmethod
    async def _put_state(conn: AsyncConnection, key: str, value: str) -> None:
        updated = await conn.execute(update(state).where(state.c.key == key).values(value=value))
        if updated.rowcount == 0:
            await conn.execute(insert(state).values(key=key, value=value))

    async def get_state(self, key: str) -> str | None:
        async with self.engine.connect() as conn:
            return (await conn.execute(select(state.c.value).where(state.c.key == key))).scalar()

    async def set_state(self, key: str, value: str) -> None:
        async with self.engine.begin() as conn:
            await self._put_state(conn, key, value)

    async def upsert_room(
        self, room_id: str, *, joined: bool | None = None, lacking: str | None = None
    ) -> None:
        async with self.engine.begin() as conn:
            values: dict[str, Any] = {"updated_ts": now_ms()}
            if joined is not None:
                values["joined"] = joined
            if lacking is not None:
                values["lacking"] = lacking
            result = await conn.execute(
                update(rooms).where(rooms.c.room_id == room_id).values(**values)
            )
            if result.rowcount == 0:
                values.setdefault("joined", False)
                values.setdefault("lacking", "")
                await conn.execute(insert(rooms).values(room_id=room_id, **values))

    async def list_rooms(self) -> list[dict[str, Any]]:
        async with self.engine.connect() as conn:
            result = await conn.execute(select(rooms).order_by(rooms.c.room_id))
            return [dict(r) for r in result.mappings()]

    # -- reads --------------------------------------------------------------------------

    async def stats(self) -> StoreStats:
        async with self.engine.connect() as conn:
            events = (
                await conn.execute(select(func.count()).where(records.c.kind == "event"))
            ).scalar_one()
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
                        select(actions.c.status, func.count()).group_by(actions.c.status)
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
        """Stream records in sequence order, decrypted, in constant memory.

        Filters: room, sender and type by blind-index equality; ``since``/``until`` (ms,
        inclusive/exclusive) on the event's origin_server_ts; ``after`` a seq. Each dict has
        seq, ts, kind, event_id, room_id, sender, type, origin_ts and data (the event, or the
        audit entry's data); ``data`` is None when the ciphertext expired or the room key was
        destroyed (``unreadable`` says which). With ``raw_json`` an event's dict also holds
        ``json``: its stored JSON text, exactly as archived (exports copy it instead of
        serialising ``data`` again). A record that fails to authenticate raises StoreError.
        """
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
        last = after
        while True:
            query = select(*cols).where(records.c.seq > last, *conds)
            async with self.engine.connect() as conn:
                rows = (await conn.execute(query.order_by(records.c.seq).limit(batch))).all()
                await self._keys_by_ids(conn, {r[5] for r in rows})
            if not rows:
                return
            for seq, ts, rkind, origin, room_idx, key_id, nonce, ct in rows:
                pt = decrypt(seq, room_idx, key_id, nonce, ct)
                if pt is None:
                    yield {
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
                    out = {
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
                        out["json"] = text
                    yield out
                else:
                    yield {
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
            last = rows[-1][0]

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


async def iter_chain(
    engine: AsyncEngine, *, after: int = 0, batch: int = 10_000
) -> AsyncIterator[ChainRecord]:
    """Stream every record's hashed fields, stored hash and ciphertext, in seq order."""
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
    last = after
    while True:
        async with engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(*cols).where(records.c.seq > last).order_by(records.c.seq).limit(batch)
                )
            ).all()
        if not rows:
            return
        for r in rows:
            yield ChainRecord(ChainFields(*r[:11]), r[11], r[12])
        last = rows[-1][0]


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


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _action_row(row: Any) -> ActionRow:
    return ActionRow(
        id=row["id"],
        kind=row["kind"],
        room_id=row["room_id"],
        payload=json.loads(row["payload"]),
        status=row["status"],
        attempts=row["attempts"],
        next_at=row["next_at"],
        last_error=row["last_error"],
    )
