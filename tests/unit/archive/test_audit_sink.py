"""The gate's audit sink: batched commits, and refusals that wait for theirs."""

from __future__ import annotations

import asyncio

from bridge.archive.sink import AuditSink
from bridge.store import AuditEntry, Store, StoreUnavailable
from tests.conftest import in_background


def entry(i: int) -> AuditEntry:
    return AuditEntry(kind="gate", room_id="!r:x", data={"decision": "deny", "n": i})


async def gate_records(store: Store) -> list[int]:
    return [r["data"]["n"] async for r in store.reader.iter(kind="gate")]


async def test_record_returns_once_committed_and_groups_concurrent_refusals(store: Store) -> None:
    sink = AuditSink(store)
    commits = 0
    append = store.records.append

    async def counting(entries: list[AuditEntry], *a: object, **k: object) -> None:
        nonlocal commits
        commits += 1
        await append(entries)

    store.records.append = counting  # type: ignore[method-assign]
    async with in_background(sink.run()):
        results = await asyncio.gather(*(sink.record(entry(i), within=30) for i in range(20)))
    assert results == [True] * 20
    assert sorted(await gate_records(store)) == list(range(20))
    assert commits < 20  # refusals arriving together share a commit


async def test_record_gives_up_waiting_but_keeps_the_record(store: Store) -> None:
    sink = AuditSink(store)
    down = True
    append = store.records.append

    async def flaky(entries: list[AuditEntry], *a: object, **k: object) -> None:
        if down:
            raise StoreUnavailable("database down")
        await append(entries)

    store.records.append = flaky  # type: ignore[method-assign]
    async with in_background(sink.run()):
        assert await sink.record(entry(1), within=0.2) is False
        assert sink.pending == 1
        down = False
        await sink.flush()
    assert sink.pending == 0
    assert await gate_records(store) == [1]


async def test_a_record_dropped_from_a_full_buffer_says_so(store: Store) -> None:
    sink = AuditSink(store, max_buffer=2)  # not serving: nothing is written
    waiting = asyncio.create_task(sink.record(entry(1), within=30))
    await asyncio.sleep(0)
    sink.submit(entry(2))
    sink.submit(entry(3))  # pushes the oldest (the waiting refusal's) out
    assert await waiting is False
    assert sink.dropped == 1 and sink.pending == 2
