"""The real gate on DLP: refusals (audited first, counted), every evasion family, innocent text
allowed, the 64 KiB limit, and heavy calls that hold up nothing else."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from bridge import metrics
from bridge.archive.sink import AuditSink
from bridge.http.gate import INLINE_JUDGE_BYTES, MAX_REQUEST_BYTES, Gate
from bridge.http.health import HealthInfo, health_routes
from bridge.http.transactions import AppserviceAPI
from bridge.pipeline.live_policy import build_engine
from bridge.policy.model import Verdict
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


# --- evasion families through the real gate ------------------------------------------------

CARD_TEXT = "4111 1111 1111 1111"


def _config(tmp_path: Path) -> Any:
    return make_config(
        {
            "gate": {"token": TOKEN},
            "dlp": {
                "detectors": {"card": "block"},
                "keywords": [
                    {"name": "codenames", "keywords": ["project nightingale", "falcon", "c++"]}
                ],
            },
        },
        base_dir=tmp_path,
    )


@pytest.fixture
async def gate_client(tmp_path: Path) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    engine = build_engine(_config(tmp_path))
    app = web.Application(client_max_size=4 << 20)
    app.add_routes(Gate(BASE, TOKEN, lambda: engine, None).routes())
    async with TestClient(TestServer(app)) as client:
        yield client


def _event(content: dict[str, Any], etype: str = "m.room.message", **extra: Any) -> dict[str, Any]:
    return {
        "event_id": "$e",
        "room_id": "!r:corp.example",
        "sender": "@joe:corp.example",
        "type": etype,
        "content": content,
        **extra,
    }


async def _check(client: TestClient[web.Request, web.Application], event: Any) -> Any:
    r = await client.post(
        f"{BASE}/check_event_for_spam",
        json={"event": event},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    return r.status, await r.json()


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        # combining marks on the letters (composing into accented letters or stacked)
        ("the proje\u0301ct nighti\u0300nga\u0308le", "keyword:codenames"),
        ("f\u0336a\u0336l\u0336c\u0336o\u0336n\u0336", "keyword:codenames"),
        # bidirectional override: typed reversed, displayed as the keyword
        ("see \u202enoclaf\u202c now", "keyword:codenames"),
        ("\u202etegdub elagnithgin tcejorp\u202c", "keyword:codenames"),
        # TR39 look-alikes: other Latin letters, small capitals, other scripts
        ("project n\u0131ght\u0131ngale", "keyword:codenames"),  # dotless i
        ("f\u0251lcon", "keyword:codenames"),  # Latin alpha
        ("ᴘʀᴏᴊᴇᴄᴛ ɴɪɢʜᴛɪɴɢᴀʟᴇ", "keyword:codenames"),  # small capitals
        ("falc\u0585n", "keyword:codenames"),  # Armenian oh
        ("\u0455\u0435\u0441r\u0435t falc\u043en", "keyword:codenames"),  # Cyrillic
        ("\U0001d41f\U0001d41a\U0001d425\U0001d41c\U0001d428\U0001d427", "keyword:codenames"),
        ("FALCON", "keyword:codenames"),
        # phrase words joined by punctuation or symbols instead of spaces
        ("project.nightingale", "keyword:codenames"),
        ("project_-_nightingale", "keyword:codenames"),
        ("project/nightingale", "keyword:codenames"),
        ("project\u2022\u2022nightingale", "keyword:codenames"),
        ("we use c++ here", "keyword:codenames"),
        # cards with any common separator
        ("card 4111.1111.1111.1111", "detector:card"),
        ("card 4111 - 1111 - 1111 - 1111", "detector:card"),
        ("card 4111/1111/1111/1111", "detector:card"),
        ("card 4111\u20131111\u20131111\u20131111 exp 12/26", "detector:card"),
        ("card \u202e1111 1111 1111 1114\u202c", "detector:card"),  # shown as 4111 ...
    ],
)
async def test_evasions_are_refused(
    gate_client: TestClient[web.Request, web.Application], text: str, rule: str
) -> None:
    status, body = await _check(gate_client, _event({"msgtype": "m.text", "body": text}))
    assert status == 403, text
    assert rule in body["error"]


@pytest.mark.parametrize(
    "event",
    [
        # a custom key, a nested object, a list inside a custom object
        _event({"body": "hi", "com.example.note": "project nightingale"}),
        _event({"body": "hi", "x": {"y": {"z": ["ok", {"w": "falcon"}]}}}),
        _event({"msgtype": "m.text", "body": "hi", "data": {"card": CARD_TEXT}}),
        # custom event types: their content, and the state key of custom state events
        _event({"anything": "falcon"}, "com.example.custom"),
        _event({}, "com.example.state", state_key="project nightingale"),
        _event({"x": 1}, "com.example.state", state_key=f"card {CARD_TEXT}"),
    ],
)
async def test_text_outside_the_usual_fields_is_read(
    gate_client: TestClient[web.Request, web.Application], event: dict[str, Any]
) -> None:
    status, body = await _check(gate_client, event)
    assert status == 403, event
    assert body["errcode"] == "M_FORBIDDEN"


@pytest.mark.parametrize(
    "text",
    [
        "Café crème brûlée in Zürich, Łódź and São Paulo, naïve façade",
        "Привет, как дела? Встретимся в Москве завтра.",
        "Γεια σου, τι κάνεις; Καλημέρα από την Αθήνα.",
        "こんにちは、明日の会議は十時からです。",
        "مرحبا كيف حالك؟ نلتقي غدا",
        "שלום, מה שלומך? נתראה מחר",
        "Call me on +44 20 7946 0958 or +1 (415) 555-2671, fax 030/1234-5678",
        "Meeting 2026-12-04 10:30, then 04/12/2026 and 12.04.2026",
        "Servers 192.168.100.200, 10.0.0.1 and 2001:db8::8a2e:370:7334",
        "Order #2024-118-7734-0091 shipped; invoice 2024/11/87/7340 paid",
        "Tracking 1Z 999 AA1 01 2345 6784, ticket SEC-12345",
        "Prices 1.99 2.49 3.99 4.49 5.99 6.49 7.99",
        "falconry is a sport; nightingales sing; project nightingales",
        "Das Projekt läuft gut, die Nachtigall singt",
    ],
)
async def test_innocent_text_is_allowed(
    gate_client: TestClient[web.Request, web.Application], text: str
) -> None:
    status, body = await _check(gate_client, _event({"msgtype": "m.text", "body": text}))
    assert (status, body) == (200, {}), text


# --- size and cost ---------------------------------------------------------------------------


async def test_an_event_over_synapses_limit_is_refused_up_front(
    gate_client: TestClient[web.Request, web.Application],
) -> None:
    # 21 000 three-byte characters: 63 000 bytes as Synapse counts them (the request, with
    # its \u20ac escapes, is twice as big), allowed ...
    ok = _event({"msgtype": "m.text", "body": "€" * 21_000})
    assert (await _check(gate_client, ok))[0] == 200
    # ... 22 000 are 66 000 bytes: over 64 KiB, refused without judging.
    status, body = await _check(gate_client, _event({"body": "€" * 22_000}))
    assert status == 413
    assert body["errcode"] == "M_TOO_LARGE"
    assert "65536" in body["error"]
    # A request too big to hold any legal event is refused before its body is read.
    r = await gate_client.post(
        f"{BASE}/check_event_for_spam",
        data=b"x" * (MAX_REQUEST_BYTES + 1),
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    assert r.status == 413
    assert (await r.json())["errcode"] == "M_TOO_LARGE"


class _SlowOnLargeEvents:
    """A policy engine whose judgement of a large event waits until the test releases it."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def check_event(self, event: dict[str, Any]) -> Verdict:
        if len(str(event.get("content"))) > INLINE_JUDGE_BYTES:
            self.entered.set()
            assert self.release.wait(30)
        return Verdict()


