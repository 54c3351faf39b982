"""The gate on a DLP refusal: 403 with the rule, the audit record committed first, metrics."""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from bridge import metrics
from bridge.archive.sink import AuditSink
from bridge.http.gate import Gate
from bridge.pipeline.live_policy import build_engine
from bridge.store import Store
from tests.kit.config import make_config

TOKEN = "gate-token-xxxxxxxxxxxxxxxxxxxxx"
BASE = "/_bridge/antispam"


def hits(rule: str, path: str) -> float:
    value = metrics.REGISTRY.get_sample_value("bridge_dlp_hits_total", {"rule": rule, "path": path})
    return value or 0.0


async def test_a_refusal_is_audited_before_the_answer_and_counted_at_the_gate(
    tmp_path: Path,
) -> None:
    config = make_config(
        {
            "homeserver": {"domain": "corp.example"},
            "dlp": {"detectors": {"card": "block"}},
        },
        base_dir=tmp_path,
    )
    engine = build_engine(config)
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'gate.db'}")
    sink = AuditSink(store)
    sink_task = asyncio.ensure_future(sink.run())
    app = web.Application()
    app.add_routes(Gate(BASE, TOKEN, lambda: engine, sink).routes())
    before = hits("detector:card", "gate")
    try:
        async with TestClient(TestServer(app)) as client:
            event = {
                "event_id": "$card",
                "room_id": "!r:corp.example",
                "sender": "@joe:corp.example",
                "type": "m.room.message",
                "content": {"msgtype": "m.text", "body": "card 4111 1111 1111 1111 12/26"},
            }
            r = await client.post(
                f"{BASE}/check_event_for_spam",
                json={"event": event},
                headers={"Authorization": f"Bearer {TOKEN}"},
            )
            assert r.status == 403
            assert "detector:card" in (await r.json())["error"]
            # Committed before the 403 was sent: readable at once, no flush needed.
            [record] = [rec async for rec in store.reader.iter(kind="gate")]
            assert record["data"]["decision"] == "deny"
            assert record["data"]["subject"]["event_id"] == "$card"
            assert sink.pending == 0
    finally:
        sink_task.cancel()
        await store.close()
    assert hits("detector:card", "gate") == before + 1
    # The excerpt is masked as card numbers are (first and last four digits at most).
    assert "4111 1111 1111 1111" not in str(record["data"]["findings"])
    assert "****" in record["data"]["findings"][0]["excerpt"]
