"""Replicas on one PostgreSQL database: one chain from concurrent writers, the leader
lease and its fence, change notices, and one process per SQLite file."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from bridge.archive.cli import verify_store
from bridge.scheduler import Scheduler, in_leader_task
from bridge.store import NewAction, Store, StoreSettings
from bridge.store.changes import APPLICATION_NAME, EVERYTHING, ChangeFeed
from bridge.store.lease import Lease, LeaseLost, LeaseTiming, Role
from bridge.store.process_lock import DatabaseInUse, SqliteProcessLock
from bridge.store.queue import AlreadyProcessed
from bridge.store.schema import actions, records
from tests.conftest import fresh_store_url

FAST = LeaseTiming(ttl=1.0, renew=0.2, poll=0.1, margin=0.3)


@pytest.fixture
async def two_stores(tmp_path: Path) -> AsyncIterator[tuple[Store, Store]]:
    """Two stores (two engines, two in-memory chain heads) on one PostgreSQL database,
    sharing the keyring and signing key as replicas do."""
    url = await fresh_store_url("postgresql", tmp_path)
    a = await Store.open(url)
    b = await Store.open(url, StoreSettings(keyring=a.keyring, signing_key=a.signing_key))
    yield a, b
    await b.close()
    await a.close()


def events(tag: str, n: int) -> list[dict[str, object]]:
    return [
        {
            "event_id": f"${tag}-{i}",
            "room_id": f"!room{i % 3}:x",
            "sender": "@u:x",
            "type": "m.room.message",
            "origin_server_ts": 1_700_000_000_000 + i,
            "content": {"body": f"hello {tag} {i}"},
        }
        for i in range(n)
    ]


async def test_concurrent_writers_on_two_engines_make_one_valid_chain(
    two_stores: tuple[Store, Store],
) -> None:
    a, b = two_stores

    async def ingest(store: Store, tag: str) -> None:
        for t in range(25):
            await store.queue.ingest(f"{tag}-{t}", events(f"{tag}{t}", 4))
            await store.records.append([])  # no-op appends must not disturb anything

    async def audit(store: Store, tag: str) -> None:
        from bridge.audit.kinds import AuditKind
        from bridge.store import AuditEntry

        for i in range(25):
            await store.records.append([AuditEntry(AuditKind.DECISION, {"i": i, "t": tag})])

    await asyncio.gather(ingest(a, "a"), ingest(b, "b"), audit(a, "x"), audit(b, "y"))
    async with a.db.connect() as conn:
        count, top = (await conn.execute(select(func.count(), func.max(records.c.seq)))).one()
    assert count == top == 2 * 25 * 4 + 2 * 25  # every record, seqs without a gap
    await a.records.checkpoint()
    report = await verify_store(a.db.engine, [a.signing_key.public_key()], None)
    assert report.ok, report


async def test_a_worker_commit_over_work_another_worker_marked_is_rolled_back(
    two_stores: tuple[Store, Store],
) -> None:
    a, b = two_stores
    await a.queue.ingest("t1", events("q", 2))
    (item,) = await a.queue.pending()
    (seen_by_b,) = await b.queue.pending()
    assert seen_by_b.queue_id == item.queue_id
    notice = NewAction("send_notice", {"body": "once"}, "!room0:x")
    await a.queue.complete([item.queue_id], [notice])
    with pytest.raises(AlreadyProcessed):
        await b.queue.complete([item.queue_id], [notice])
    async with a.db.connect() as conn:
        assert (await conn.execute(select(func.count()).select_from(actions))).scalar() == 1


@pytest.fixture
async def pg_store(tmp_path: Path) -> AsyncIterator[Store]:
    store = await Store.open(await fresh_store_url("postgresql", tmp_path))
    yield store
    await store.close()


async def test_one_holder_at_a_time_and_the_fence_refuses_the_other(pg_store: Store) -> None:
    a, b = Lease(pg_store.db, "a", FAST), Lease(pg_store.db, "b", FAST)
    assert await a.try_acquire()
    assert not await b.try_acquire()
    assert (a.role, b.role) == (Role.LEADER, Role.FOLLOWER)
    async with pg_store.db.transaction() as conn:
        await a.fence(conn)
    with pytest.raises(LeaseLost):
        async with pg_store.db.transaction() as conn:
            await b.fence(conn)
    assert await a.try_acquire()  # renewing keeps the epoch
    assert a.epoch == 1


async def test_a_holder_that_stops_renewing_steps_down_before_the_takeover(
    pg_store: Store,
) -> None:
    a, b = Lease(pg_store.db, "a", FAST), Lease(pg_store.db, "b", FAST)
    assert await a.try_acquire()
    while not await b.try_acquire():
        await asyncio.sleep(0.02)
    took_over = time.monotonic()
    assert a.role is Role.FOLLOWER  # its own deadline passed before the row expired
    assert b.epoch == 2
    assert took_over - time.monotonic() < FAST.ttl + FAST.poll
    with pytest.raises(LeaseLost):
        async with pg_store.db.transaction() as conn:
            await a.fence(conn)


async def test_a_takeover_waits_for_the_deposed_leaders_open_commit(pg_store: Store) -> None:
    """The fence's share lock: a leader's transaction that passed the fence finishes
    (commit or rollback) before a successor's term can begin."""
    a, b = Lease(pg_store.db, "a", FAST), Lease(pg_store.db, "b", FAST)
    assert await a.try_acquire()
    async with pg_store.db.transaction() as conn:
        await a.fence(conn)
        await asyncio.sleep(FAST.ttl + 0.2)  # the row has expired meanwhile
        takeover = asyncio.create_task(b.try_acquire())
        await asyncio.sleep(0.5)
        assert not takeover.done()  # blocked by the share lock
    assert await takeover
    assert b.epoch == 2


