"""Missing power reaches the management room: once per room and distinct lack, batched
(one notice per tick, or with a rollout's progress), remembered across a restart; and
``!policy rooms`` reaches every room (filters, pages) with a bounded reply."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from bridge.app import build_registry
from bridge.commands.registry import Reply
from bridge.pipeline.enforcement import DRIFTED, REPORTED_FIELD, RoomEnforcer
from bridge.pipeline.worker import Worker
from bridge.store import Store
from tests.kit.config import make_config
from tests.kit.services import Services

OWN = "corp.example"
WEAK = f"!weak:{OWN}"
NO_ACL = "power level 50 to send m.room.server_acl (the bot has 0)"
NO_KICK = "@c:evil.example: a room creator cannot be removed (room version 12)"


class Notes:
    def __init__(self) -> None:
        self.said: list[str] = []

    async def __call__(self, reply: Reply) -> None:
        self.said.append(reply.text)


def enforcer(store: Any, **kw: Any) -> tuple[RoomEnforcer, Notes]:
    notes = Notes()
    kw.setdefault("report_grace", 0.0)
    kw.setdefault("report_delay", 3600.0)  # the tests send reports themselves
    return RoomEnforcer(store, lambda: 1000.0, notes, **kw), notes


def result(*lacking: str, unkickable: tuple[str, ...] = (), **payload: Any) -> dict[str, Any]:
    return {
        "sent": [],
        "kicked": [],
        "lacking": list(lacking),
        "unkickable": list(unkickable),
        "payload": payload,
    }


async def test_missing_power_is_reported_once_per_room_and_distinct_lack(store: Store) -> None:
    enf, notes = enforcer(store)
    await enf.on_result(WEAK, result(NO_ACL))
    await enf.on_result(f"!fine:{OWN}", result())
    assert await enf.report_lacks() == 1
    [notice] = notes.said
    assert notice.splitlines()[:2] == [
        "⚠️ The bot lacks power to enforce the policy in 1 room(s):",
        f"• {WEAK}: {NO_ACL}",
    ]
    assert "!policy rooms lacking" in notice
    # Every later reconcile finds the same lack: nothing new to say.
    for _ in range(3):
        await enf.on_result(WEAK, result(NO_ACL))
    assert await enf.report_lacks() == 0 and len(notes.said) == 1
    # A different lack is news.
    await enf.on_result(WEAK, result(NO_ACL, unkickable=(NO_KICK,)))
    assert await enf.report_lacks() == 1
    assert f"• {WEAK}: {NO_ACL}; {NO_KICK}" in notes.said[-1].splitlines()
    # Fixed, then lacking again: reported again.
    await enf.on_result(WEAK, result())
    await enf.on_result(WEAK, result(NO_ACL))
    assert await enf.report_lacks() == 1 and len(notes.said) == 3
    await enf.close()


async def test_a_refused_reconcile_is_reported_too(store: Store) -> None:
    enf, notes = enforcer(store)
    refused = f"the bot is not allowed to kick users in {WEAK} (M_FORBIDDEN: no)"
    await enf.on_result(WEAK, {"error": refused, "payload": {}})
    await enf.report_lacks()
    assert f"• {WEAK}: {refused}" in notes.said[0].splitlines()
    await enf.close()


async def test_what_was_reported_survives_a_restart(store: Store) -> None:
    enf, notes = enforcer(store)
    await enf.on_result(WEAK, result(NO_ACL))
    await enf.report_lacks()
    await enf.close()
    assert (await store.rooms.data())[WEAK][REPORTED_FIELD] == NO_ACL

    again, notes_after = enforcer(store)
    await again.load()
    # The rollout after a restart finds the same lack: already reported.
    await again.on_result(WEAK, result(NO_ACL))
    assert again.pending_lacks == {} and await again.report_lacks() == 0
    # A new lack is reported.
    await again.on_result(WEAK, result(unkickable=(NO_KICK,)))
    assert await again.report_lacks() == 1
    assert notes_after.said[0].splitlines()[1] == f"• {WEAK}: {NO_KICK}"
    assert len(notes.said) == 1
    await again.close()


async def test_a_lack_fixed_within_the_grace_period_is_not_reported(store: Store) -> None:
    """With bridge.obtain_power the bot gets power (make_room_admin) and reconciles again
    right away: the first lack is not worth a notice."""
    enf, notes = enforcer(store, report_grace=60.0)
    await enf.on_result(WEAK, result(NO_ACL))
    assert await enf.report_lacks() == 0  # not due yet
    await enf.on_result(WEAK, result(after_admin=True))
    assert enf.pending_lacks == {}
    assert await enf.report_lacks(everything=True) == 0 and notes.said == []
    await enf.close()


class Ticks:
    """The report timer's clock, advanced by the test one tick at a time."""

    def __init__(self) -> None:
        self.pending: asyncio.Queue[asyncio.Future[None]] = asyncio.Queue()

    async def sleep(self, _delay: float) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await self.pending.put(done)
        await done

    async def tick(self) -> None:
        """Let the timer's current sleep end, and wait until it sleeps again or stops."""
        (await self.pending.get()).set_result(None)
        for _ in range(200):  # the timer reports (a few awaits), then sleeps again or ends
            if not self.pending.empty():
                return
            await asyncio.sleep(0)


