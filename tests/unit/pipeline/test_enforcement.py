"""RoomEnforcer: scheduling reconciles and rollouts, room state bookkeeping, affected()."""

from __future__ import annotations

import itertools
import json
import time

import pytest

from bridge.commands.registry import Reply
from bridge.pipeline import actions
from bridge.pipeline.enforcement import ROLLOUT_KEY, Affected, RoomEnforcer
from bridge.policy.federation import FederationMode, FederationPolicy
from bridge.store import Store

OWN = "corp.example"
INTERNAL = FederationPolicy(FederationMode.INTERNAL)
OPEN = FederationPolicy(FederationMode.OPEN)


class Notes:
    def __init__(self) -> None:
        self.said: list[str] = []

    async def __call__(self, reply: Reply) -> None:
        self.said.append(reply.text)


def enforcer(store: Store, rate: float = 10.0) -> tuple[RoomEnforcer, Notes]:
    notes = Notes()
    return RoomEnforcer(store, lambda: rate, notes), notes


async def rooms_by_id(store: Store) -> dict[str, dict[str, object]]:
    return {r["room_id"]: r for r in await store.rooms.known()}


def test_rollout_spreads_rooms_at_the_configured_rate(store: Store) -> None:
    enf, _ = enforcer(store, rate=4.0)
    before = time.time()
    acts, record = enf.rollout(["!c:x", "!a:x", "!b:x"], "mode internal")
    after = time.time()
    assert [a.room_id for a in acts] == ["!a:x", "!b:x", "!c:x"]  # a stable order
    assert all(a.kind == "reconcile" for a in acts)
    assert {a.payload["rollout"] for a in acts} == {record["id"]}
    assert {a.payload["reason"] for a in acts} == {"mode internal"}
    assert len({a.id for a in acts}) == 3
    assert before <= acts[0].not_before <= after
    assert [round(b.not_before - a.not_before, 9) for a, b in itertools.pairwise(acts)] == [
        0.25,
        0.25,
    ]
    assert record["total"] == 3 and record["reason"] == "mode internal"
    assert before <= record["started"] <= after
    # A second rollout has its own id.
    _acts, record2 = enf.rollout(["!a:x"], "again")
    assert record2["id"] != record["id"]


def test_rollout_rate_has_a_floor(store: Store) -> None:
    enf, _ = enforcer(store, rate=0.0)
    acts, _ = enf.rollout(["!a:x", "!b:x"], "r")
    assert acts[1].not_before - acts[0].not_before == pytest.approx(100.0)  # 0.01 rooms/s


def test_empty_rollout(store: Store) -> None:
    enf, _ = enforcer(store)
    acts, record = enf.rollout([], "nothing")
    assert acts == [] and record["total"] == 0


def test_members_from_state_and_from_the_event_stream(store: Store) -> None:
    enf, _ = enforcer(store)
    enf.on_state(
        "!r:x",
        [
            {"type": "m.room.create", "state_key": "", "content": {}},
            {
                "type": "m.room.member",
                "state_key": "@a:corp.example",
                "content": {"membership": "join"},
            },
            {
                "type": "m.room.member",
                "state_key": "@e:evil.example",
                "content": {"membership": "invite"},
            },
            {"type": "m.room.member", "state_key": 5, "content": {"membership": "join"}},
        ],
    )
    assert enf.members["!r:x"] == {"@a:corp.example": "join", "@e:evil.example": "invite"}
    enf.note_member("!r:x", "@e:evil.example", "leave")
    enf.note_member("!new:x", "@b:corp.example", "join")
    enf.note_member("!new:x", "@k:evil.example", "knock")
    assert enf.members["!r:x"] == {"@a:corp.example": "join"}  # only members present
    assert enf.members["!new:x"] == {"@b:corp.example": "join", "@k:evil.example": "knock"}
    # A full state read replaces what the stream told us.
    enf.on_state("!r:x", [])
    assert enf.members["!r:x"] == {}


def test_members_of_our_own_server_are_not_kept_when_it_is_known(store: Store) -> None:
    enf = RoomEnforcer(store, lambda: 1.0, Notes(), own_server=OWN)
    enf.on_state(
        "!r:x",
        [
            {"type": "m.room.member", "state_key": u, "content": {"membership": "join"}}
            for u in ("@a:corp.example", "@e:evil.example")
        ],
    )
    enf.note_member("!r:x", "@b:corp.example", "join")
    assert enf.members["!r:x"] == {"@e:evil.example": "join"}


