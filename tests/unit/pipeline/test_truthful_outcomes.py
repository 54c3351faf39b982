"""Replies and rollout reports say what happened (issue 11, item 6).

A change is recorded and rolled out; where the bot lacks the power to apply it, the reply
says so at once (when the bot knows from the room's power levels), the rollout's report
counts applied / not applied / failed rooms with the reasons, and the room is told once that
the bot cannot enforce the policy there.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from bridge.app import build_registry
from bridge.commands.registry import Reply
from bridge.pipeline import actions
from bridge.pipeline.enforcement import NOTICED_FIELD, POWER_FIELD, ROLLOUT_KEY, RoomEnforcer
from bridge.pipeline.enrollment import PowerObtainer
from bridge.pipeline.worker import Worker
from bridge.policy.outcomes import FIX
from bridge.store import NewAction, Store
from tests.kit.config import make_config
from tests.kit.services import Services

OWN = "corp.example"
MGMT = f"!mgmt:{OWN}"
ROOM = f"!room:{OWN}"
GOOD = f"!good:{OWN}"
BROKEN = f"!broken:{OWN}"
ADMIN = f"@boss:{OWN}"
CREATOR = f"@owner:{OWN}"
BOT = f"@policybot:{OWN}"
NO_RETENTION = "power level 50 to send m.room.retention (the bot has 0)"


class Said:
    """The management room's notices, and the actions the enforcer submits."""

    def __init__(self) -> None:
        self.notices: list[str] = []
        self.submitted: list[NewAction] = []

    async def notify(self, reply: Reply) -> None:
        self.notices.append(reply.text)

    async def submit(self, new: list[NewAction]) -> None:
        self.submitted.extend(new)

    def room_notices(self, room: str) -> list[str]:
        return [
            str(a.payload["body"])
            for a in self.submitted
            if a.kind == "send_notice" and a.room_id == room
        ]


def v12_state(bot_power: int = 0) -> list[dict[str, Any]]:
    """A room made by an ordinary user: version 12, the bot at ``bot_power``."""
    return [
        {
            "type": "m.room.create",
            "state_key": "",
            "sender": CREATOR,
            "content": {"room_version": "12"},
        },
        {
            "type": "m.room.power_levels",
            "state_key": "",
            "sender": CREATOR,
            "content": {"users": {BOT: bot_power}, "users_default": 0, "state_default": 50},
        },
        {"type": "m.room.member", "state_key": BOT, "content": {"membership": "join"}},
    ]


def enforcer(store: Store, said: Said) -> RoomEnforcer:
    return RoomEnforcer(
        store, lambda: 1000.0, said.notify, bot=BOT, submit=said.submit, report_grace=0.0
    )


def lacking(*lacks: str, rollout: str | None = None, after_admin: bool = False) -> dict[str, Any]:
    payload: dict[str, Any] = {}
    if rollout:
        payload["rollout"] = rollout
    if after_admin:
        payload["after_admin"] = True
    return {"sent": [], "kicked": [], "lacking": list(lacks), "unkickable": [], "payload": payload}


# -- the command's reply ----------------------------------------------------------------


async def start(store: Store, tmp_path: Path) -> Worker:
    config = make_config(
        {"homeserver": {"domain": OWN}, "bridge": {"permissions": {ADMIN: "admin"}}},
        base_dir=tmp_path,
    )
    services = Services(store, config, MGMT, own_server=OWN, bot=BOT)
    await services.rooms.load()
    worker = Worker(
        store, lambda: config, lambda: services.policy.engine, build_registry(), services
    )
    await worker.load()
    worker.tracker.joined_rooms = {MGMT, ROOM}
    return worker


_n = 0


async def command(worker: Worker, body: str, room: str = ROOM) -> str:
    """The bot's reply to ``body`` typed by the admin in ``room``."""
    global _n
    _n += 1
    before = {a.id for a in await worker.store.actions.due(now=10**12, limit=10_000)}
    event = {
        "event_id": f"$c{_n}",
        "room_id": room,
        "sender": ADMIN,
        "type": "m.room.message",
        "origin_server_ts": 1,
        "content": {"msgtype": "m.text", "body": body},
    }
    await worker.store.queue.ingest(f"t{time.time_ns()}", [event])
    await worker.run_once()
    [reply] = [
        str(a.payload["body"])
        for a in await worker.store.actions.due(now=10**12, limit=10_000)
        if a.id not in before and a.kind == "send_notice"
    ]
    return reply