async def test_reports_outside_a_rollout_are_batched_per_tick(store: Store) -> None:
    ticks = Ticks()
    enf, notes = enforcer(store, report_limit=20, sleep=ticks.sleep)
    rooms = [f"!r{i:02d}:{OWN}" for i in range(30)]
    for room in rooms:
        await enf.on_result(room, result(NO_ACL))
    assert notes.said == []  # nothing before the timer's tick
    await ticks.tick()
    [notice] = notes.said
    lines = notice.splitlines()
    assert lines[0] == "⚠️ The bot lacks power to enforce the policy in 30 room(s):"
    assert lines[1:21] == [f"• {room}: {NO_ACL}" for room in rooms[:20]]
    assert lines[21] == "• … and 10 more room(s)"
    assert enf.pending_lacks == {}
    await enf.on_result(rooms[0], result(NO_ACL))  # the same lack again: nothing new
    if not ticks.pending.empty():
        await ticks.tick()
    assert len(notes.said) == 1
    await enf.close()


async def test_a_stalled_rollout_does_not_hold_reports_back(store: Store) -> None:
    enf, notes = enforcer(store, report_delay=0.1)
    _acts, record = enf.rollout([WEAK, f"!a:{OWN}", f"!b:{OWN}", f"!c:{OWN}", f"!d:{OWN}"], "x")
    enf.start_rollout(record)
    await enf.on_result(WEAK, result(NO_ACL, rollout=record["id"]))
    # No progress mark yet (1 of 5) and no more results: the timer reports.
    for _ in range(100):
        if notes.said:
            break
        await asyncio.sleep(0.05)
    assert notes.said and f"• {WEAK}: {NO_ACL}" in notes.said[0].splitlines()
    await enf.close()


class MemoryRooms:
    """``store.rooms`` as RoomEnforcer uses it, in memory."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}

    async def upsert(
        self, room_id: str, *, joined: bool | None = None, lacking: str | None = None
    ) -> None:
        row = self.rows.setdefault(room_id, {"joined": False, "lacking": ""})
        if joined is not None:
            row["joined"] = joined
        if lacking is not None:
            row["lacking"] = lacking

    async def update_data(self, updates: dict[str, dict[str, Any]]) -> int:
        known = [r for r in updates if r in self.rows]
        for room in known:
            self.rows[room].update(updates[room])
        return len(known)

    async def data(self) -> dict[str, dict[str, Any]]:
        return {k: dict(v) for k, v in self.rows.items()}


class MemoryState:
    """``store.state`` as RoomEnforcer uses it, in memory."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}

    async def get(self, key: str) -> str | None:
        return self.values.get(key)

    async def set(self, key: str, value: str) -> None:
        self.values[key] = value


class NoActions:
    """``store.actions`` as RoomEnforcer uses it: nothing pending."""

    async def count(self, *_a: Any, **_k: Any) -> int:
        return 0


class MemoryStore:
    """What RoomEnforcer uses of the store, in memory (the 10k-room rollout stays fast)."""

    def __init__(self) -> None:
        self.rooms = MemoryRooms()
        self.state = MemoryState()
        self.actions = NoActions()


async def test_a_rollout_of_10k_rooms_gives_a_summary_not_10k_notices() -> None:
    store = MemoryStore()
    enf, notes = enforcer(store, report_delay=0.2)
    rooms = [f"!room{i:05d}:{OWN}" for i in range(10_000)]
    _acts, record = enf.rollout(rooms, "federation mode internal")
    enf.start_rollout(record)
    started = time.monotonic()
    for i, room in enumerate(rooms):
        lack = (NO_ACL,) if i % 2 == 0 else ()  # half the rooms lack power
        await enf.on_result(room, result(*lack, rollout=record["id"]))
        if i % 100 == 0:
            await asyncio.sleep(0.01)  # a steady rollout: the timer ticks meanwhile
    assert time.monotonic() - started > 0.5  # so it did tick, and left it to the rollout
    await asyncio.sleep(0.5)
    # The rollout's four progress notices carry the reports: no other notice.
    assert len(notes.said) == 4
    firsts = [n.splitlines()[0] for n in notes.said]
    assert [f.split("rooms processed ")[1].split(":")[0] for f in firsts[:3]] == [
        "(25%)",
        "(50%)",
        "(75%)",
    ]
    # The final report counts what happened: half the rooms were not brought in line.
    assert firsts[3] == (
        "⚠️ Policy rollout (federation mode internal) finished (10000 of 10000 rooms "
        "processed): applied in 5000 rooms, not applied in 5000 rooms, failed in 0 rooms."
    )
    reported = 0
    for notice in notes.said:
        assert len(notice) < 8_000  # bounded, whatever the number of rooms
        head = next(ln for ln in notice.splitlines() if ln.startswith("⚠️ The bot lacks"))
        n = int(head.split(" in ")[1].split(" ")[0])
        reported += n
        assert len([ln for ln in notice.splitlines() if ln.startswith("• !room")]) == 20
        assert f"• … and {n - 20} more room(s)" in notice
    assert reported == 5_000  # every lacking room once
    assert all(store.rooms.rows[r][REPORTED_FIELD] == NO_ACL for r in rooms[::2])
    await enf.close()


