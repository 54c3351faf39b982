"""The pure room planner: what a room needs to match policy, and what the bot may do."""

from __future__ import annotations

from typing import Any

import pytest

from bridge.policy.federation import FederationMode, FederationPolicy
from bridge.policy.retention import RetentionPolicy
from bridge.policy.rooms import INFINITE, RoomPlan, RoomState, plan_room

OWN = "corp.example"
BOT = "@policybot:corp.example"
ALICE = "@alice:corp.example"
EVE = "@eve:evil.example"
BOB = "@bob:partner.example"
DAY = 86_400_000

INTERNAL = FederationPolicy(FederationMode.INTERNAL)
OPEN = FederationPolicy(FederationMode.OPEN)
ALLOW_PARTNER = FederationPolicy(FederationMode.ALLOWLIST, ("partner.example",))
THIRTY_DAYS = RetentionPolicy(max_lifetime_ms=30 * DAY)
INTERNAL_ACL = {"allow": [OWN], "deny": [], "allow_ip_literals": False}


def create(
    version: str = "10", sender: str = ALICE, additional: list[str] | None = None
) -> dict[str, Any]:
    content: dict[str, Any] = {"room_version": version}
    if additional is not None:
        content["additional_creators"] = additional
    return {"type": "m.room.create", "state_key": "", "sender": sender, "content": content}


def power(users: dict[str, int], **extra: Any) -> dict[str, Any]:
    return {
        "type": "m.room.power_levels",
        "state_key": "",
        "content": {"users": users, "users_default": 0, **extra},
    }


def member(user: str, membership: str = "join") -> dict[str, Any]:
    return {"type": "m.room.member", "state_key": user, "content": {"membership": membership}}


def state(type_: str, content: dict[str, Any]) -> dict[str, Any]:
    return {"type": type_, "state_key": "", "content": content}


def room(*events: dict[str, Any]) -> RoomState:
    return RoomState.from_events(events)


def plan(
    rs: RoomState,
    federation: FederationPolicy = INTERNAL,
    retention: RetentionPolicy | None = None,
    **kw: Any,
) -> RoomPlan:
    return plan_room(rs, bot=BOT, own_server=OWN, federation=federation, retention=retention, **kw)


# -- reading the state -------------------------------------------------------------------------


def test_room_state_reads_what_the_planner_needs() -> None:
    rs = room(
        create("12", ALICE, additional=["@carol:corp.example", 7]),
        power({BOT: 50}),
        member(ALICE),
        member(EVE, "invite"),
        member(BOB, "leave"),
        member("@x:corp.example", "ban"),
        {"type": "m.room.member", "content": {"membership": "join"}},  # no state_key: ignored
        state("m.room.server_acl", INTERNAL_ACL),
        state("m.room.retention", {"max_lifetime": DAY}),
        {"type": "m.room.topic", "state_key": "", "content": "not a mapping"},
    )
    assert rs.room_version == "12"
    assert rs.creators == {ALICE, "@carol:corp.example"}
    assert rs.has_power_levels
    assert rs.members == {ALICE: "join", EVE: "invite", BOB: "leave", "@x:corp.example": "ban"}
    assert rs.acl == INTERNAL_ACL
    assert rs.retention == {"max_lifetime": DAY}


def test_empty_acl_and_retention_contents_count_as_absent() -> None:
    rs = room(create(), state("m.room.server_acl", {}), state("m.room.retention", {}))
    assert rs.acl is None and rs.retention is None


def test_power_in_room_version_12_creators_are_infinite() -> None:
    rs = room(create("12", ALICE, additional=["@carol:corp.example"]), power({BOT: 100}))
    assert rs.creators_outrank
    assert rs.power_of(ALICE) == INFINITE
    assert rs.power_of("@carol:corp.example") == INFINITE
    assert rs.power_of(BOT) == 100
    assert rs.power_of(EVE) == 0


def test_power_in_older_room_versions_comes_from_power_levels() -> None:
    rs = room(create("10", ALICE), power({ALICE: 100, BOT: 50}, users_default=10))
    assert not rs.creators_outrank
    assert rs.power_of(ALICE) == 100
    assert rs.power_of(BOT) == 50
    assert rs.power_of(EVE) == 10  # users_default


def test_power_without_a_power_levels_event() -> None:
    rs = room(create("10", ALICE), member(ALICE), member(BOT))
    assert not rs.has_power_levels
    assert rs.power_of(ALICE) == 100  # the creator
    assert rs.power_of(BOT) == 0
    assert rs.needed_for_state("m.room.server_acl") == 0
    # The spec's defaults still hold for kicks: only the creator may kick.
    assert rs.needed_for("kick") == 50
    assert rs.needed_for("invite") == 0