async def test_on_result_records_success_and_problems(store: Store) -> None:
    enf, notes = enforcer(store)
    await enf.on_result("!ok:x", {"sent": [], "kicked": [], "lacking": [], "unkickable": []})
    await enf.on_result(
        "!weak:x",
        {
            "sent": [],
            "kicked": [],
            "lacking": ["power level 50 to send m.room.server_acl (the bot has 0)"],
            "unkickable": ["@e:evil.example: a room creator cannot be removed (room version 12)"],
        },
    )
    rooms = await rooms_by_id(store)
    assert rooms["!ok:x"]["joined"] and rooms["!ok:x"]["lacking"] == ""
    assert rooms["!weak:x"]["joined"]
    assert rooms["!weak:x"]["lacking"] == (
        "power level 50 to send m.room.server_acl (the bot has 0); "
        "@e:evil.example: a room creator cannot be removed (room version 12)"
    )
    assert notes.said == []  # reported later, batched (test_enforcement_reports.py)
    await enf.close()


async def test_on_result_errors_mark_not_joined_only_when_the_state_was_unreadable(
    store: Store,
) -> None:
    enf, _ = enforcer(store)
    await store.rooms.upsert("!out:x", joined=True)
    await store.rooms.upsert("!weak:x", joined=True)
    unreadable = (
        "the bot is not allowed to read the room state in !out:x (M_FORBIDDEN: not in room)"
    )
    refused_kick = "the bot is not allowed to kick users in !weak:x (M_FORBIDDEN: no)"
    await enf.on_result("!out:x", {"error": unreadable})
    await enf.on_result("!weak:x", {"error": refused_kick})
    rooms = await rooms_by_id(store)
    assert (rooms["!out:x"]["joined"], rooms["!out:x"]["lacking"]) == (False, unreadable)
    # The bot is in the room, it just lacks power: still joined.
    assert (rooms["!weak:x"]["joined"], rooms["!weak:x"]["lacking"]) == (True, refused_kick)
    # A later success clears the problem.
    await enf.on_result("!out:x", {"lacking": [], "unkickable": []})
    rooms = await rooms_by_id(store)
    assert (rooms["!out:x"]["joined"], rooms["!out:x"]["lacking"]) == (True, "")
    await enf.close()


async def test_rollout_progress_is_reported_once_per_quarter(store: Store) -> None:
    enf, notes = enforcer(store, rate=1000.0)
    rooms = [f"!r{i}:x" for i in range(4)]
    acts, record = enf.rollout(rooms, "federation mode internal")
    await store.actions.enqueue(acts)
    enf.start_rollout(record)
    other = actions.reconcile("!r0:x", "unrelated drift")
    await store.actions.enqueue([other])

    for i, a in enumerate(acts):
        await store.actions.finish(a.id, status="done", attempts=1)
        await enf.on_result(a.room_id or "", {"lacking": [], "payload": dict(a.payload)})
        assert len(notes.said) == i + 1
    assert notes.said == [
        f"Policy rollout (federation mode internal): {n} of 4 rooms processed ({pct}%): "
        f"applied in {n} room{'s' if n > 1 else ''}, not applied in 0 rooms, failed in 0 rooms."
        for n, pct in ((1, 25), (2, 50), (3, 75))
    ] + ["✅ Policy rollout (federation mode internal) finished: applied in all 4 rooms."]
    # Results outside the rollout (and after it finished) say nothing.
    await enf.on_result("!r0:x", {"lacking": [], "payload": dict(other.payload)})
    await enf.on_result("!r0:x", {"lacking": [], "payload": dict(acts[0].payload)})
    assert len(notes.said) == 4


