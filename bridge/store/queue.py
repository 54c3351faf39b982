"""The work queue: appservice transactions ingested in one commit, then processed.

Both writes that must be atomic are one method each: :meth:`WorkQueue.ingest` (a
transaction's events and its queue entry) and :meth:`WorkQueue.complete` (marking work
processed together with the actions, audit records and state it produced), so callers
cannot split what belongs in one commit.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, func, insert, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection

from bridge.audit import codec
from bridge.audit.codec import str_or_none
from bridge.audit.kinds import AuditKind
from bridge.store.actions import ActionQueue
from bridge.store.database import Database, log
from bridge.store.keys import KeyRepository
from bridge.store.media import MediaCheck, MediaRepository
from bridge.store.models import (
    AuditEntry,
    IngestResult,
    NewAction,
    Plain,
    RoomUpdate,
    StoredEvent,
    StoreError,
    StoreUnavailable,
    WorkItem,
    now_ms,
)
from bridge.store.records import RecordLog
from bridge.store.rooms import RoomRepository
from bridge.store.schema import SEALED_PART, records, transactions
from bridge.store.state import StateRepository

# Statements of the ingest path, built once (no per-call construction or cache-key work).
_SEEN_TXN = select(transactions.c.id).where(transactions.c.txn_id == bindparam("txn_id"))
_KNOWN_EVENTS = select(records.c.event_id_idx).where(
    records.c.event_id_idx.in_(bindparam("ids", expanding=True))
)
_INSERT_TXN = insert(transactions)
# ... and of the worker's reads and marks.
_PENDING_TXNS = (
    select(
        transactions.c.id,
        transactions.c.txn_id,
        transactions.c.received_ts,
        transactions.c.first_seq,
        transactions.c.last_seq,
    )
    .where(transactions.c.processed.is_(False))
    .order_by(transactions.c.id)
    .limit(bindparam("limit"))
)
_QUEUED_RECORDS = (
    select(records.c.seq, *SEALED_PART)
    .where(
        records.c.seq.between(bindparam("lo"), bindparam("hi")),
        records.c.kind == AuditKind.EVENT,
    )
    .order_by(records.c.seq)
)
_MARK_PROCESSED = (
    update(transactions)
    .where(
        transactions.c.id.in_(bindparam("ids", expanding=True)),
        transactions.c.processed.is_(False),
    )
    .values(processed=True)
)


# The hand-off from ingest to the worker: at most this many committed transactions' events
# are kept in memory (beyond that, the worker reads them back from the store, as after a
# restart).
_FRESH_MAX = 64


@dataclass(frozen=True, slots=True)
class _Fresh:
    """A committed transaction's stored events, in seq order, as ingest parsed them."""

    queue_id: int
    txn_id: str
    first_seq: int
    last_seq: int
    events: list[Mapping[str, Any]]


class AlreadyProcessed(StoreUnavailable):
    """A transaction being marked processed was processed by another worker already."""


@dataclass(frozen=True, slots=True)
class UnreadableEvent(StoredEvent):
    """An event of a pending transaction that cannot be read back (its ciphertext expired
    or was shredded, it fails to authenticate, or it is not a JSON object). ``event`` is
    empty; ``reason`` says which, without any of the record's content."""

    reason: str