def test_needed_power_for_state_events() -> None:
    rs = room(
        create(),
        power({}, state_default=60, events={"m.room.server_acl": 100, "m.room.retention": "x"}),
    )
    assert rs.needed_for_state("m.room.server_acl") == 100
    assert rs.needed_for_state("m.room.topic") == 60
    # A malformed override falls back to state_default.
    assert rs.needed_for_state("m.room.retention") == 60
    assert room(create(), power({})).needed_for_state("m.room.topic") == 50
    assert room(create(), power({}, kick=75)).needed_for("kick") == 75


# -- planning ----------------------------------------------------------------------------------


def test_a_room_out_of_line_gets_its_acl_and_retention() -> None:
    rs = room(create("10", ALICE), power({ALICE: 100, BOT: 100}), member(ALICE), member(BOT))
    p = plan(rs, INTERNAL, THIRTY_DAYS)
    assert p.set_state == (
        ("m.room.server_acl", "", INTERNAL_ACL),
        ("m.room.retention", "", {"max_lifetime": 30 * DAY}),
    )
    assert (p.kicks, p.lacking, p.unkickable) == ((), (), ())
    assert not p.in_line


def test_a_room_in_line_gets_an_empty_plan() -> None:
    rs = room(
        create("10", ALICE),
        power({ALICE: 100, BOT: 100}),
        member(ALICE),
        member(BOT),
        # Same ACL in another order and case, as a moderator might have written it.
        state("m.room.server_acl", {"allow": ["CORP.example"], "allow_ip_literals": False}),
        state("m.room.retention", {"max_lifetime": 30 * DAY}),
    )
    p = plan(rs, INTERNAL, THIRTY_DAYS)
    assert p == RoomPlan()
    assert p.in_line


def test_open_federation_and_no_retention_manage_nothing() -> None:
    rs = room(create("10", ALICE), power({BOT: 0}), member(EVE), member(BOB))
    assert plan(rs, OPEN, None).in_line
    assert plan(rs, OPEN, RetentionPolicy()).in_line


def test_missing_power_is_reported_not_attempted() -> None:
    rs = room(
        create("10", ALICE),
        power({ALICE: 100, BOT: 20}, events={"m.room.server_acl": 100}),
        member(ALICE),
        member(BOT),
    )
    p = plan(rs, INTERNAL, THIRTY_DAYS)
    assert p.set_state == ()
    assert p.lacking == (
        "power level 100 to send m.room.server_acl (the bot has 20)",
        "power level 50 to send m.room.retention (the bot has 20)",
    )
    assert not p.in_line


def test_only_what_is_out_of_line_is_sent() -> None:
    rs = room(
        create("10", ALICE),
        power({BOT: 100}),
        state("m.room.server_acl", INTERNAL_ACL),
        state("m.room.retention", {"max_lifetime": 7 * DAY}),
    )
    p = plan(rs, INTERNAL, THIRTY_DAYS)
    assert p.set_state == (("m.room.retention", "", {"max_lifetime": 30 * DAY}),)


def test_excluded_members_are_kicked_where_the_bot_outranks_them() -> None:
    rs = room(
        create("10", ALICE),
        power({ALICE: 100, BOT: 50, "@mod:evil.example": 50, "@boss:evil.example": 90}),
        member(ALICE),
        member(BOT),
        member(EVE),  # power 0: kicked
        member("@inv:evil.example", "invite"),  # an invite is revoked too
        member("@knock:evil.example", "knock"),
        member("@gone:evil.example", "leave"),  # not a member any more: left alone
        member("@banned:evil.example", "ban"),
        member("@mod:evil.example"),  # same power as the bot: cannot
        member("@boss:evil.example"),  # more power than the bot: cannot
        member(BOB),  # allowed server: stays
        member("@carol:corp.example"),  # own server: stays
    )
    p = plan(rs, ALLOW_PARTNER)
    assert {u for u, _ in p.kicks} == {EVE, "@inv:evil.example", "@knock:evil.example"}
    assert all(
        r == "federation with evil.example is not allowed by company policy" for _, r in p.kicks
    )
    assert dict(p.unkickable) == {
        "@mod:evil.example": "the member's power is not below the bot's",
        "@boss:evil.example": "the member's power is not below the bot's",
    }


def test_no_kicks_when_the_bot_lacks_kick_power() -> None:
    rs = room(create("10", ALICE), power({BOT: 40}, kick=50), member(BOT), member(EVE))
    p = plan(rs, INTERNAL)
    assert p.kicks == ()
    assert p.unkickable == ((EVE, "the bot needs power 50 to kick"),)