async def test_a_heavy_gate_call_does_not_hold_up_other_requests(tmp_path: Path) -> None:
    slow = _SlowOnLargeEvents()
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'gate.db'}")
    app = web.Application(client_max_size=4 << 20)
    gate = Gate(BASE, TOKEN, lambda: slow, None)  # type: ignore[arg-type,return-value]
    app.add_routes(gate.routes())
    app.add_routes(AppserviceAPI(store, "hs").routes())
    app.add_routes(health_routes(lambda: True, HealthInfo("t", 0.0, store.db.backend)))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        async with TestClient(TestServer(app)) as client:
            heavy = asyncio.ensure_future(
                client.post(
                    f"{BASE}/check_event_for_spam",
                    json={"event": _event({"body": "x" * 50_000})},
                    headers=auth,
                )
            )
            while not slow.entered.is_set():  # the heavy call is being judged now
                await asyncio.sleep(0.01)
            small = await _check(client, _event({"body": "hello"}))
            ping = await client.post(f"{BASE}/ping", json={"id": "p"}, headers=auth)
            live = await client.get("/_bridge/health/live")
            txn = await client.put(
                "/_matrix/app/v1/transactions/t1",
                json={"events": []},
                headers={"Authorization": "Bearer hs"},
            )
            # All answered while the heavy call is still waiting in its judge.
            assert not heavy.done()
            assert small == (200, {})
            assert (ping.status, live.status, txn.status) == (200, 200, 200)
            slow.release.set()
            assert (await heavy).status == 200
    finally:
        slow.release.set()
        gate.close()
        await store.close()