class WorkQueue:
    """The ``transactions`` table: txnId idempotence and the queue of pending work."""

    def __init__(
        self,
        db: Database,
        keys: KeyRepository,
        records: RecordLog,
        actions: ActionQueue,
        state: StateRepository,
        rooms: RoomRepository,
    ) -> None:
        self.db = db
        self.keys = keys
        self.records = records
        self.actions = actions
        self.media: MediaRepository | None = None  # set by the Store (attachments)
        self.state = state
        self.rooms = rooms
        self._fresh: OrderedDict[int, _Fresh] = OrderedDict()
        self._fresh_shredded = len(keys.shredded)  # destroyed keys known at hand-off

    async def ingest(self, txn_id: str, events: Sequence[Mapping[str, Any]]) -> IngestResult:
        """Store a transaction's events and its work-queue entry in ONE commit.

        Returns once the commit is durable. A txnId seen before stores nothing; an event_id
        seen before (in an earlier transaction or twice in this one) is skipped.
        """
        staged: list[_Fresh] = []
        try:
            result = await self.records.write(
                lambda conn: self._ingest(conn, txn_id, events, staged)
            )
        except SQLAlchemyError as e:
            raise StoreUnavailable(str(e.__class__.__name__)) from e
        except OSError as e:
            raise StoreUnavailable(str(e)) from e
        # Committed: the worker may take these events from memory instead of reading,
        # decrypting and parsing them again (only the last attempt's staging counts).
        if staged:
            self._hand_off(staged[-1])
        return result

    def _hand_off(self, fresh: _Fresh) -> None:
        if len(self.keys.shredded) != self._fresh_shredded:
            self.forget_hand_off()
        self._fresh[fresh.queue_id] = fresh
        while len(self._fresh) > _FRESH_MAX:
            self._fresh.popitem(last=False)

    async def _ingest(
        self,
        conn: AsyncConnection,
        txn_id: str,
        events: Sequence[Mapping[str, Any]],
        staged: list[_Fresh],
    ) -> IngestResult:
        ts = now_ms()
        seen = (await conn.execute(_SEEN_TXN, {"txn_id": txn_id})).first()
        ids = [e.get("event_id") for e in events]
        index = self.keys.index
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
        kept: list[Mapping[str, Any]] = []
        for ev, key in zip(events, eidx, strict=True):
            if key is not None:
                if key in known:
                    continue
                known.add(key)
            origin = ev.get("origin_server_ts")
            kept.append(ev)
            items.append(
                Plain(
                    AuditKind.EVENT,
                    key,
                    str_or_none(ev.get("room_id")),
                    str_or_none(ev.get("sender")),
                    str_or_none(ev.get("type")),
                    origin if type(origin) is int and 0 <= origin < 1 << 62 else ts,
                    codec.dumps(ev),
                )
            )
        first, last = await self.records.append_records(conn, items, ts)
        inserted = await conn.execute(
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
        key = inserted.inserted_primary_key
        if items and key is not None:
            staged.append(_Fresh(int(key[0]), txn_id, first, last, kept))
        return IngestResult(duplicate=False, stored=len(items), skipped=len(events) - len(items))

    def _open_queued(
        self, seq: int, room: bytes | None, key_id: str | None, nonce: bytes, ct: bytes | None
    ) -> StoredEvent:
        """The decrypted event of one record, or an :class:`UnreadableEvent` saying why not."""
        try:
            pt = self.keys.decrypt(seq, room, key_id, nonce, ct)
        except StoreError:
            return UnreadableEvent(seq, {}, "it fails to authenticate (damaged or altered)")
        if pt is None:
            return UnreadableEvent(seq, {}, "its ciphertext is gone (expired or key destroyed)")
        try:
            event = codec.loads(pt)
        except ValueError:
            return UnreadableEvent(seq, {}, "it is not valid JSON")
        if not isinstance(event, dict):
            return UnreadableEvent(seq, {}, "it is not a JSON object")
        return StoredEvent(seq, event)

    async def pending(self, limit: int = 10) -> list[WorkItem]:
        """The oldest unprocessed transactions with their stored events (decrypted), in order.

        A record that cannot be read back is returned as an :class:`UnreadableEvent` in its
        place, so one bad record does not stop the queue: the worker skips it and reports
        it. (A data key that cannot be unwrapped still raises StoreError: that is the
        keyring, not one record.)

        Two queries whatever ``limit`` is: the transactions, then the event records of all
        of them (one range over their seqs, each row given to the transaction whose range
        holds it)."""
        async with self.db.connect() as conn:
            txns = (await conn.execute(_PENDING_TXNS, {"limit": limit})).all()
            fresh = self._take_fresh(txns)
            spans = [
                (f, last)
                for qid, *_, f, last in txns
                if f is not None and last is not None and qid not in fresh
            ]
            rows: list[Any] = []
            if spans:
                lo, hi = min(f for f, _ in spans), max(last for _, last in spans)
                rows = list((await conn.execute(_QUEUED_RECORDS, {"lo": lo, "hi": hi})).all())
                await self.keys.by_ids(conn, {r[2] for r in rows})
        items = []
        i = 0
        for qid, txn_id, received, first, last in txns:
            evs: list[StoredEvent] = []
            if qid in fresh:
                evs = fresh[qid]
            elif first is not None and last is not None:
                while i < len(rows) and rows[i][0] < first:
                    i += 1  # an event record of no pending transaction: not ours to process
                while i < len(rows) and rows[i][0] <= last:
                    evs.append(self._open_queued(*rows[i]))
                    i += 1
            items.append(WorkItem(qid, txn_id, received, evs))
        return items

    def forget_hand_off(self) -> None:
        """Forget the events ingest handed to the worker in memory: the worker reads every
        pending transaction back from the store, as after a restart."""
        self._fresh.clear()
        self._fresh_shredded = len(self.keys.shredded)

    def _take_fresh(self, txns: Sequence[Any]) -> dict[int, list[StoredEvent]]:
        """The pending transactions' events this process ingested, as committed (by queue
        id; only where the row still names the same txnId and seqs). Entries older than
        the oldest pending transaction (processed elsewhere) are dropped, and all of them
        once a data key was destroyed since (its records must read as destroyed)."""
        if len(self.keys.shredded) != self._fresh_shredded:
            self.forget_hand_off()
        if not txns:
            self._fresh.clear()
            return {}
        oldest = txns[0][0]
        for qid in [q for q in self._fresh if q < oldest]:
            del self._fresh[qid]
        out: dict[int, list[StoredEvent]] = {}
        for qid, txn_id, _received, first, last in txns:
            f = self._fresh.get(qid)
            if f is not None and (f.txn_id, f.first_seq, f.last_seq) == (txn_id, first, last):
                out[qid] = [StoredEvent(first + i, dict(ev)) for i, ev in enumerate(f.events)]
        return out

    async def mark_processed(self, conn: AsyncConnection, queue_ids: Sequence[int]) -> None:
        """Mark the transactions ``queue_ids`` processed, in ``conn``.

        Only rows still pending are marked; if any was marked by someone else meanwhile (two
        leaders overlapping), :class:`AlreadyProcessed` rolls the whole commit back, so
        nothing processing produced is stored twice."""
        if queue_ids:
            ids = list(dict.fromkeys(queue_ids))
            marked = await conn.execute(_MARK_PROCESSED, {"ids": ids})
            if marked.rowcount != len(ids):
                raise AlreadyProcessed(
                    f"{len(ids) - marked.rowcount} of {len(ids)} transactions were processed "
                    "by another worker"
                )

    async def complete(
        self,
        queue_ids: Sequence[int],
        new_actions: Sequence[NewAction] = (),
        audit: Sequence[AuditEntry] = (),
        state_updates: Mapping[str, str] | None = None,
        rooms: Sequence[RoomUpdate] = (),
        media: Sequence[MediaCheck] = (),
    ) -> None:
        """Mark transactions processed together with everything processing produced
        (``rooms``: room rows, as :meth:`RoomRepository.upsert` writes them; ``media``:
        in-room attachment checks to queue)."""
        dk = None
        if new_actions or rooms or media or self.state.needs_key(list(state_updates or {})):
            dk = await self.keys.op_key()

        async def run(conn: AsyncConnection) -> None:
            await self.mark_processed(conn, queue_ids)
            for room in rooms:
                assert dk is not None
                await self.rooms.upsert_in(conn, dk, room)
            await self.actions.insert(conn, new_actions)
            if media and self.media is not None:
                await self.media.insert(conn, media)
            if audit:
                await self.records.append_audit(conn, audit)
            for key, value in (state_updates or {}).items():
                await self.state.put(conn, key, value)

        if not rooms:
            await self.records.write_or_unavailable(run)
            return
        async with self.rooms.rmw_lock:
            await self.records.write_or_unavailable(run)

    async def backlog(self) -> tuple[int, float]:
        """(transactions waiting, age in seconds of the oldest): one indexed query."""
        async with self.db.connect() as conn:
            return await self.backlog_in(conn)

    @staticmethod
    async def backlog_in(conn: AsyncConnection) -> tuple[int, float]:
        """:meth:`backlog` in ``conn``."""
        depth, oldest = (
            await conn.execute(
                select(func.count(), func.min(transactions.c.received_ts)).where(
                    transactions.c.processed.is_(False)
                )
            )
        ).one()
        return int(depth), max(0.0, (now_ms() - oldest) / 1000) if oldest else 0.0