async def test_a_deposed_leaders_task_cannot_commit_while_ingest_goes_on(
    pg_store: Store,
) -> None:
    """The fence as the bridge installs it: writes from leader tasks check the lease,
    writes from anywhere else (ingest, the gate's audit records) do not."""
    lease = Lease(pg_store.db, "a", FAST)

    async def fence(conn: AsyncConnection) -> None:
        if in_leader_task():
            await lease.fence(conn)

    pg_store.db.fence = fence
    scheduler = Scheduler()
    assert await lease.try_acquire()
    await pg_store.queue.ingest("t1", events("f", 2))
    (item,) = await pg_store.queue.pending()
    successor = Lease(pg_store.db, "b", FAST)
    while not await successor.try_acquire():  # "a" stalled; "b" took over
        await asyncio.sleep(0.05)
    notice = NewAction("send_notice", {"body": "late"}, "!room0:x")
    task = scheduler.spawn_leader(pg_store.queue.complete([item.queue_id], [notice]), "worker")
    assert task is not None
    with pytest.raises(LeaseLost):
        await task
    await pg_store.queue.ingest("t2", events("g", 2))  # not a leader task: unaffected
    assert [w.txn_id for w in await pg_store.queue.pending()] == ["t1", "t2"]
    async with pg_store.db.connect() as conn:
        assert (await conn.execute(select(func.count()).select_from(actions))).scalar() == 0


async def test_run_hands_over_when_the_leader_stalls(pg_store: Store) -> None:
    events_seen: list[str] = []
    a, b = Lease(pg_store.db, "a", FAST), Lease(pg_store.db, "b", FAST)

    def recorder(name: str) -> tuple[object, object]:
        async def elected(epoch: int) -> None:
            events_seen.append(f"{name} elected {epoch}")

        async def deposed() -> None:
            events_seen.append(f"{name} deposed")

        return elected, deposed

    ea, da = recorder("a")
    eb, db = recorder("b")
    task_a = asyncio.create_task(a.run(ea, da))  # type: ignore[arg-type]
    while a.role is not Role.LEADER:
        await asyncio.sleep(0.02)
    task_b = asyncio.create_task(b.run(eb, db))  # type: ignore[arg-type]
    await asyncio.sleep(0.5)
    assert events_seen == ["a elected 1"]

    async def stalled() -> bool:  # the leader's database connection hangs
        await asyncio.sleep(3600)
        return True

    a.try_acquire = stalled  # type: ignore[method-assign]
    started = time.monotonic()
    while "b elected 2" not in events_seen:
        await asyncio.sleep(0.02)
        assert time.monotonic() - started < 5
    assert events_seen == ["a elected 1", "a deposed", "b elected 2"]
    for t in (task_a, task_b):
        t.cancel()
    await asyncio.gather(task_a, task_b, return_exceptions=True)


