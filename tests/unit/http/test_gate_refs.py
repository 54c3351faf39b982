"""Every refusal of the gate has a reference ID: in its audit record and in what the gate
reports to ``on_blocked`` (the sender's notice names it); rule options reach the finding."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from bridge import metrics
from bridge.archive.sink import AuditSink
from bridge.config import ConfigError
from bridge.http.gate import Gate
from bridge.pipeline.live_policy import build_engine
from bridge.policy.model import Verdict
from bridge.store import Store
from tests.kit.config import make_config

TOKEN = "gate-token-xxxxxxxxxxxxxxxxxxxxx"
BASE = "/_bridge/antispam"


def message(body: str) -> dict[str, Any]:
    return {
        "event_id": "$e",
        "room_id": "!r:corp.example",
        "sender": "@joe:corp.example",
        "type": "m.room.message",
        "content": {"msgtype": "m.text", "body": body},
    }


async def test_the_refusals_reference_is_in_its_audit_record_and_reported(
    tmp_path: Path,
) -> None:
    config = make_config(
        {
            "homeserver": {"domain": "corp.example"},
            "dlp": {
                "detectors": {"card": {"action": "block", "notify_sender": False}},
                "keywords": [{"name": "secret", "keywords": ["nightingale"]}],
            },
        },
        base_dir=tmp_path,
    )
    engine = build_engine(config)
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'gate.db'}")
    sink = AuditSink(store)
    sink_task = asyncio.ensure_future(sink.run())
    reported: list[tuple[Mapping[str, Any], Verdict]] = []
    app = web.Application()
    gate = Gate(BASE, TOKEN, lambda: engine, sink, lambda s, v: reported.append((s, v)))
    app.add_routes(gate.routes())
    try:
        async with TestClient(TestServer(app)) as client:
            for body in ("card 4111 1111 1111 1111", "project nightingale", "hello"):
                await client.post(
                    f"{BASE}/check_event_for_spam",
                    json={"event": message(body)},
                    headers={"Authorization": f"Bearer {TOKEN}"},
                )
            records = [rec async for rec in store.reader.iter(kind="gate")]
    finally:
        sink_task.cancel()
        await store.close()
    assert len(reported) == 2
    refs = [s["ref"] for s, _ in reported]
    assert len(set(refs)) == 2
    assert [r["data"]["subject"]["ref"] for r in records] == refs
    card, keyword = (v.first_block for _, v in reported)
    assert card is not None and keyword is not None
    assert card.notify_sender is False
    assert keyword.notify_sender is True


@pytest.mark.parametrize(
    "dlp",
    [
        {"detectors": {"card": {"action": "block", "notify_sender": "no"}}},
        {"detectors": {"card": {"action": "block", "loud": True}}},
        {"keywords": [{"name": "k", "keywords": ["x"], "notify_sender": 0}]},
        {"regexes": [{"name": "r", "pattern": "x", "notify_sender": "false"}]},
    ],
)
def test_bad_rule_options_are_refused(tmp_path: Path, dlp: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        make_config({"dlp": dlp}, base_dir=tmp_path)


def test_a_regex_rule_can_opt_out(tmp_path: Path) -> None:
    config = make_config(
        {"dlp": {"regexes": [{"name": "t", "pattern": "SEC-[0-9]+", "notify_sender": False}]}},
        base_dir=tmp_path,
    )
    verdict = build_engine(config).check_event(message("see SEC-1234"))
    assert verdict.first_block is not None and verdict.first_block.notify_sender is False


async def test_an_override_lets_exactly_that_message_through_once(tmp_path: Path) -> None:
    from bridge.policy.overrides import Grant, OverrideBook, content_digest

    config = make_config(
        {
            "homeserver": {"domain": "corp.example"},
            "dlp": {"detectors": {"card": {"action": "block", "overridable": True}}},
        },
        base_dir=tmp_path,
    )
    engine = build_engine(config)
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'gate.db'}")
    sink = AuditSink(store)
    sink_task = asyncio.ensure_future(sink.run())
    reported: list[Mapping[str, Any]] = []
    book = OverrideBook()
    gate = Gate(BASE, TOKEN, lambda: engine, sink, lambda s, _v: reported.append(s), book)
    app = web.Application()
    app.add_routes(gate.routes())
    text = "card 4111 1111 1111 1111"
    statuses = []
    labels = {"callback": "check_event_for_spam", "result": "allow", "rule": "override"}
    before = metrics.REGISTRY.get_sample_value("bridge_gate_decisions_total", labels) or 0.0
    try:
        async with TestClient(TestServer(app)) as client:

            async def send(body: str, room: str = "!r:corp.example") -> int:
                r = await client.post(
                    f"{BASE}/check_event_for_spam",
                    json={"event": {**message(body), "room_id": room}},
                    headers={"Authorization": f"Bearer {TOKEN}"},
                )
                return r.status

            statuses.append(await send(text))
            digest = reported[0]["digest"]
            assert digest == content_digest(TOKEN, message(text))
            book.add(Grant("AAAA-BBBB", "@joe:corp.example", "!r:corp.example", digest,
                           "detector:card", 1e12, "needed"))  # fmt: skip
            statuses.append(await send(text, "!other:corp.example"))  # another room
            statuses.append(await send(text + " "))  # another text
            statuses.append(await send(text))  # the one resend
            statuses.append(await send(text))  # used up
            await sink.flush()
            used = [rec async for rec in store.reader.iter(kind="override")]
    finally:
        sink_task.cancel()
        await store.close()
    assert statuses == [403, 403, 403, 200, 403]
    after = metrics.REGISTRY.get_sample_value("bridge_gate_decisions_total", labels)
    assert after == before + 1  # the one use is counted as allowed, not refused
    [record] = used
    assert record["data"]["ref"] == "AAAA-BBBB" and record["data"]["justification"] == "needed"
