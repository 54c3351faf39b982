"""The management room: bootstrap (alias, stored, created) and the notices posted there."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from mautrix.errors import make_request_error

from bridge.commands import Reply
from bridge.pipeline import management
from bridge.pipeline.management import MANAGEMENT_ROOM_KEY, ManagementRoom
from bridge.policy.model import Action, Finding, Verdict
from bridge.scheduler import Scheduler
from bridge.store import NewAction, Store
from tests.kit.config import make_config

ADMIN = "@boss:corp.example"


class Client:
    def __init__(self, *, join_fails: bool = False) -> None:
        self.joined: list[str] = []
        self.created: list[dict[str, Any]] = []
        self.join_fails = join_fails
        self.gate_down = 0

    async def resolve_room_alias(self, alias: str) -> Any:
        assert alias == "#mgmt:corp.example"
        return SimpleNamespace(room_id="!resolved:corp.example")

    async def join_room_by_id(self, room: str) -> None:
        if self.join_fails:
            raise make_request_error(http_status=403, text="", errcode="M_FORBIDDEN", message="no")
        self.joined.append(room)

    async def create_room(self, **kw: Any) -> str:
        self.created.append(kw)
        if self.gate_down > 0:  # Synapse's module failing closed: the gate is not reachable
            self.gate_down -= 1
            raise make_request_error(
                http_status=403, text="", errcode="M_UNKNOWN", message="try again later"
            )
        return "!new:corp.example"


def _bridge_config(tmp_path: Path, room: str = "") -> Any:
    return make_config(
        {
            "bridge": {
                "management_room": room,
                "permissions": {ADMIN: "admin", "@*:corp.example": "admin", "@a:x": "auditor"},
            },
        },
        base_dir=tmp_path,
    ).bridge


async def _joined(store: Store) -> set[str]:
    return {r["room_id"] for r in await store.rooms.known() if r["joined"]}


async def test_bootstrap_resolves_a_configured_alias(store: Store, tmp_path: Path) -> None:
    client = Client()
    cfg = _bridge_config(tmp_path, "#mgmt:corp.example")
    room = await management.bootstrap(client, store, cfg)  # type: ignore[arg-type]
    assert room == "!resolved:corp.example" and client.joined == [room]
    assert await _joined(store) == {room}
    assert not client.created


async def test_bootstrap_reuses_the_stored_room(store: Store, tmp_path: Path) -> None:
    await store.state.set(MANAGEMENT_ROOM_KEY, "!old:corp.example")
    client = Client(join_fails=True)  # logged, not fatal
    room = await management.bootstrap(client, store, _bridge_config(tmp_path))  # type: ignore[arg-type]
    assert room == "!old:corp.example" and not client.created
    assert await management.known_room(store, "") == "!old:corp.example"
    assert await management.known_room(store, "!cfg:corp.example") == "!cfg:corp.example"


async def test_bootstrap_creates_a_room_and_invites_the_admins(
    store: Store, tmp_path: Path
) -> None:
    client = Client()
    room = await management.bootstrap(client, store, _bridge_config(tmp_path))  # type: ignore[arg-type]
    assert room == "!new:corp.example"
    [created] = client.created
    assert created["invitees"] == [ADMIN]  # not patterns, not auditors
    assert created["power_level_override"] == {"users": {ADMIN: 100}}
    assert await store.state.get(MANAGEMENT_ROOM_KEY) == room
    assert await _joined(store) == {room}


async def test_notices_go_to_the_room_once_known() -> None:
    sent: list[list[NewAction]] = []

    async def submit(actions: list[NewAction]) -> None:
        sent.append(actions)

    scheduler = Scheduler()
    mgmt = ManagementRoom(submit, scheduler)
    await mgmt.notify(Reply.plain("nobody hears this"))
    assert sent == []
    mgmt.room_id = "!m:x"
    await mgmt.notify(Reply.plain("hello"))
    action = SimpleNamespace(kind="redact")
    await mgmt.report_failure(action, "no power")  # type: ignore[arg-type]
    for quiet in ("send_notice", "reconcile"):
        await mgmt.report_failure(SimpleNamespace(kind=quiet), "x")  # type: ignore[arg-type]
    bodies = [a[0].payload["body"] for a in sent]
    assert bodies == ["hello", "⚠️ redact failed: no power"]
    assert all(a[0].room_id == "!m:x" for a in sent)


async def test_a_gate_block_with_notify_is_posted_in_the_background() -> None:
    sent: list[list[NewAction]] = []
    release = asyncio.Event()

    async def submit(actions: list[NewAction]) -> None:
        await release.wait()
        sent.append(actions)

    scheduler = Scheduler()
    mgmt = ManagementRoom(submit, scheduler, "!m:x")
    finding = Finding(
        rule="keyword:secret", category="dlp", actions=frozenset({Action.NOTIFY}), message="m"
    )
    silent = Finding(
        rule="keyword:other", category="dlp", actions=frozenset({Action.BLOCK}), message="m"
    )
    subject = {"sender": "@joe:x", "room_id": "!r:x"}
    mgmt.gate_blocked(subject, Verdict(findings=(silent,)))
    assert scheduler.running == []
    mgmt.gate_blocked(subject, Verdict(findings=(finding, silent)))
    [task] = scheduler.running
    assert task.get_name() == "gate-notice"
    release.set()
    await scheduler.wait()
    [[action]] = sent
    assert "keyword:secret" in action.payload["body"] and "@joe:x" in action.payload["body"]
    assert "keyword:other" not in action.payload["body"]


async def test_bootstrap_waits_while_the_homeservers_gate_cannot_answer(
    store: Store, tmp_path: Path, monkeypatch: Any
) -> None:
    """Behind a load balancer a new leader may create the room before the balancer sees any
    replica ready: Synapse's module then refuses with M_UNKNOWN. That is retried."""
    monkeypatch.setattr(management.asyncio, "sleep", _no_sleep)
    client = Client()
    client.gate_down = 3
    room = await management.bootstrap(client, store, _bridge_config(tmp_path))  # type: ignore[arg-type]
    assert room == "!new:corp.example" and len(client.created) == 4


async def test_bootstrap_gives_up_when_its_patience_is_spent(
    store: Store, tmp_path: Path, monkeypatch: Any
) -> None:
    monkeypatch.setattr(management.asyncio, "sleep", _no_sleep)
    monkeypatch.setattr(management, "GATE_PATIENCE_S", 0.0)
    client = Client()
    client.gate_down = 1
    try:
        await management.bootstrap(client, store, _bridge_config(tmp_path))  # type: ignore[arg-type]
    except Exception as e:
        assert getattr(e, "errcode", None) == "M_UNKNOWN"
    else:
        raise AssertionError("a refusal past the patience must reach the caller")
    assert len(client.created) == 1


async def _no_sleep(_: float) -> None:
    return None
