"""Space links through the worker: forged claims refused, drops only by the side that made
the link, the links and the spaces' power stored with the batch and read back at start."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from bridge.app import build_registry
from bridge.pipeline.actions import ActionKind
from bridge.pipeline.live_policy import SPACES_KEY
from bridge.pipeline.reload import load_runtime_policy
from bridge.pipeline.worker import Worker
from bridge.policy.layers import add_keyword
from bridge.policy.spaces import Side
from bridge.store import ActionRow, Store
from tests.kit.config import make_config
from tests.kit.services import Services

OWN = "corp.example"
MGMT = f"!mgmt:{OWN}"
SPACE = f"!space:{OWN}"
ROOM = f"!room:{OWN}"
ADMIN = f"@boss:{OWN}"
MALLORY = f"@mallory:{OWN}"
VIA = {"via": [OWN]}


@pytest.fixture
async def worker(store: Store, tmp_path: Path) -> Worker:
    config = make_config(
        {"homeserver": {"domain": OWN}, "bridge": {"permissions": {ADMIN: "admin"}}},
        base_dir=tmp_path,
    )
    services = Services(store, config, MGMT, own_server=OWN)
    w = Worker(store, lambda: config, lambda: services.policy.engine, build_registry(), services)
    for room in (MGMT, ROOM, SPACE):
        await store.rooms.upsert(room, joined=True)
    await w.load()
    # The space has its own rule: a keyword refused in its rooms only.
    services.policy.apply(add_keyword({}, SPACE, "marlinspike", "block"))
    return w


_n = 0


def ev(room: str, sender: str, etype: str, key: str, content: dict[str, Any]) -> dict[str, Any]:
    global _n
    _n += 1
    return {
        "event_id": f"$s{_n}",
        "room_id": room,
        "sender": sender,
        "type": etype,
        "state_key": key,
        "origin_server_ts": 1,
        "content": content,
    }


def space_creation(version: str = "10") -> list[dict[str, Any]]:
    return [
        ev(SPACE, ADMIN, "m.room.create", "", {"type": "m.space", "room_version": version}),
        ev(SPACE, ADMIN, "m.room.power_levels", "", {"users": {ADMIN: 100}}),
    ]


async def feed(worker: Worker, *events: dict[str, Any]) -> list[ActionRow]:
    """Ingest events as one transaction, process them, return the new pending actions."""
    before = {a.id for a in await worker.store.actions.due(now=10**12, limit=10_000)}
    await worker.store.queue.ingest(f"t{time.time_ns()}", list(events))
    assert await worker.run_once() == 1
    return [
        a for a in await worker.store.actions.due(now=10**12, limit=10_000) if a.id not in before
    ]


def refused_in_room(worker: Worker, body: str) -> bool:
    message = {
        "room_id": ROOM,
        "sender": MALLORY,
        "type": "m.room.message",
        "content": {"msgtype": "m.text", "body": body},
    }
    return worker.services.policy.engine.check_event(message).blocked


def reconciled(acts: list[ActionRow]) -> list[str]:
    return [a.room_id or "" for a in acts if a.kind == ActionKind.RECONCILE]


async def test_a_room_naming_a_space_without_power_there_is_not_in_it(worker: Worker) -> None:
    await feed(worker, *space_creation())
    acts = await feed(worker, ev(ROOM, MALLORY, "m.space.parent", SPACE, VIA))
    assert worker.services.policy.room_spaces == {}
    assert reconciled(acts) == []
    assert not refused_in_room(worker, "marlinspike")
    assert not worker.tracker.spaces.claimed(ROOM, SPACE, Side.ROOM)


async def test_a_parent_named_by_a_space_admin_puts_the_room_in_the_space(worker: Worker) -> None:
    acts = await feed(worker, *space_creation(), ev(ROOM, ADMIN, "m.space.parent", SPACE, VIA))
    assert worker.services.policy.room_spaces == {ROOM: (SPACE,)}
    assert reconciled(acts) == [ROOM]
    assert refused_in_room(worker, "marlinspike")


async def test_v12_creators_may_name_their_space_as_a_parent(worker: Worker) -> None:
    creator = f"@founder:{OWN}"
    create = ev(
        SPACE,
        ADMIN,
        "m.room.create",
        "",
        {"type": "m.space", "room_version": "12", "additional_creators": [creator]},
    )
    levels = ev(SPACE, ADMIN, "m.room.power_levels", "", {"users": {}})
    await feed(worker, create, levels, ev(ROOM, creator, "m.space.parent", SPACE, VIA))
    assert worker.services.policy.room_spaces == {ROOM: (SPACE,)}


async def test_the_room_cannot_drop_a_link_the_space_made(worker: Worker) -> None:
    await feed(worker, ev(SPACE, ADMIN, "m.space.child", ROOM, VIA))
    assert refused_in_room(worker, "marlinspike")
    acts = await feed(worker, ev(ROOM, MALLORY, "m.space.parent", SPACE, {}))
    assert worker.services.policy.room_spaces == {ROOM: (SPACE,)}
    assert reconciled(acts) == []
    assert refused_in_room(worker, "marlinspike")
    # The space can.
    acts = await feed(worker, ev(SPACE, ADMIN, "m.space.child", ROOM, {}))
    assert worker.services.policy.room_spaces == {}
    assert reconciled(acts) == [ROOM]
    assert not refused_in_room(worker, "marlinspike")


async def test_with_both_claims_a_drop_by_one_side_keeps_the_link(worker: Worker) -> None:
    await feed(
        worker,
        *space_creation(),
        ev(SPACE, ADMIN, "m.space.child", ROOM, VIA),
        ev(ROOM, ADMIN, "m.space.parent", SPACE, VIA),
    )
    await feed(worker, ev(SPACE, ADMIN, "m.space.child", ROOM, {}))
    assert worker.services.policy.room_spaces == {ROOM: (SPACE,)}
    await feed(worker, ev(ROOM, ADMIN, "m.space.parent", SPACE, {}))
    assert worker.services.policy.room_spaces == {}


async def test_a_demotion_judges_later_parents_only(worker: Worker) -> None:
    mod = f"@mod:{OWN}"
    await feed(
        worker,
        *space_creation(),
        ev(SPACE, ADMIN, "m.room.power_levels", "", {"users": {ADMIN: 100, mod: 50}}),
        ev(ROOM, mod, "m.space.parent", SPACE, VIA),
    )
    await feed(worker, ev(SPACE, ADMIN, "m.room.power_levels", "", {"users": {ADMIN: 100}}))
    assert worker.services.policy.room_spaces == {ROOM: (SPACE,)}
    other = f"!other:{OWN}"
    await feed(worker, ev(other, mod, "m.space.parent", SPACE, VIA))
    assert worker.services.policy.room_spaces == {ROOM: (SPACE,)}


async def test_links_and_power_are_stored_and_read_back_at_start(
    worker: Worker, store: Store
) -> None:
    await feed(worker, *space_creation())
    mod = f"@mod:{OWN}"
    await feed(worker, ev(SPACE, ADMIN, "m.room.power_levels", "", {"users": {mod: 50}}))
    # A restart: a fresh worker and live policy read what was committed.
    cfg = worker.config()
    services = Services(store, cfg, MGMT, own_server=OWN)
    await load_runtime_policy(store, services.policy)
    again = Worker(store, lambda: cfg, lambda: services.policy.engine, build_registry(), services)
    await again.load()
    assert again.tracker.spaces == worker.tracker.spaces
    await feed(again, ev(ROOM, mod, "m.space.parent", SPACE, VIA))
    assert services.policy.room_spaces == {ROOM: (SPACE,)}
    await load_runtime_policy(store, services.policy)
    assert services.policy.room_spaces == {ROOM: (SPACE,)}


async def test_links_stored_in_the_earlier_form_stay_and_only_the_space_drops_them(
    store: Store, tmp_path: Path
) -> None:
    await store.state.set(SPACES_KEY, json.dumps({ROOM: [SPACE]}))
    cfg = make_config({"homeserver": {"domain": OWN}}, base_dir=tmp_path)
    services = Services(store, cfg, MGMT, own_server=OWN)
    await load_runtime_policy(store, services.policy)
    w = Worker(store, lambda: cfg, lambda: services.policy.engine, build_registry(), services)
    await w.load()
    assert services.policy.room_spaces == {ROOM: (SPACE,)}
    await feed(w, ev(ROOM, MALLORY, "m.space.parent", SPACE, {}))
    assert services.policy.room_spaces == {ROOM: (SPACE,)}
    await feed(w, ev(SPACE, ADMIN, "m.space.child", ROOM, {}))
    assert services.policy.room_spaces == {}
    assert json.loads(await store.state.get(SPACES_KEY) or "{}")["links"] == {}