async def test_retention_set_where_the_bot_lacks_power_says_not_applied_why_and_fix(
    store: Store, tmp_path: Path
) -> None:
    for room in (MGMT, ROOM):
        await store.rooms.upsert(room, joined=True)
    first = await start(store, tmp_path)
    # The reconcile after the bot joined read the room: power 0, retention needs 50.
    first.services.rooms.on_state(ROOM, v12_state())
    await first.services.rooms.close()
    assert (await store.rooms.data())[ROOM][POWER_FIELD]["m.room.retention"] == NO_RETENTION

    # After a restart too (the powers are kept in the room's sealed record).
    worker = await start(store, tmp_path)
    reply = await command(worker, "!policy retention set 30d --scope here")
    assert reply.splitlines() == [
        f"⚠️ messages older than 30d will be removed in {ROOM}. Recorded, but the bot cannot "
        "apply it in the 1 room it reaches:",
        "• lacks power level 50 to send m.room.retention: 1 room",
        f"`!policy rooms lacking` lists them. {FIX}",
    ]
    # still recorded and rolled out (the bot may be given power before the reconcile)
    assert worker.services.policy.engine.retention_for(ROOM).max_lifetime_ms == 30 * 86_400_000
    pending = await store.actions.due(now=10**12, limit=100)
    assert [a.room_id for a in pending if a.kind == "reconcile"] == [ROOM]

    # Once the bot has the power, the reply is a plain confirmation.
    worker.services.rooms.on_state(ROOM, v12_state(bot_power=50))
    reply = await command(worker, "!policy retention set 20d --scope here --yes")
    assert reply == (
        f"✅ messages older than 20d will be removed in {ROOM}. Recorded; applying it to 1 room."
    )
    await worker.services.rooms.close()


async def test_without_a_state_read_the_stored_lack_is_used(store: Store, tmp_path: Path) -> None:
    for room in (MGMT, ROOM):
        await store.rooms.upsert(room, joined=True)
    await store.rooms.upsert(ROOM, lacking=f"{NO_RETENTION}; power level 50 to kick")
    worker = await start(store, tmp_path)
    reply = await command(worker, "!policy retention off --scope here")
    assert reply.startswith(f"⚠️ retention off in {ROOM}. Recorded, but the bot cannot")
    assert "• lacks power level 50 to send m.room.retention: 1 room" in reply
    # a federation change sends the ACL: that lack is not known here
    reply = await command(worker, "!policy federation deny evil.example --scope here")
    assert reply.startswith("✅ federation deny evil.example")
    await worker.services.rooms.close()


# -- the rollout's report ---------------------------------------------------------------


async def test_the_rollout_report_counts_applied_not_applied_and_failed(store: Store) -> None:
    said = Said()
    enf = enforcer(store, said)
    for room in (GOOD, ROOM, BROKEN):
        await store.rooms.upsert(room, joined=True)
    acts, record = enf.rollout([GOOD, ROOM, BROKEN], "retention set to 30d")
    await store.actions.enqueue(acts)
    enf.start_rollout(record)
    rid = record["id"]
    await enf.on_result(GOOD, {"sent": ["m.room.retention"], "payload": {"rollout": rid}})
    await enf.on_result(ROOM, lacking(NO_RETENTION, rollout=rid))
    await enf.on_result(BROKEN, {"error": "gave up after 5 attempts: HTTP 502", "payload": {}})
    assert len(said.notices) == 2  # 33% and 66%: the failure was not this rollout's
    await enf.on_result(
        BROKEN, {"error": "gave up after 5 attempts: HTTP 502", "payload": {"rollout": rid}}
    )
    final = said.notices[-1].splitlines()
    assert final[:5] == [
        "⚠️ Policy rollout (retention set to 30d) finished (3 of 3 rooms processed): applied "
        "in 1 room, not applied in 1 room, failed in 1 room.",
        "Not applied:",
        "• lacks power level 50 to send m.room.retention: 1 room",
        "Failed:",
        "• gave up after 5 attempts: HTTP 502: 1 room",
    ]
    # The rooms where power is missing are named once (with the progress that first saw
    # them), each notice says the fix once.
    named = [n for n in said.notices if f"• {ROOM}: {NO_RETENTION}" in n.splitlines()]
    assert len(named) == 1
    assert all(n.count("obtain_power") == 1 for n in said.notices[1:])
    stored = json.loads(await store.state.get(ROLLOUT_KEY) or "{}")
    assert stored["finished"] and stored["tally"]["not_applied"] == 1

    # A second rollout with the same lack: counted again, but the room is not listed again.
    _acts, record = enf.rollout([ROOM], "retention set to 60d")
    enf.start_rollout(record)
    await enf.on_result(ROOM, lacking(NO_RETENTION, rollout=record["id"]))
    again = said.notices[-1]
    assert "not applied in 1 room" in again and f"• {ROOM}:" not in again
    assert FIX in again
    await enf.close()