async def test_state_changes_reach_listeners_after_commit_only(pg_store: Store) -> None:
    got: list[tuple[str, float]] = []

    async def on_change(topic: str) -> None:
        got.append((topic, time.monotonic()))

    feed = ChangeFeed(pg_store.db.url, on_change, resync=3600, check=0.2)
    pg_store.state.broadcast = lambda key: key.startswith("policy.")
    task = asyncio.create_task(feed.run())
    try:
        await asyncio.wait_for(feed.listening.wait(), 10)
        await asyncio.sleep(0.2)
        got.clear()  # the re-read after connecting
        await pg_store.keys.op_key()
        with pytest.raises(RuntimeError):
            async with pg_store.db.transaction() as conn:
                await pg_store.state.put(conn, "policy.dlp", "{}")
                raise RuntimeError("rolled back")
        await pg_store.state.set("notices.ledger.@u:x", "{}")  # not broadcast
        sent = time.monotonic()
        await pg_store.state.set("policy.dlp", '{"keywords": []}')
        while not got:
            await asyncio.sleep(0.01)
            assert time.monotonic() - sent < 1.0
        await asyncio.sleep(0.2)
        assert [t for t, _ in got] == ["policy.dlp"]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_the_change_feed_outlives_its_connection_and_re_reads_everything(
    pg_store: Store,
) -> None:
    got: list[str] = []

    async def on_change(topic: str) -> None:
        got.append(topic)

    feed = ChangeFeed(pg_store.db.url, on_change, resync=3600, check=0.2)
    pg_store.state.broadcast = lambda key: key.startswith("policy.")
    task = asyncio.create_task(feed.run())
    try:
        await asyncio.wait_for(feed.listening.wait(), 10)
        await asyncio.sleep(0.2)
        assert got == [EVERYTHING]
        async with pg_store.db.transaction() as conn:  # the server drops the listener
            await conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = :name AND datname = current_database()"
                ),
                {"name": APPLICATION_NAME},
            )
        while got.count(EVERYTHING) < 2:  # reconnected: whatever was missed is re-read
            await asyncio.sleep(0.05)
        await asyncio.wait_for(feed.listening.wait(), 10)
        await pg_store.state.set("policy.dlp", "{}")
        while "policy.dlp" not in got:
            await asyncio.sleep(0.05)
        assert not task.done()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_a_second_process_on_one_sqlite_file_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "bridge.db"
    lock = SqliteProcessLock(db)
    lock.acquire()
    try:
        probe = (
            "import sys; from pathlib import Path\n"
            "from bridge.store.process_lock import SqliteProcessLock, DatabaseInUse\n"
            "try:\n"
            f"    SqliteProcessLock(Path({str(db)!r})).acquire()\n"
            "except DatabaseInUse as e:\n"
            "    print(e); sys.exit(3)\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 3, done.stderr
        assert "in use by another bridge process" in done.stdout
        assert "PostgreSQL" in done.stdout
        with pytest.raises(DatabaseInUse):  # also a second lock in this process
            SqliteProcessLock(db).acquire()
    finally:
        lock.release()
    again = SqliteProcessLock(db)
    again.acquire()  # free once released (or once its process died)
    again.release()
    assert oct((tmp_path / "bridge.db.lock").stat().st_mode & 0o777) == "0o600"
