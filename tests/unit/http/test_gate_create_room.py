"""user_may_create_room and user_may_send_state_event at the real gate over HTTP: judged,
audited like every gate decision, and compatible with synapse-http-antispam's bare body."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from bridge.archive.sink import AuditSink
from bridge.http.gate import Gate
from bridge.pipeline.live_policy import build_engine
from bridge.policy.model import Verdict
from bridge.store import Store
from tests.kit.config import make_config

TOKEN = "gate-token-xxxxxxxxxxxxxxxxxxxxx"
BASE = "/_bridge/antispam"
OWN = "corp.example"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@dataclass
class Harness:
    client: TestClient[web.Request, web.Application]
    store: Store
    blocked: list[tuple[dict[str, Any], Verdict]]

    async def post(self, callback: str, body: Any) -> tuple[int, Any]:
        r = await self.client.post(f"{BASE}/{callback}", json=body, headers=AUTH)
        return r.status, await r.json()

    async def records(self) -> list[dict[str, Any]]:
        return [rec async for rec in self.store.reader.iter(kind="gate")]


@pytest.fixture
async def gate(tmp_path: Path) -> AsyncIterator[Harness]:
    config = make_config(
        {
            "homeserver": {"domain": OWN},
            "dlp": {
                "forbid_encryption": True,
                "keywords": [{"name": "codenames", "keywords": ["kingfisher"]}],
            },
            "federation": {"mode": "internal"},
        },
        base_dir=tmp_path,
    )
    engine = build_engine(config)
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'gate.db'}")
    sink = AuditSink(store)
    task = asyncio.ensure_future(sink.run())
    blocked: list[tuple[dict[str, Any], Verdict]] = []
    app = web.Application()
    gate = Gate(
        BASE, TOKEN, lambda: engine, sink, on_blocked=lambda s, v: blocked.append((dict(s), v))
    )
    app.add_routes(gate.routes())
    try:
        async with TestClient(TestServer(app)) as client:
            yield Harness(client, store, blocked)
    finally:
        task.cancel()
        await store.close()


async def test_create_room_refused_and_audited(gate: Harness) -> None:
    body = {
        "user_id": f"@alice:{OWN}",
        "room_config": {
            "is_direct": True,
            "invite": [f"@bob:{OWN}"],
            "initial_state": [{"type": "m.room.encryption", "state_key": "", "content": {}}],
        },
    }
    status, answer = await gate.post("user_may_create_room", body)
    assert status == 403
    assert answer["errcode"] == "M_FORBIDDEN"
    assert "Create the room without encryption" in answer["error"]
    [record] = await gate.records()
    assert record["data"]["callback"] == "user_may_create_room"
    assert record["data"]["decision"] == "deny"
    assert record["data"]["subject"]["is_direct"] is True
    assert record["data"]["findings"][0]["rule"] == "encryption:forbidden"
    [(subject, verdict)] = gate.blocked
    assert subject["sender"] == f"@alice:{OWN}" and subject["ref"]
    assert verdict.blocked

    status, answer = await gate.post(
        "user_may_create_room",
        {"user_id": f"@alice:{OWN}", "room_config": {"invite": ["@eve:other.example"]}},
    )
    assert status == 403 and "other.example" in answer["error"]
    status, _ = await gate.post(
        "user_may_create_room", {"user_id": f"@alice:{OWN}", "room_config": {"name": "fine"}}
    )
    assert status == 200


async def test_bare_body_of_synapse_http_antispam_is_allowed(gate: Harness) -> None:
    status, answer = await gate.post("user_may_create_room", {"user_id": f"@alice:{OWN}"})
    assert (status, answer) == (200, {})


async def test_state_event_judged_with_its_content(gate: Harness) -> None:
    body = {
        "user_id": f"@alice:{OWN}",
        "room_id": f"!r:{OWN}",
        "event_type": "m.room.topic",
        "state_key": "",
        "content": {"topic": "the kingfisher plan"},
    }
    status, answer = await gate.post("user_may_send_state_event", body)
    assert status == 403 and "keyword:codenames" in answer["error"]
    [record] = await gate.records()
    assert record["data"]["subject"]["type"] == "m.room.topic"
    assert "kingfisher plan" not in str(record["data"]["subject"])
    status, _ = await gate.post("user_may_send_state_event", {**body, "content": {"topic": "ok"}})
    assert status == 200


async def test_room_alias_judged_by_its_name(gate: Harness) -> None:
    """PUT /directory/room/{alias}: no room, so the global rules; the server part is ours."""
    body = {"user_id": f"@alice:{OWN}", "room_alias": f"#kingfisher-launch:{OWN}"}
    status, answer = await gate.post("user_may_create_room_alias", body)
    assert status == 403 and "keyword:codenames" in answer["error"]
    [record] = await gate.records()
    assert record["data"]["callback"] == "user_may_create_room_alias"
    assert "kingfisher" not in str(record["data"]["subject"])
    status, _ = await gate.post(
        "user_may_create_room_alias", {**body, "room_alias": "#launch:kingfisher.example"}
    )
    assert status == 200
    status, _ = await gate.post("user_may_create_room_alias", {"user_id": f"@alice:{OWN}"})
    assert status == 400


@pytest.mark.parametrize(
    ("callback", "body"),
    [
        ("user_may_create_room", {"user_id": 5}),
        ("user_may_create_room", {"user_id": "@a:b", "room_config": []}),
        ("user_may_send_state_event", {"user_id": "@a:b", "room_id": "!r", "event_type": "t"}),
        (
            "user_may_send_state_event",
            {"user_id": "@a:b", "room_id": "!r", "event_type": "t", "state_key": "", "content": 1},
        ),
    ],
)
async def test_malformed_bodies_are_client_errors(
    gate: Harness, callback: str, body: dict[str, Any]
) -> None:
    status, answer = await gate.post(callback, body)
    assert status == 400 and answer["errcode"] == "M_BAD_JSON"


async def test_unjudged_callbacks_are_allowed_unread(gate: Harness) -> None:
    r = await gate.client.post(
        f"{BASE}/user_may_publish_room",
        data=b"\x00\x01 not json",
        headers={**AUTH, "Content-Type": "application/octet-stream"},
    )
    assert r.status == 200 and await r.json() == {}