async def test_rollout_reporting_resumes_after_a_restart(store: Store) -> None:
    enf, before = enforcer(store, rate=1000.0)
    acts, record = enf.rollout([f"!r{i}:x" for i in range(4)], "restarted")
    await store.actions.enqueue(acts)
    await store.state.set(ROLLOUT_KEY, json.dumps(record))
    enf.start_rollout(record)
    for a in acts[:2]:
        await store.actions.finish(a.id, status="done", attempts=1)
        await enf.on_result(a.room_id or "", {"lacking": [], "payload": dict(a.payload)})
    assert len(before.said) == 2

    # Restart: a fresh enforcer picks the rollout up from the store.
    fresh, after = enforcer(store)
    await fresh.load()
    for a in acts[2:]:
        await store.actions.finish(a.id, status="done", attempts=1)
        await fresh.on_result(a.room_id or "", {"lacking": [], "payload": dict(a.payload)})
    assert after.said == [
        # the counts of the results before the restart are kept with the rollout record
        "Policy rollout (restarted): 3 of 4 rooms processed (75%): applied in 3 rooms, "
        "not applied in 0 rooms, failed in 0 rooms.",
        "✅ Policy rollout (restarted) finished: applied in all 4 rooms.",
    ]


async def test_load_without_a_rollout_is_quiet(store: Store) -> None:
    enf, notes = enforcer(store)
    await enf.load()
    await enf.on_result("!a:x", {"lacking": [], "payload": {"rollout": "nope"}})
    assert notes.said == []


async def test_affected_counts_rooms_members_and_servers(store: Store) -> None:
    enf, _ = enforcer(store)
    enf.members = {
        "!a:x": {
            "@me:corp.example": "join",
            "@e1:evil.example": "join",
            "@e2:evil.example": "invite",
        },
        "!b:x": {"@p:partner.example": "join", "@me:corp.example": "join"},
        "!c:x": {"@me:corp.example": "join"},
        "!open:x": {"@e3:evil.example": "join"},
    }
    policies = {"!open:x": OPEN}

    found = await enf.affected(lambda _r: OPEN, lambda room: policies.get(room, INTERNAL), OWN)
    assert found.rooms == {
        "!a:x": ("@e1:evil.example", "@e2:evil.example"),
        "!b:x": ("@p:partner.example",),
    }
    assert (len(found.rooms), found.members, found.servers) == (
        2,
        3,
        {"evil.example", "partner.example"},
    )

    allow_partner = FederationPolicy(FederationMode.ALLOWLIST, ("partner.example",))
    found = await enf.affected(lambda _r: OPEN, lambda _r: allow_partner, OWN)
    assert (len(found.rooms), found.members, found.servers) == (2, 3, {"evil.example"})
    assert not await enf.affected(lambda _r: OPEN, lambda _r: OPEN, OWN)
    # Only the rooms the change reaches count.
    found = await enf.affected(lambda _r: OPEN, lambda _r: INTERNAL, OWN, rooms=["!b:x", "!z:x"])
    assert found.rooms == {"!b:x": ("@p:partner.example",)}


async def test_affected_compares_with_the_policy_in_force(store: Store) -> None:
    """Swapping one partner for another removes as many members as before: still a removal
    (comparing totals, as before, asked nothing)."""
    enf, _ = enforcer(store)
    enf.members = {"!a:x": {"@p:partner.example": "join", "@o:other.example": "join"}}
    partner = FederationPolicy(FederationMode.ALLOWLIST, ("partner.example",))
    other = FederationPolicy(FederationMode.ALLOWLIST, ("other.example",))
    found = await enf.affected(lambda _r: partner, lambda _r: other, OWN)
    assert found.rooms == {"!a:x": ("@p:partner.example",)}
    # Members the policy in force already excludes are not this change's doing.
    assert not await enf.affected(lambda _r: INTERNAL, lambda _r: partner, OWN)


async def test_affected_with_no_known_members(store: Store) -> None:
    enf, _ = enforcer(store)
    assert not await enf.affected(lambda _r: OPEN, lambda _r: INTERNAL, OWN)


def test_affected_describes_rooms_and_members_within_bounds() -> None:
    many = {
        f"!r{i:03d}:x": tuple(f"@u{j}:evil.example" for j in range(i % 7 + 1)) for i in range(40)
    }
    text = Affected(many).describe(max_rooms=10, max_users=5)
    lines = text.splitlines()
    assert lines[0] == (
        f"this change would remove {sum(len(u) for u in many.values())} member(s) from 40 "
        "room(s) (servers: evil.example):"
    )
    assert len(lines) == 12 and lines[-1] == "• … and 30 more room(s)"
    # The rooms losing the most members come first, with their first members named.
    assert lines[1] == (
        "• !r006:x: 7 member(s): @u0:evil.example, @u1:evil.example, @u2:evil.example, "
        "@u3:evil.example, @u4:evil.example and 2 more"
    )
