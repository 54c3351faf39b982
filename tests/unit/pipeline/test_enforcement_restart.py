"""The members a federation change would remove survive a restart.

Members are learnt from reconciles (full state reads) and the event stream, kept in the
store's sealed room records, and read back by a new RoomEnforcer over the same store; the
confirmation of ``!policy federation …`` names the rooms and members the actual change
removes, also right after a restart.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from bridge.app import build_registry
from bridge.commands.registry import Reply
from bridge.pipeline.enforcement import MEMBERS_FIELD, RoomEnforcer
from bridge.pipeline.worker import Worker
from bridge.policy.federation import FederationMode, FederationPolicy
from bridge.store import Store
from tests.kit.config import make_config
from tests.kit.services import Services

OWN = "corp.example"
MGMT = f"!mgmt:{OWN}"
ROOM = f"!room:{OWN}"
OTHER = f"!other:{OWN}"
ADMIN = f"@boss:{OWN}"
INTERNAL = FederationPolicy(FederationMode.INTERNAL)
OPEN = FederationPolicy(FederationMode.OPEN)


async def _quiet(_reply: Reply) -> None:
    return None


def member(user: str, membership: str = "join") -> dict[str, Any]:
    return {"type": "m.room.member", "state_key": user, "content": {"membership": membership}}


async def test_members_survive_a_restart(store: Store) -> None:
    for room in (ROOM, OTHER):
        await store.rooms.upsert(room, joined=True)
    before = RoomEnforcer(store, lambda: 10.0, _quiet)
    # A reconcile reads the room's state, then reports its result.
    before.on_state(
        ROOM,
        [member(f"@a:{OWN}"), member("@e1:evil.example"), member("@e2:evil.example", "invite")],
    )
    await before.on_result(ROOM, {"sent": [], "kicked": [], "lacking": [], "unkickable": []})
    # The event stream: someone joins another room, someone leaves.
    before.note_member(OTHER, "@p:partner.example", "join")
    before.note_member(ROOM, "@e2:evil.example", "leave")
    await before.close()

    # Restart: a new enforcer over the same store.
    after = RoomEnforcer(store, lambda: 10.0, _quiet)
    await after.load()
    found = await after.affected(lambda _r: OPEN, lambda _r: INTERNAL, OWN, [ROOM, OTHER])
    assert found.rooms == {ROOM: ("@e1:evil.example",), OTHER: ("@p:partner.example",)}
    assert (found.members, found.servers) == (2, {"evil.example", "partner.example"})
    # Without load() (e.g. a caller that never loaded), affected reads the store itself.
    lazy = RoomEnforcer(store, lambda: 10.0, _quiet)
    assert (await lazy.affected(lambda _r: OPEN, lambda _r: INTERNAL, OWN)).rooms == found.rooms


async def test_stream_changes_are_stored_in_the_background(store: Store) -> None:
    await store.rooms.upsert(ROOM, joined=True)
    enf = RoomEnforcer(store, lambda: 10.0, _quiet)
    enf.note_member(ROOM, "@e:evil.example", "join")  # as the worker does: synchronously

    async def stored() -> dict[str, Any]:
        return (await store.rooms.data())[ROOM].get(MEMBERS_FIELD, {})

    for _ in range(200):
        if await stored():
            break
        await asyncio.sleep(0.01)
    assert await stored() == {"@e:evil.example": "join"}
    await enf.close()


async def test_member_records_keep_the_enforcement_state_and_the_other_way_round(
    store: Store,
) -> None:
    await store.rooms.upsert(ROOM, joined=True, lacking="power level 50 to kick")
    await store.rooms.update_data({ROOM: {MEMBERS_FIELD: {"@e:evil.example": "join"}}})
    await store.rooms.upsert(ROOM, lacking="power level 100 to kick")
    await store.rooms.upsert(ROOM, joined=False)
    data = (await store.rooms.data())[ROOM]
    assert data == {
        "joined": False,
        "lacking": "power level 100 to kick",
        MEMBERS_FIELD: {"@e:evil.example": "join"},
    }
    [row] = await store.rooms.known()
    assert (row["room_id"], row["joined"], row["lacking"]) == (
        ROOM,
        False,
        "power level 100 to kick",
    )
    # Rooms the bridge never recorded are not created by member bookkeeping.
    await store.rooms.update_data({"!unknown:x": {MEMBERS_FIELD: {"@e:evil.example": "join"}}})
    assert set(await store.rooms.data()) == {ROOM}


async def test_member_records_are_sealed(tmp_path: Path) -> None:
    path = tmp_path / "sealed.db"
    store = await Store.open(f"sqlite+aiosqlite:///{path}")
    try:
        await store.rooms.upsert(ROOM, joined=True)
        enf = RoomEnforcer(store, lambda: 10.0, _quiet)
        enf.on_state(ROOM, [member("@spy:leaky-partner.example")])
        await enf.flush()
    finally:
        await store.close()
    raw = path.read_bytes() + b"".join(p.read_bytes() for p in tmp_path.glob("sealed.db-*"))
    assert b"leaky-partner" not in raw and b"@spy" not in raw


# -- through the command, across a restart -------------------------------------------------


async def start(store: Store, tmp_path: Path) -> Worker:
    """A worker with fresh in-memory state over ``store``: a (re)start of the bridge."""
    config = make_config(
        {
            "homeserver": {"domain": OWN},
            "bridge": {"permissions": {ADMIN: "admin"}},
            "federation": {"mode": "allowlist", "servers": ["partner.example"]},
        },
        base_dir=tmp_path,
    )
    services = Services(store, config, MGMT, notify=_quiet, own_server=OWN)
    await services.rooms.load()
    worker = Worker(
        store, lambda: config, lambda: services.policy.engine, build_registry(), services
    )
    await worker.load()
    return worker


_n = 0


def event(body: str = "", **fields: Any) -> dict[str, Any]:
    global _n
    _n += 1
    ev = {
        "event_id": f"$e{_n}",
        "room_id": MGMT,
        "sender": ADMIN,
        "type": "m.room.message",
        "origin_server_ts": 1,
        "content": {"msgtype": "m.text", "body": body},
    }
    ev.update(fields)
    return ev


async def feed(worker: Worker, *events: dict[str, Any]) -> list[str]:
    """Ingest and process events; the notices the bot would send."""
    before = {a.id for a in await worker.store.actions.due(now=10**12, limit=10_000)}
    await worker.store.queue.ingest(f"t{time.time_ns()}", list(events))
    await worker.run_once()
    return [
        a.payload["body"]
        for a in await worker.store.actions.due(now=10**12, limit=10_000)
        if a.id not in before and a.kind == "send_notice"
    ]


async def remote_members_then_restart(store: Store, tmp_path: Path) -> Worker:
    """Members join ROOM through the event stream; then the bridge restarts."""
    first = await start(store, tmp_path)
    for room in (MGMT, ROOM):
        await store.rooms.upsert(room, joined=True)
    first.tracker.joined_rooms = {MGMT, ROOM}
    joins = [
        event(type="m.room.member", room_id=ROOM, sender=u, state_key=u, content={"membership": m})
        for u, m in (
            ("@p1:partner.example", "join"),
            ("@p2:partner.example", "invite"),
            ("@e:evil.example", "join"),
            (f"@a:{OWN}", "join"),
        )
    ]
    await feed(first, *joins)
    await first.services.rooms.close()
    # Restart: the enforcer starts empty and reads the stored members.
    second = await start(store, tmp_path)
    assert second.services.rooms is not first.services.rooms
    return second


async def test_confirmation_after_a_restart_names_rooms_and_members(
    store: Store, tmp_path: Path
) -> None:
    worker = await remote_members_then_restart(store, tmp_path)
    [ask] = await feed(worker, event("!policy federation mode internal"))
    lines = ask.splitlines()
    assert lines[0] == (
        "❓ this change would remove 2 member(s) from 1 room(s) (servers: partner.example):"
    )
    assert lines[1] == f"• {ROOM}: 2 member(s): @p1:partner.example, @p2:partner.example"
    assert "@e:evil.example" not in ask  # already excluded: not this change's doing
    assert "--yes" in lines[-1]
    assert worker.services.policy.engine.federation_for(ROOM).mode.value == "allowlist"
    [done] = await feed(worker, event("!policy federation mode internal --yes"))
    assert done.startswith("✅ federation mode set to internal")


async def test_a_change_that_removes_nobody_asks_nothing_after_a_restart(
    store: Store, tmp_path: Path
) -> None:
    worker = await remote_members_then_restart(store, tmp_path)
    # allowlist partner.example → partner.example + other.example: nobody removed
    [done] = await feed(worker, event("!policy federation allow other.example"))
    assert done.startswith("✅ federation allow other.example")


async def test_the_confirmation_names_only_rooms_that_lose_members(
    store: Store, tmp_path: Path
) -> None:
    first = await start(store, tmp_path)
    for room in (MGMT, ROOM, OTHER):
        await store.rooms.upsert(room, joined=True)
    first.tracker.joined_rooms = {MGMT, ROOM, OTHER}
    # One remote member in each room, learnt from reconciles this time.
    first.services.rooms.on_state(ROOM, [member("@p:partner.example")])
    first.services.rooms.on_state(OTHER, [member("@o:other.example")])
    await first.services.rooms.close()

    second = await start(store, tmp_path)
    [ask] = await feed(second, event("!policy federation remove partner.example"))
    # allowlist [partner] → [] removes the partner's member in ROOM only; the member
    # from other.example is excluded already.
    assert ask.startswith("❓ this change would remove 1 member(s) from 1 room(s)")
    assert f"• {ROOM}: 1 member(s): @p:partner.example" in ask.splitlines()
    assert OTHER not in ask
