"""Gate decisions that only notify or audit are as durable as refusals: the gate answers
once their audit record is committed; while the store is down it answers at once and the
record waits in the sink (the documented fail mode)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from bridge.archive.sink import AuditSink
from bridge.http.gate import Gate
from bridge.pipeline.live_policy import build_engine
from bridge.store import AuditEntry, Store, StoreUnavailable
from tests.conftest import in_background
from tests.kit.config import make_config

TOKEN = "gate-token-xxxxxxxxxxxxxxxxxxxxx"
BASE = "/_bridge/antispam"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def card_event(n: int) -> dict[str, object]:
    return {
        "event_id": f"$card{n}",
        "room_id": "!r:corp.example",
        "sender": "@joe:corp.example",
        "type": "m.room.message",
        "content": {"msgtype": "m.text", "body": "card 4111 1111 1111 1111 12/26"},
    }


class Harness:
    def __init__(self, store: Store, sink: AuditSink, client: TestClient) -> None:  # type: ignore[type-arg]
        self.store, self.sink, self.client = store, sink, client
        self.down = False
        self.commits = 0
        append = store.records.append

        async def slow_append(entries: list[AuditEntry], *a: object, **k: object) -> None:
            if self.down:
                raise StoreUnavailable("database down")
            await asyncio.sleep(0.05)  # a slow commit: the answer must still wait for it
            await append(entries)
            self.commits += 1

        store.records.append = slow_append  # type: ignore[method-assign]

    async def send(self, n: int) -> int:
        r = await self.client.post(
            f"{BASE}/check_event_for_spam", json={"event": card_event(n)}, headers=AUTH
        )
        return r.status

    async def gate_records(self) -> list[str]:
        records = self.store.reader.iter(kind="gate")
        return [rec["data"]["subject"]["event_id"] async for rec in records]


@pytest.fixture(params=["notify", "audit"])
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    config = make_config(
        {"gate": {"token": TOKEN}, "dlp": {"detectors": {"card": request.param}}},
        base_dir=tmp_path,
    )
    engine = build_engine(config)
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'gate.db'}")
    sink = AuditSink(store)
    app = web.Application()
    app.add_routes(Gate(BASE, TOKEN, lambda: engine, sink).routes())
    try:
        async with in_background(sink.run()), TestClient(TestServer(app)) as client:
            yield Harness(store, sink, client)
    finally:
        await store.close()


async def test_a_notify_or_audit_decision_is_committed_before_the_answer(harness: Harness) -> None:
    assert await harness.send(1) == 200  # allowed: the rule only notifies or audits
    # committed before the 200 was sent: readable at once, no flush needed
    assert await harness.gate_records() == ["$card1"]
    assert harness.sink.pending == 0
    statuses = await asyncio.gather(*(harness.send(n) for n in range(2, 12)))
    assert statuses == [200] * 10
    assert sorted(await harness.gate_records()) == sorted(f"$card{n}" for n in range(1, 12))
    assert harness.commits < 11  # decisions arriving together share a commit


async def test_while_the_store_is_down_the_gate_answers_at_once(harness: Harness) -> None:
    harness.down = True
    harness.sink.store_down = True  # a flush failed: the sink knows the store is down
    assert await harness.send(1) == 200
    assert harness.sink.pending == 1  # kept in memory, written when the store is back
    harness.down = False
    await harness.sink.flush()
    assert await harness.gate_records() == ["$card1"]