def test_without_power_levels_only_a_creator_bot_kicks() -> None:
    not_creator = room(create("10", ALICE), member(ALICE), member(BOT), member(EVE))
    p = plan(not_creator, INTERNAL)
    assert p.kicks == ()
    assert p.unkickable == ((EVE, "the bot needs power 50 to kick"),)
    # The ACL needs no power without a power levels event.
    assert p.set_state == (("m.room.server_acl", "", INTERNAL_ACL),)

    creator = room(create("10", BOT), member(BOT), member(EVE))
    assert plan(creator, INTERNAL).kicks == (
        (EVE, "federation with evil.example is not allowed by company policy"),
    )


def test_room_version_12_creators_cannot_be_kicked() -> None:
    rs = room(
        create("12", EVE, additional=["@mallory:evil.example"]),
        power({BOT: 100}),
        member(EVE),
        member("@mallory:evil.example"),
        member(BOT),
        member("@trudy:evil.example"),
    )
    p = plan(rs, INTERNAL)
    assert p.kicks == (
        ("@trudy:evil.example", "federation with evil.example is not allowed by company policy"),
    )
    assert dict(p.unkickable) == {
        EVE: "a room creator cannot be removed (room version 12)",
        "@mallory:evil.example": "a room creator cannot be removed (room version 12)",
    }


def test_room_version_12_bot_as_creator_outranks_everyone() -> None:
    rs = room(
        create("12", BOT),
        power({"@boss:evil.example": 100}, events={"m.room.server_acl": 100}),
        member(BOT),
        member("@boss:evil.example"),
    )
    p = plan(rs, INTERNAL, THIRTY_DAYS)
    assert p.lacking == ()
    assert [t for t, _k, _c in p.set_state] == ["m.room.server_acl", "m.room.retention"]
    assert p.kicks == (
        ("@boss:evil.example", "federation with evil.example is not allowed by company policy"),
    )


def test_a_version_11_creator_is_not_infinite() -> None:
    rs = room(create("11", EVE), power({EVE: 100, BOT: 100}), member(EVE), member(BOT))
    p = plan(rs, INTERNAL)
    # Equal power: the bot cannot kick, but the reason is power, not creatorship.
    assert p.unkickable == ((EVE, "the member's power is not below the bot's"),)


def test_kick_excluded_off_plans_no_kicks() -> None:
    rs = room(create("10", BOT), power({BOT: 100}), member(EVE))
    p = plan(rs, INTERNAL, kick_excluded=False)
    assert p.kicks == () and p.unkickable == ()
    assert p.set_state  # the ACL still is


@pytest.mark.parametrize("version", ["1", "9", "10", "11"])
def test_old_room_versions_never_report_creator_unkickable(version: str) -> None:
    rs = room(create(version, EVE), power({BOT: 100}), member(EVE), member(BOT))
    p = plan(rs, INTERNAL)
    assert p.kicks == ((EVE, "federation with evil.example is not allowed by company policy"),)


# -- retention lifted ---------------------------------------------------------------------


def test_a_lifted_retention_empties_the_rooms_stale_retention_state() -> None:
    rs = room(
        create("10", ALICE), power({BOT: 100}), state("m.room.retention", {"max_lifetime": DAY})
    )
    # retention off: the room must not keep showing (and Synapse purging by) the old limit
    p = plan(rs, OPEN, RetentionPolicy())
    assert p.set_state == (("m.room.retention", "", {}),)
    stale_min = room(
        create("10", ALICE), power({BOT: 100}), state("m.room.retention", {"min_lifetime": DAY})
    )
    assert plan(stale_min, OPEN, RetentionPolicy()).set_state == (("m.room.retention", "", {}),)
    # already empty, or never set: nothing to send; no policy at all: not managed
    assert plan(
        room(create("10", ALICE), power({BOT: 100}), state("m.room.retention", {})),
        OPEN,
        RetentionPolicy(),
    ).in_line
    assert plan(room(create("10", ALICE), power({BOT: 100})), OPEN, RetentionPolicy()).in_line
    assert plan(rs, OPEN, None).in_line


def test_emptying_a_stale_retention_needs_power_too() -> None:
    rs = room(
        create("10", ALICE), power({BOT: 10}), state("m.room.retention", {"max_lifetime": DAY})
    )
    p = plan(rs, OPEN, RetentionPolicy())
    assert p.set_state == ()
    assert p.lacking == ("power level 50 to send m.room.retention (the bot has 10)",)
