"""Ingest hands the events it committed to the worker in memory; the store stays the truth.

The worker gets a pending transaction's events as ingest parsed them, without reading,
decrypting and parsing them again, but only once they are committed, only while the queue
row still names the same transaction, and never once a data key was destroyed since.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.exc import OperationalError

from bridge.store import Store, StoreUnavailable
from bridge.store.queue import UnreadableEvent
from bridge.store.schema import records
from tests.kit.store import destroy_room_key

ROOM = "!room:corp.example"
_n = 0


def msg(body: str, room: str = ROOM, **content: Any) -> dict[str, Any]:
    global _n
    _n += 1
    return {
        "event_id": f"$h{_n}",
        "room_id": room,
        "sender": "@joe:corp.example",
        "type": "m.room.message",
        "origin_server_ts": 1_700_000_000_000 + _n,
        "content": {"msgtype": "m.text", "body": body, **content},
    }


async def _blank_ciphertexts(store: Store) -> None:
    async with store.db.transaction() as conn:
        await conn.execute(update(records).values(ciphertext=None))


async def test_the_worker_reads_what_ingest_committed_without_reading_it_back(
    store: Store,
) -> None:
    first = [msg("über café ✅"), msg("numbers", n=12345678901234567890123, f=0.1)]
    second = [msg("second"), first[0]]  # a duplicate event is not stored twice
    await store.queue.ingest("t1", first)
    await store.queue.ingest("t2", second)
    from_memory = await store.queue.pending()
    store.queue.forget_hand_off()
    from_store = await store.queue.pending()
    assert from_memory == from_store  # queue ids, txnIds, seqs and events alike
    assert [[s.event for s in item.events] for item in from_memory] == [first, second[:1]]

    # Proof that memory served them: with the ciphertexts gone from the store, a read-back
    # meets unreadable records, the hand-off still has the committed events.
    await store.queue.ingest("t3", [msg("third")])
    await _blank_ciphertexts(store)
    *_, fresh = await store.queue.pending()
    assert [s.event["content"]["body"] for s in fresh.events] == ["third"]
    store.queue.forget_hand_off()
    *_, read_back = await store.queue.pending()
    assert all(isinstance(s, UnreadableEvent) for s in read_back.events)


async def test_a_transaction_whose_commit_failed_is_not_handed_off(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = store.queue._ingest

    async def failing(*args: Any) -> Any:
        await real(*args)  # staged, then the database transaction fails and rolls back
        raise OperationalError("INSERT", {}, Exception("disk I/O error"))

    monkeypatch.setattr(store.queue, "_ingest", failing)
    with pytest.raises(StoreUnavailable):
        await store.queue.ingest("t-lost", [msg("never committed")])
    monkeypatch.setattr(store.queue, "_ingest", real)
    assert await store.queue.pending() == []
    # the next transaction may get the same queue id (SQLite reuses it): its own events
    await store.queue.ingest("t-next", [msg("committed")])
    [item] = await store.queue.pending()
    assert item.txn_id == "t-next"
    assert [s.event["content"]["body"] for s in item.events] == ["committed"]


async def test_a_destroyed_room_key_ends_the_hand_off(store: Store) -> None:
    await store.queue.ingest("t-shred", [msg("to be forgotten")])
    assert await destroy_room_key(store, ROOM)
    [item] = await store.queue.pending()
    assert all(isinstance(s, UnreadableEvent) for s in item.events)
    assert "gone" in item.events[0].reason  # type: ignore[attr-defined]