async def test_a_rollout_that_changed_nothing_does_not_read_as_success(store: Store) -> None:
    said = Said()
    enf = enforcer(store, said)
    _acts, record = enf.rollout([ROOM], "retention set to 30d")
    enf.start_rollout(record)
    await enf.on_result(ROOM, lacking(NO_RETENTION, rollout=record["id"]))
    [notice] = said.notices
    assert notice.startswith("⚠️ Policy rollout (retention set to 30d) finished")
    assert "applied in 0 rooms, not applied in 1 room" in notice
    assert "✅" not in notice and "(100%)" not in notice
    await enf.close()


async def test_while_obtaining_power_the_second_reconcile_gives_the_outcome(
    store: Store,
) -> None:
    said = Said()
    enf = enforcer(store, said)
    await store.rooms.upsert(ROOM, joined=True)
    power = PowerObtainer(enf, said.submit, BOT, allowed=lambda: True)
    _acts, record = enf.rollout([ROOM], "retention set to 30d")
    enf.start_rollout(record)
    await power.on_result(ROOM, lacking(NO_RETENTION, rollout=record["id"]))
    assert said.notices == []  # not counted yet: make_room_admin comes first
    assert said.room_notices(ROOM) == []  # nor is the room told
    follow = [a for a in said.submitted if a.kind == "reconcile"]
    assert [a.payload for a in follow] == [
        {"reason": "after make_room_admin", "rollout": record["id"], "after_admin": True}
    ]
    await power.on_result(ROOM, {"sent": ["m.room.retention"], "payload": follow[0].payload})
    assert said.notices == [
        "✅ Policy rollout (retention set to 30d) finished: applied in all 1 room."
    ]
    await enf.close()


# -- the room is told once ----------------------------------------------------------------


async def test_the_room_is_told_once_that_the_bot_cannot_enforce_there(store: Store) -> None:
    said = Said()
    enf = enforcer(store, said)
    await store.rooms.upsert(ROOM, joined=True)
    await enf.on_result(ROOM, lacking())  # the join's reconcile: nothing to do
    assert said.room_notices(ROOM) == []
    await enf.on_result(ROOM, lacking(NO_RETENTION))
    await enf.on_result(ROOM, lacking(NO_RETENTION))
    [notice] = said.room_notices(ROOM)
    assert notice.startswith(
        "⚠️ The policy bot cannot enforce the organization's policy in this room until it is "
        "given power level 50"
    )
    assert "old messages are not removed" in notice
    await enf.close()
    assert (await store.rooms.data())[ROOM][NOTICED_FIELD] is True

    # After a restart: still told, not again.
    fresh = enforcer(store, said)
    await fresh.load()
    await fresh.on_result(ROOM, lacking(NO_RETENTION, "power level 50 to kick (the bot has 0)"))
    assert len(said.room_notices(ROOM)) == 1
    # Given power, then losing it again: the room is told again.
    await fresh.on_result(ROOM, lacking())
    await fresh.on_result(ROOM, lacking(NO_RETENTION))
    assert len(said.room_notices(ROOM)) == 2
    # A failed reconcile (the bot is not in the room) posts nothing there.
    await fresh.on_result(BROKEN, {"error": "not allowed to read the room state"})
    assert said.room_notices(BROKEN) == []
    await fresh.close()


async def test_the_room_is_told_of_a_kick_it_cannot_do(store: Store) -> None:
    said = Said()
    enf = enforcer(store, said)
    await store.rooms.upsert(ROOM, joined=True)
    result = lacking()
    result["unkickable"] = [
        "@e:evil.example: the bot needs power 50 to kick",
        "@c:evil.example: a room creator cannot be removed (room version 12)",
    ]
    await enf.on_result(ROOM, result)
    [notice] = said.room_notices(ROOM)
    assert "given power level 50" in notice and "@e:evil.example" not in notice
    assert "members from servers that are not allowed are not removed" in notice
    await enf.close()


def test_a_notice_action_is_what_the_enforcer_submits() -> None:
    # The notice goes through the executor like every other effect.
    act = actions.send_notice(ROOM, "x")
    assert act.kind == "send_notice" and act.room_id == ROOM
