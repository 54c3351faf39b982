"""The durable store: events, audit records, the work queue, executor actions, state.

All writes that must be atomic go through one method each (``ingest_transaction``,
``complete_work``), so callers cannot split what belongs in one commit. Appends to the
record sequence are serialised by an in-process lock: one bridge process owns a store.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import event, func, insert, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from . import schema
from .schema import actions, records, rooms, state, transactions

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
    """Async facade over the database. Create with :meth:`open`."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.backend = "postgresql" if engine.dialect.name == "postgresql" else "sqlite"
        self._append_lock = asyncio.Lock()
        self._next_seq: int | None = None

    # -- lifecycle -----------------------------------------------------------------------

    @classmethod
    async def open(cls, url: str, *, pool_size: int = 10, create: bool = True) -> Store:
        """Connect, create or migrate the schema. Raises StoreUnavailable if unreachable."""
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
        store = cls(engine)
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
        await self.engine.dispose()

    async def migrate(self, *, create: bool = True) -> None:
        """Create the schema, or check the stored version is one this code understands."""
        async with self.engine.begin() as conn:
            if create:
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

    # -- appends ------------------------------------------------------------------------

    async def _seq_start(self, conn: AsyncConnection) -> int:
        if self._next_seq is None:
            top = (await conn.execute(select(func.max(records.c.seq)))).scalar()
            self._next_seq = (top or 0) + 1
        return self._next_seq

    def _audit_rows(self, entries: Iterable[AuditEntry], seq: int, ts: int) -> list[dict]:
        return [
            {
                "seq": seq + i,
                "ts": ts,
                "kind": e.kind,
                "event_id": None,
                "room_id": e.room_id,
                "sender": e.sender,
                "type": e.type,
                "origin_ts": ts,
                "data": _dumps(dict(e.data)),
            }
            for i, e in enumerate(entries)
        ]

    async def ingest_transaction(
        self, txn_id: str, events: Sequence[Mapping[str, Any]]
    ) -> IngestResult:
        """Store a transaction's events and its work-queue entry in ONE commit.

        Returns once the commit is durable. A txnId seen before stores nothing; an event_id
        seen before (in an earlier transaction or twice in this one) is skipped.
        """
        try:
            async with self._append_lock:
                return await self._ingest_locked(txn_id, events)
        except SQLAlchemyError as e:
            self._next_seq = None
            raise StoreUnavailable(str(e.__class__.__name__)) from e
        except OSError as e:
            self._next_seq = None
            raise StoreUnavailable(str(e)) from e

    async def _ingest_locked(
        self, txn_id: str, events: Sequence[Mapping[str, Any]]
    ) -> IngestResult:
        ts = now_ms()
        async with self.engine.begin() as conn:
            seen = (
                await conn.execute(select(transactions.c.id).where(transactions.c.txn_id == txn_id))
            ).first()
            if seen is not None:
                return IngestResult(duplicate=True, stored=0, skipped=len(events))
            ids = [e.get("event_id") for e in events]
            wanted = {i for i in ids if isinstance(i, str)}
            known: set[str] = set()
            if wanted:
                result = await conn.execute(
                    select(records.c.event_id).where(records.c.event_id.in_(wanted))
                )
                known = {r[0] for r in result}
            seq = await self._seq_start(conn)
            rows = []
            for ev, eid in zip(events, ids, strict=True):
                if isinstance(eid, str):
                    if eid in known:
                        continue
                    known.add(eid)
                else:
                    eid = None
                origin = ev.get("origin_server_ts")
                rows.append(
                    {
                        "seq": seq + len(rows),
                        "ts": ts,
                        "kind": "event",
                        "event_id": eid,
                        "room_id": _str_or_none(ev.get("room_id")),
                        "sender": _str_or_none(ev.get("sender")),
                        "type": _str_or_none(ev.get("type")),
                        "origin_ts": origin if isinstance(origin, int) else ts,
                        "data": _dumps(ev),
                    }
                )
            if rows:
                await conn.execute(insert(records), rows)
            await conn.execute(
                insert(transactions).values(
                    txn_id=txn_id,
                    received_ts=ts,
                    first_seq=rows[0]["seq"] if rows else None,
                    last_seq=rows[-1]["seq"] if rows else None,
                    event_count=len(rows),
                    processed=not rows,
                )
            )
        self._next_seq = seq + len(rows)
        return IngestResult(duplicate=False, stored=len(rows), skipped=len(events) - len(rows))

    async def append(self, entries: Sequence[AuditEntry]) -> None:
        """Append audit records (gate decisions, outcomes, commands) in one commit."""
        if not entries:
            return
        try:
            async with self._append_lock:
                async with self.engine.begin() as conn:
                    seq = await self._seq_start(conn)
                    await conn.execute(insert(records), self._audit_rows(entries, seq, now_ms()))
                self._next_seq = seq + len(entries)
        except (SQLAlchemyError, OSError) as e:
            self._next_seq = None
            raise StoreUnavailable(str(e.__class__.__name__)) from e

    # -- work queue ---------------------------------------------------------------------

    async def pending_work(self, limit: int = 10) -> list[WorkItem]:
        """The oldest unprocessed transactions with their stored events, in order."""
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
                result = await conn.execute(
                    select(records.c.seq, records.c.data)
                    .where(records.c.seq.between(first, last), records.c.kind == "event")
                    .order_by(records.c.seq)
                )
                evs = [StoredEvent(seq, json.loads(data)) for seq, data in result]
                items.append(WorkItem(qid, txn_id, received, evs))
            return items

    async def complete_work(
        self,
        queue_ids: Sequence[int],
        new_actions: Sequence[NewAction] = (),
        audit: Sequence[AuditEntry] = (),
        state_updates: Mapping[str, str] | None = None,
    ) -> None:
        """Mark transactions processed together with everything processing produced."""
        async with self._append_lock:
            try:
                async with self.engine.begin() as conn:
                    if queue_ids:
                        await conn.execute(
                            update(transactions)
                            .where(transactions.c.id.in_(list(queue_ids)))
                            .values(processed=True)
                        )
                    await self._insert_actions(conn, new_actions)
                    if audit:
                        seq = await self._seq_start(conn)
                        await conn.execute(insert(records), self._audit_rows(audit, seq, now_ms()))
                        self._next_seq = seq + len(audit)
                    for key, value in (state_updates or {}).items():
                        await self._put_state(conn, key, value)
            except (SQLAlchemyError, OSError) as e:
                self._next_seq = None
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
                    "next_at": 0.0,
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
        async with self._append_lock:
            async with self.engine.begin() as conn:
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
                    seq = await self._seq_start(conn)
                    await conn.execute(insert(records), self._audit_rows([audit], seq, now_ms()))
                    self._next_seq = seq + 1

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
            by_status = dict(
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
        self, *, kind: str | None = None, batch: int = 1000
    ) -> AsyncIterator[dict[str, Any]]:
        """Stream records in sequence order, decoded, in constant memory."""
        last = 0
        while True:
            query = select(records).where(records.c.seq > last)
            if kind is not None:
                query = query.where(records.c.kind == kind)
            async with self.engine.connect() as conn:
                rows = (
                    (await conn.execute(query.order_by(records.c.seq).limit(batch)))
                    .mappings()
                    .all()
                )
            if not rows:
                return
            for row in rows:
                out = dict(row)
                out["data"] = json.loads(out["data"])
                yield out
            last = rows[-1]["seq"]

    async def count_events(self, event_id: str) -> int:
        async with self.engine.connect() as conn:
            return (
                await conn.execute(select(func.count()).where(records.c.event_id == event_id))
            ).scalar_one()


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _action_row(row: Mapping[str, Any]) -> ActionRow:
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
