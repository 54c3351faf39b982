"""What a room-policy change did, in words: outcomes, rollout tallies, replies, room notice."""

from __future__ import annotations

from typing import Any

from bridge.policy.outcomes import (
    FIX,
    KICK,
    Outcome,
    RolloutTally,
    RoomOutcome,
    change_reply,
    classify,
    lack_reason,
    power_lacks,
    power_problem,
    rollout_text,
    room_notice,
)
from bridge.policy.rooms import RoomState

BOT = "@policybot:corp.example"
CREATOR = "@owner:corp.example"
NO_RETENTION = "power level 50 to send m.room.retention (the bot has 0)"
NO_ACL = "power level 50 to send m.room.server_acl (the bot has 0)"


def v12_room(bot_power: int | None = None, **levels: Any) -> RoomState:
    users = {} if bot_power is None else {BOT: bot_power}
    return RoomState.from_events(
        [
            {
                "type": "m.room.create",
                "state_key": "",
                "sender": CREATOR,
                "content": {"room_version": "12"},
            },
            {
                "type": "m.room.power_levels",
                "state_key": "",
                "content": {"users": users, "state_default": 50, **levels},
            },
        ]
    )


def test_classify_applied_not_applied_failed() -> None:
    assert classify({"sent": ["m.room.retention"], "lacking": [], "unkickable": []}) == RoomOutcome(
        Outcome.APPLIED
    )
    assert classify({"sent": [], "kicked": []}).outcome is Outcome.APPLIED  # already in line
    lacking = classify({"sent": [], "lacking": [NO_RETENTION], "unkickable": []})
    assert lacking == RoomOutcome(
        Outcome.NOT_APPLIED, ("lacks power level 50 to send m.room.retention",)
    )
    creators = classify(
        {
            "lacking": [],
            "unkickable": [
                "@a:evil.example: a room creator cannot be removed (room version 12)",
                "@b:evil.example: a room creator cannot be removed (room version 12)",
            ],
        }
    )
    # the same reason for two members counts once for the room
    assert creators.reasons == (
        "cannot remove members: a room creator cannot be removed (room version 12)",
    )
    failed = classify({"error": "the bot is not allowed to read the room state in !r:x"})
    assert failed == RoomOutcome(
        Outcome.FAILED, ("the bot is not allowed to read the room state in !r:x",)
    )
    # Named with its room, the room is left out so that rooms failing alike group.
    unread = classify({"error": "the bot is not allowed to read the room state in !r:x"}, "!r:x")
    assert unread.reasons == ("the bot is not allowed to read the room state",)
    assert not power_problem(unread)  # not in the room: no power level fixes that
    refused = classify({"error": "the bot is not allowed to kick users in !r:x (M_FORBIDDEN)"})
    assert power_problem(refused)


def test_lack_reason_drops_what_the_bot_has_so_rooms_group() -> None:
    assert lack_reason(NO_RETENTION) == "lacks power level 50 to send m.room.retention"
    assert lack_reason("power level 50 to send m.room.retention (the bot has 10)") == (
        lack_reason(NO_RETENTION)
    )


def test_power_lacks_read_from_state() -> None:
    assert power_lacks(v12_room(), BOT) == {
        "m.room.server_acl": "power level 50 to send m.room.server_acl (the bot has 0)",
        "m.room.retention": NO_RETENTION,
        KICK: "power level 50 to kick (the bot has 0)",
    }
    assert power_lacks(v12_room(100), BOT) == {}
    # A room that lets moderators send retention but not the ACL.
    partial = power_lacks(v12_room(50, events={"m.room.server_acl": 100}), BOT)
    assert partial == {
        "m.room.server_acl": "power level 100 to send m.room.server_acl (the bot has 50)"
    }


def test_the_tally_counts_rooms_by_outcome_and_reason_and_survives_json() -> None:
    tally = RolloutTally()
    tally.add(classify({"sent": ["m.room.retention"]}))
    tally.add(classify({"lacking": [NO_RETENTION]}))
    tally.add(classify({"lacking": ["power level 50 to send m.room.retention (the bot has 10)"]}))
    tally.add(classify({"error": "gave up after 5 attempts: HTTP 502"}))
    assert (tally.applied, tally.not_applied, tally.failed, tally.counted) == (1, 2, 1, 4)
    assert tally.reasons == {"lacks power level 50 to send m.room.retention": 2}
    assert tally.failures == {"gave up after 5 attempts: HTTP 502": 1}
    assert tally.fixable
    assert RolloutTally.from_doc(tally.to_doc()) == tally
    assert RolloutTally.from_doc(None) == RolloutTally()
    assert RolloutTally.from_doc({"applied": "x", "reasons": []}) == RolloutTally()
    # Creators that cannot be removed are no power an admin could give.
    creators = RolloutTally()
    creators.add(classify({"unkickable": ["@a:e: a room creator cannot be removed"]}))
    assert creators.not_applied == 1 and not creators.fixable


