"""The checkpoint job: the chain head is signed before its oldest unsigned record is
``audit.checkpoint_interval`` old (a quarter of it early, at most 5 s), never when nothing
new was written; records another process appended are signed in time too; a tail rewritten
under a running bridge is caught.

Time is a fake clock based on the records' own archive times; sleeps are recorded, not
slept.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from sqlalchemy import func, select, text

from bridge.archive.cli import verify_store
from bridge.archive.jobs import CheckpointSigner
from bridge.audit.chain import CHECKPOINT_MISMATCH, ChainFields, record_hash
from bridge.store import AuditEntry, Store, StoreSettings, StoreUnavailable
from bridge.store.schema import checkpoints, records

INTERVAL = 60.0
DUE = 55.0  # signed 5 s early: the signing itself must not let a record pass the interval


class FakeClock:
    """Wall time in seconds, moved by the test (and by the fake sleep)."""

    def __init__(self, now_s: float) -> None:
        self.now = now_s
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def entry(i: int) -> AuditEntry:
    return AuditEntry(kind="command", room_id="!r:x", data={"n": i})


async def checkpoint_seqs(store: Store) -> list[int]:
    async with store.db.connect() as conn:
        rows = await conn.execute(select(checkpoints.c.seq).order_by(checkpoints.c.seq))
        return [r[0] for r in rows]


async def last_seq(store: Store) -> int:
    async with store.db.connect() as conn:
        return int((await conn.execute(select(func.max(records.c.seq)))).scalar() or 0)


def signer_for(store: Store, clock: FakeClock) -> CheckpointSigner:
    return CheckpointSigner(store.records, INTERVAL, clock=clock, sleep=clock.sleep)


async def test_nothing_written_nothing_signed(store: Store) -> None:
    clock = FakeClock(1_700_000_000.0)
    signer = signer_for(store, clock)
    for _ in range(3):
        clock.now += 1000
        assert await signer.round() == INTERVAL
    assert signer.signed == 0 and await checkpoint_seqs(store) == []


async def test_the_head_is_signed_once_the_oldest_unsigned_record_is_due(store: Store) -> None:
    await store.records.append([entry(1)])
    since = store.records.unsigned_since
    assert since is not None and store.records.unsigned_records == 1
    clock = FakeClock(since / 1000 + 10)
    signer = signer_for(store, clock)
    # not due yet: waits exactly until it is
    assert signer.due_s == DUE
    assert await signer.round() == DUE - 10
    assert await checkpoint_seqs(store) == []
    await store.records.append([entry(2), entry(3)])  # younger records do not move the due time
    clock.now = since / 1000 + DUE - 0.002
    await signer.round()
    assert await checkpoint_seqs(store) == []
    clock.now = since / 1000 + DUE
    await signer.round()
    assert await checkpoint_seqs(store) == [3] and signer.signed == 1
    assert store.records.unsigned_since is None and store.records.unsigned_records == 0
    # nothing new: nothing more, however long it stays quiet
    clock.now += 10 * INTERVAL
    assert await signer.round() == INTERVAL
    assert await checkpoint_seqs(store) == [3]


async def test_run_signs_every_record_within_the_interval(store: Store) -> None:
    """The loop, with sleeps recorded: each record is signed DUE after it was
    archived, and the loop never spins."""
    await store.records.append([entry(1)])
    since = store.records.unsigned_since
    assert since is not None
    clock = FakeClock(since / 1000)
    signer = signer_for(store, clock)
    rounds = 0
    real_round = signer.round

    async def counted() -> float:
        nonlocal rounds
        rounds += 1
        if rounds == 4:
            raise asyncio.CancelledError
        return await real_round()

    signer.round = counted  # type: ignore[method-assign]
    try:
        await signer.run()
    except asyncio.CancelledError:
        pass
    assert clock.sleeps[0] == DUE  # due just before one interval after the record
    assert await checkpoint_seqs(store) == [1]
    assert all(s >= 0.2 for s in clock.sleeps)


async def test_records_appended_by_another_process_are_signed_in_time(
    store: Store, tmp_path: Path
) -> None:
    await store.records.append([entry(1)])
    await store.records.checkpoint()
    # an `audit export` (a store that never signs) records itself while the bridge idles
    other = await Store.open_on(
        type(store.db).create(store.db.url.render_as_string(hide_password=False), pool_size=2),
        StoreSettings(keyring=store.keyring, sign_checkpoints=False, create=False),
    )
    try:
        await other.records.append([entry(2)])
    finally:
        await other.db.close()
    assert store.records.unsigned_since is None  # the bridge does not know yet
    clock = FakeClock(0)
    async with store.db.connect() as conn:
        ts = (await conn.execute(select(records.c.ts).where(records.c.seq == 2))).scalar()
    clock.now = ts / 1000 + 1
    signer = signer_for(store, clock)
    assert await signer.round() == DUE - 1  # adopted, due like its own records
    assert store.records.unsigned_records == 1
    clock.now = ts / 1000 + DUE
    await signer.round()
    assert await checkpoint_seqs(store) == [1, 2]
    report = await verify_store(store.db.engine, [store.signing_key.public_key()], None)
    assert report.ok and report.signed_seq == 2 and report.tail_records == 0
    await store.records.append([entry(3)])  # and the bridge goes on from the adopted head
    assert await last_seq(store) == 3


async def test_an_unsigned_tail_rewritten_under_a_running_bridge_is_caught(store: Store) -> None:
    """The job signs the head the bridge wrote (held in memory), not the database's: a tail
    rewritten with recomputed hashes before the deadline fails verification afterwards."""
    await store.records.append([entry(1), entry(2)])
    await store.records.checkpoint()
    await store.records.append([entry(3)])
    since = store.records.unsigned_since
    assert since is not None
    async with store.db.transaction() as conn:
        row = (
            await conn.execute(
                text(
                    "SELECT seq, ts, kind, event_id_idx, room_idx, sender_idx, type_idx, key_id,"
                    " nonce, ct_digest, origin_ts FROM records WHERE seq = 3"
                )
            )
        ).one()
        prev = (await conn.execute(text("SELECT hash FROM records WHERE seq = 2"))).scalar()
        forged = ChainFields(*row)._replace(origin_ts=row[10] + 1)
        await conn.execute(
            text("UPDATE records SET origin_ts = :o, hash = :h WHERE seq = 3"),
            {"o": forged.origin_ts, "h": record_hash(bytes(prev), forged)},
        )
    keys = [store.signing_key.public_key()]
    before = await verify_store(store.db.engine, keys, None)
    assert before.ok and before.tail_records == 1  # unsigned: nothing to tell yet
    clock = FakeClock(since / 1000 + INTERVAL)
    await signer_for(store, clock).round()
    after = await verify_store(store.db.engine, keys, None)
    assert not after.ok and after.problem_kind == CHECKPOINT_MISMATCH
    assert after.first_bad_seq == 3


async def test_a_database_that_is_down_is_retried(store: Store) -> None:
    await store.records.append([entry(1)])
    since = store.records.unsigned_since
    assert since is not None
    clock = FakeClock(since / 1000 + INTERVAL)
    signer = signer_for(store, clock)

    async def down(older_than: int) -> None:
        raise StoreUnavailable("database down")

    real = store.records.sign_due
    store.records.sign_due = down  # type: ignore[method-assign,assignment]
    assert await signer.round() == INTERVAL
    store.records.sign_due = real  # type: ignore[method-assign]
    await signer.round()
    assert await checkpoint_seqs(store) == [1]


async def test_a_reopened_store_knows_its_unsigned_tail(store: Store) -> None:
    """After a crash the tail is found at open (and the job signs it at once: it is old)."""
    store.records.checkpoint_every = 1000
    await store.records.append([entry(1)])
    first = store.records.unsigned_since
    store.records.reset()  # as after a restart: the head is read from the database
    await store.records.append([entry(2)])
    assert store.records.unsigned_since == first and store.records.unsigned_records == 2


async def test_a_head_another_process_signed_is_not_signed_again(store: Store) -> None:
    """(Replicas sharing a database.) The job notes the existing checkpoint and rests
    instead of retrying it."""
    await store.records.append([entry(1)])
    since = store.records.unsigned_since
    assert since is not None
    async with store.db.transaction() as conn:  # what another signer committed meanwhile
        head = (await conn.execute(select(records.c.hash).where(records.c.seq == 1))).scalar()
        await store.records.insert_checkpoint(conn, 1, bytes(head), since + 1)
    signer = signer_for(store, FakeClock(since / 1000 + INTERVAL))
    assert await signer.round() == INTERVAL
    assert signer.signed == 0 and store.records.unsigned_since is None
    assert await checkpoint_seqs(store) == [1]
