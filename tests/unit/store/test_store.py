"""The store on SQLite and PostgreSQL: atomic ingest, idempotence, queue, actions."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncConnection

from bridge.store import AuditEntry, NewAction, Store, StoreSettings
from tests.kit.store import actions_by_status, count_events, get_action


def ev(i: int, room: str = "!r:x", **extra: Any) -> dict[str, Any]:
    return {
        "event_id": f"$e{i}",
        "room_id": room,
        "sender": "@u:x",
        "type": "m.room.message",
        "origin_server_ts": 1_700_000_000_000 + i,
        "content": {"msgtype": "m.text", "body": f"hello {i}"},
        **extra,
    }


async def test_ingest_is_idempotent_on_txn_and_event_id(store: Store) -> None:
    r1 = await store.queue.ingest("t1", [ev(1), ev(2), ev(2)])
    assert (r1.duplicate, r1.stored, r1.skipped) == (False, 2, 1)
    again = await store.queue.ingest("t1", [ev(1), ev(2)])
    assert again.duplicate and again.stored == 0
    r2 = await store.queue.ingest("t2", [ev(2), ev(3)])
    assert (r2.stored, r2.skipped) == (1, 1)
    assert await count_events(store, "$e2") == 1
    stats = await store.stats.snapshot()
    assert stats.events == 3
    assert stats.queue_depth == 2


async def test_events_are_stored_losslessly_and_in_order(store: Store) -> None:
    weird = {
        "event_id": "$w",
        "room_id": "!r:x",
        "type": "org.example.unknown",
        "content": {"nested": [1, {"ü": "😀"}], "n": None},
        "unsigned": {"age": 5},
    }
    no_id = {"type": "m.typing", "content": {}}
    await store.queue.ingest("t", [ev(1), weird, no_id])
    [item] = await store.queue.pending()
    assert [s.event for s in item.events] == [ev(1), weird, no_id]
    assert [s.seq for s in item.events] == sorted(s.seq for s in item.events)


async def test_complete_work_is_atomic_with_actions_and_audit(store: Store) -> None:
    await store.queue.ingest("t", [ev(1)])
    [item] = await store.queue.pending()
    action = NewAction("redact", {"event_id": "$e1"}, room_id="!r:x")
    await store.queue.complete(
        [item.queue_id],
        [action],
        [AuditEntry("decision", {"x": 1}, room_id="!r:x")],
        {"k": "v"},
    )
    assert await store.queue.pending() == []
    assert (await get_action(store, action.id)).status == "pending"
    assert await store.state.get("k") == "v"
    kinds = [r["kind"] async for r in store.reader.iter()]
    assert kinds == ["event", "decision"]


async def test_repositories_compose_in_one_commit(store: Store) -> None:
    """Several repositories written through one ``records.write`` commit or roll back as
    one: the state value, the action and the audit record, and the chain head with them."""
    await store.keys.op_key()  # before the transaction (SQLite: one writer)
    action = NewAction("notice", {"body": "x"}, room_id="!r:x")

    async def doomed(conn: AsyncConnection) -> None:
        await store.state.put(conn, "k", "v")
        await store.actions.insert(conn, [action])
        await store.records.append_audit(conn, [AuditEntry("command", {"n": 1})])
        raise RuntimeError("abort")

    with pytest.raises(RuntimeError, match="abort"):
        await store.records.write(doomed)
    assert await store.state.get("k") is None
    assert await get_action(store, action.id) is None
    assert [r async for r in store.reader.iter()] == []

    async def together(conn: AsyncConnection) -> None:
        await store.state.put(conn, "k", "v")
        await store.actions.insert(conn, [action])
        await store.records.append_audit(conn, [AuditEntry("command", {"n": 2})])

    await store.records.write(together)
    assert await store.state.get("k") == "v"
    assert await get_action(store, action.id) is not None
    assert [(r["seq"], r["data"]) async for r in store.reader.iter()] == [(1, {"n": 2})]


async def test_sequence_continues_after_reopen(store: Store) -> None:
    await store.queue.ingest("t1", [ev(1), ev(2)])
    url = store.db.engine.url.render_as_string(hide_password=False)
    await store.close()
    # The audit keyring and signing key are what make the encrypted records readable.
    reopened = await Store.open(
        url, StoreSettings(keyring=store.keyring, signing_key=store.signing_key)
    )
    try:
        await reopened.queue.ingest("t2", [ev(3)])
        await reopened.records.append([AuditEntry("command", {"c": 1})])
        seqs = [r["seq"] async for r in reopened.reader.iter()]
        assert seqs == [1, 2, 3, 4]
        # The txnId is remembered across restarts: a retry stores nothing twice ...
        assert (await reopened.queue.ingest("t1", [ev(1), ev(2)])).duplicate
        # ... but a homeserver that restarted its txnIds may reuse one with new events.
        reused = await reopened.queue.ingest("t1", [ev(9)])
        assert not reused.duplicate and reused.stored == 1
    finally:
        await reopened.close()


async def test_action_lifecycle(store: Store) -> None:
    a = NewAction("send_notice", {"body": "hi"}, room_id="!r:x")
    await store.actions.enqueue([a])
    [due] = await store.actions.due(now=10**12)
    assert due.id == a.id and due.payload == {"body": "hi"}
    await store.actions.finish(a.id, status="pending", attempts=1, next_at=10**13, error="HTTP 502")
    assert await store.actions.due(now=10**12) == []
    assert await store.actions.next_time() == 10**13
    await store.actions.finish(
        a.id, status="failed", attempts=2, error="forbidden", audit=AuditEntry("action", {"o": 1})
    )
    stats = await store.stats.snapshot()
    assert (stats.actions_pending, stats.actions_failed) == (0, 1)
    [failed] = await actions_by_status(store, "failed")
    assert failed.last_error == "forbidden"


async def test_rooms(store: Store) -> None:
    await store.rooms.upsert("!a:x", joined=True)
    await store.rooms.upsert("!a:x", lacking="send state events")
    await store.rooms.upsert("!b:x")
    rooms = {r["room_id"]: r for r in await store.rooms.known()}
    assert rooms["!a:x"]["joined"] is True
    assert rooms["!a:x"]["lacking"] == "send state events"
    assert rooms["!b:x"]["joined"] is False


async def test_database_errors_do_not_quote_parameters(store: Store) -> None:
    """Errors get logged (``%s``): they may show the SQL, never the values bound to it."""
    import pytest
    from sqlalchemy import text
    from sqlalchemy.exc import SQLAlchemyError

    with pytest.raises(SQLAlchemyError) as info:
        async with store.db.engine.begin() as conn:
            await conn.execute(
                text("INSERT INTO no_such_table (x) VALUES (:v)"), {"v": "parameter-secret"}
            )
    assert "no_such_table" in str(info.value)
    assert "parameter-secret" not in str(info.value)