def test_rollout_text_progress_and_final() -> None:
    tally = RolloutTally()
    tally.add(classify({"lacking": [NO_RETENTION]}))
    progress = rollout_text("retention set to 30d", 1, 4, 25, tally)
    assert progress.splitlines() == [
        "Policy rollout (retention set to 30d): 1 of 4 rooms processed (25%): applied in 0 "
        "rooms, not applied in 1 room, failed in 0 rooms.",
        "Not applied:",
        "• lacks power level 50 to send m.room.retention: 1 room",
        FIX,
    ]
    # Finished without changing anything: a warning, not "processed (100%)".
    final = rollout_text("retention set to 30d", 1, 1, 100, tally, fix=False)
    assert final.splitlines() == [
        "⚠️ Policy rollout (retention set to 30d) finished (1 of 1 rooms processed): applied "
        "in 0 rooms, not applied in 1 room, failed in 0 rooms.",
        "Not applied:",
        "• lacks power level 50 to send m.room.retention: 1 room",
    ]
    good = RolloutTally(applied=3)
    assert rollout_text("r", 3, 3, 100, good) == (
        "✅ Policy rollout (r) finished: applied in all 3 rooms."
    )
    assert rollout_text("r", 0, 0, 100, RolloutTally()) == (
        "Policy rollout (r) finished: there was no room to update."
    )
    failed = RolloutTally()
    failed.add(classify({"error": "boom"}))
    assert rollout_text("r", 1, 1, 100, failed).splitlines()[1:] == ["Failed:", "• boom: 1 room"]


def test_rollout_text_bounds_the_reasons() -> None:
    tally = RolloutTally()
    for i in range(15):
        tally.add(classify({"error": f"error {i:02d}"}))
    lines = rollout_text("r", 15, 15, 100, tally, limit=10).splitlines()
    assert lines[-1] == "• … and 5 more reason(s)"
    assert len([ln for ln in lines if ln.startswith("• error")]) == 10


def test_change_reply() -> None:
    head = "messages older than 30d will be removed in !r:x"
    assert change_reply(head, 3, {}) == f"✅ {head}. Recorded; applying it to 3 rooms."
    assert change_reply(head, 0, {}) == f"✅ {head}. Recorded; applying it to 0 rooms."
    all_blocked = change_reply(head, 1, {"!r:x": NO_RETENTION}, "!pol")
    assert all_blocked.splitlines() == [
        f"⚠️ {head}. Recorded, but the bot cannot apply it in the 1 room it reaches:",
        "• lacks power level 50 to send m.room.retention: 1 room",
        f"`!pol rooms lacking` lists them. {FIX}",
    ]
    some = change_reply(head, 5, {"!a:x": NO_RETENTION, "!b:x": NO_RETENTION})
    assert some.splitlines()[:2] == [
        f"⚠️ {head}. Recorded; applying it to 5 rooms: applied where the bot can (3 rooms), "
        "but it cannot apply it in 2 rooms:",
        "• lacks power level 50 to send m.room.retention: 2 rooms",
    ]
    assert "homeserver.admin_token" in FIX and "bridge.obtain_power: true" in FIX


def test_room_notice_names_the_level_and_what_it_means() -> None:
    text = room_notice([NO_RETENTION])
    assert text == (
        "⚠️ The policy bot cannot enforce the organization's policy in this room until it is "
        "given power level 50 (it lacks power level 50 to send m.room.retention). Until then "
        "old messages are not removed on the organization's schedule. A room creator can raise "
        "the bot's power level."
    )
    both = room_notice(
        [
            "power level 100 to send m.room.server_acl (the bot has 0)",
            NO_RETENTION,
            "the bot needs power 50 to kick",
        ]
    )
    assert "given power level 100 " in both
    assert "servers the organization does not allow are not kept out" in both
    assert "members from servers that are not allowed are not removed" in both
    assert "given a room creator's power" in room_notice(
        ["power level creator to send m.room.retention (the bot has 100)"]
    )
    assert "given the power it needs" in room_notice(["something else"])