# -- !policy rooms -------------------------------------------------------------------------

MGMT = f"!mgmt:{OWN}"
ADMIN = f"@boss:{OWN}"


async def rooms_command(worker: Worker, text: str) -> str:
    before = {a.id for a in await worker.store.actions.due(now=10**12, limit=10_000)}
    ev = {
        "event_id": f"$c{time.time_ns()}",
        "room_id": MGMT,
        "sender": ADMIN,
        "type": "m.room.message",
        "origin_server_ts": 1,
        "content": {"msgtype": "m.text", "body": text},
    }
    await worker.store.queue.ingest(f"t{time.time_ns()}", [ev])
    await worker.run_once()
    [reply] = [
        a
        for a in await worker.store.actions.due(now=10**12, limit=10_000)
        if a.id not in before and a.kind == "send_notice"
    ]
    assert len(reply.payload["body"]) + len(reply.payload["html"]) < 40_000
    return str(reply.payload["body"])


async def test_rooms_command_filters_and_pages(store: Store, tmp_path: Path) -> None:
    config = make_config(
        {
            "homeserver": {"domain": OWN},
            "bridge": {"permissions": {ADMIN: "admin"}},
        },
        base_dir=tmp_path,
    )
    services = Services(store, config, MGMT, notify=Notes())
    worker = Worker(
        store, lambda: config, lambda: services.policy.engine, build_registry(), services
    )
    worker.tracker.joined_rooms = {MGMT}
    await store.rooms.upsert(MGMT, joined=True)
    enforced = [f"!ok{i:03d}:{OWN}" for i in range(120)]
    lacking = [f"!weak{i}:{OWN}" for i in range(5)]
    await store.rooms.upsert_many(enforced + lacking, joined=True)
    for room in lacking:
        await store.rooms.upsert(room, lacking=NO_ACL + "; " + "; ".join([NO_KICK] * 20))
    for room in (f"!drift{i}:{OWN}" for i in range(2)):
        await store.rooms.upsert(room, joined=True, lacking=DRIFTED)
    await store.rooms.upsert_many([f"!gone{i}:{OWN}" for i in range(3)], joined=False)

    first = await rooms_command(worker, "!policy rooms")
    lines = first.splitlines()
    assert lines[0] == (
        "130 room(s) besides the management room: "
        "120 enforced, 2 drifted, 5 lack power, 3 not joined. "
        "Page 1 of 3 (next: !policy rooms all --page 2)"
    )
    assert len(lines) == 51 and MGMT not in first
    last = await rooms_command(worker, "!policy rooms --page 3")
    assert last.splitlines()[0].endswith("Page 3 of 3") and len(last.splitlines()) == 31
    seen = set()
    for page in (1, 2, 3):
        text = await rooms_command(worker, f"!policy rooms --page {page}")
        seen |= {ln[2:].split(":", 2)[0] + ":" + OWN for ln in text.splitlines()[1:]}
    assert len(seen) == 130  # every room is reachable

    weak = (await rooms_command(worker, "!policy rooms lacking")).splitlines()
    assert (
        weak[0] == "130 room(s) besides the management room: "
        "120 enforced, 2 drifted, 5 lack power, 3 not joined. 5 lack power"
    )
    assert [ln.split(":", 2)[0] for ln in weak[1:]] == [f"• {r.split(':')[0]}" for r in lacking]
    assert all(f"lacks power: {NO_ACL}" in ln and len(ln) <= 242 for ln in weak[1:])
    assert all(ln.endswith("…") for ln in weak[1:])  # a long lack is cut
    drifted = await rooms_command(worker, "!policy rooms drifted")
    assert drifted.count("• ") == 2 and "drifted" in drifted.splitlines()[1]
    gone = await rooms_command(worker, "!policy rooms not-joined")
    assert gone.count("• ") == 3

    assert "must be a whole number" in await rooms_command(worker, "!policy rooms --page x")
    assert "page 9 is empty" in await rooms_command(worker, "!policy rooms --page 9")
    assert "must be one of" in await rooms_command(worker, "!policy rooms sleepy")
    # Saved state of the worker is untouched by listing.
    assert json.loads(await store.state.get("commands.pending_confirmations") or "{}") == {}
