"""The work queue: committed transactions waiting to be processed."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from bridge.store import codec
from bridge.store.models import (
    AuditEntry,
    NewAction,
    RoomUpdate,
    StoredEvent,
    StoreError,
    WorkItem,
)
from bridge.store.operational import PLAIN_STATE_KEYS, OperationalMixin
from bridge.store.schema import SEALED_PART, records, transactions


@dataclass(frozen=True, slots=True)
class UnreadableEvent(StoredEvent):
    """An event of a pending transaction that cannot be read back (its ciphertext expired
    or was shredded, it fails to authenticate, or it is not a JSON object). ``event`` is
    empty; ``reason`` says which, without any of the record's content."""

    reason: str


class WorkQueueMixin(OperationalMixin):
    """Reading pending transactions and committing what processing them produced."""

    def _open_queued(
        self, seq: int, room: bytes | None, key_id: str | None, nonce: bytes, ct: bytes | None
    ) -> StoredEvent:
        """The decrypted event of one record, or an :class:`UnreadableEvent` saying why not."""
        try:
            pt = self._decrypt(seq, room, key_id, nonce, ct)
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

    async def pending_work(self, limit: int = 10) -> list[WorkItem]:
        """The oldest unprocessed transactions with their stored events (decrypted), in order.

        A record that cannot be read back is returned as an :class:`UnreadableEvent` in its
        place, so one bad record does not stop the queue: the worker skips it and reports
        it. (A data key that cannot be unwrapped still raises StoreError: that is the
        keyring, not one record.)"""
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
                        select(records.c.seq, *SEALED_PART)
                        .where(records.c.seq.between(first, last), records.c.kind == "event")
                        .order_by(records.c.seq)
                    )
                ).all()
                await self._keys_by_ids(conn, {r[2] for r in rows})
                evs = [self._open_queued(*row) for row in rows]
                items.append(WorkItem(qid, txn_id, received, evs))
            return items

    async def complete_work(
        self,
        queue_ids: Sequence[int],
        new_actions: Sequence[NewAction] = (),
        audit: Sequence[AuditEntry] = (),
        state_updates: Mapping[str, str] | None = None,
        rooms: Sequence[RoomUpdate] = (),
    ) -> None:
        """Mark transactions processed together with everything processing produced
        (``rooms``: room rows, as :meth:`upsert_room` writes them)."""
        dk = None
        if new_actions or rooms or any(k not in PLAIN_STATE_KEYS for k in state_updates or {}):
            dk = await self._op_key()

        async def run(conn: AsyncConnection) -> None:
            if queue_ids:
                await conn.execute(
                    update(transactions)
                    .where(transactions.c.id.in_(list(queue_ids)))
                    .values(processed=True)
                )
            for room in rooms:
                assert dk is not None
                await self._upsert_room_in(conn, dk, room)
            await self._insert_actions(conn, new_actions)
            if audit:
                await self._append_audit(conn, audit)
            for key, value in (state_updates or {}).items():
                await self._put_state(conn, key, value)

        if not rooms:
            await self._write_or_unavailable(run)
            return
        async with self._room_data_lock():
            await self._write_or_unavailable(run)
