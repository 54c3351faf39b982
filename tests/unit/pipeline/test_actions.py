"""The executor's action kinds and their typed constructors."""

from __future__ import annotations

from bridge.commands.registry import Reply
from bridge.pipeline import actions
from bridge.pipeline.actions import ActionKind, kind_of

#: The kinds as stored by earlier versions: queued rows must still run after an upgrade.
STORED_KINDS = {
    "send_notice",
    "send_state",
    "redact",
    "kick",
    "invite",
    "join",
    "leave",
    "make_room_admin",
    "reconcile",
    "purge_history",
    "purge_status",
    "policy_notice",
    "warn_sender",
}


def test_kinds_are_the_stored_strings() -> None:
    assert {k.value for k in ActionKind} == STORED_KINDS
    assert all(kind_of(k) is ActionKind(k) for k in STORED_KINDS)
    assert kind_of("frobnicate") is None
    assert actions.join("!r:x").kind == "join"  # compares (and is stored) as the string


def test_reconcile_is_one_action_for_now() -> None:
    a = actions.reconcile("!r:x", "drift")
    assert (a.kind, a.room_id, dict(a.payload), a.not_before) == (
        ActionKind.RECONCILE,
        "!r:x",
        {"reason": "drift"},
        0.0,
    )
    b = actions.reconcile("!r:x", "after make_room_admin", after_admin=True, rollout="r1")
    assert dict(b.payload) == {
        "reason": "after make_room_admin",
        "after_admin": True,
        "rollout": "r1",
    }
    assert a.id != b.id


def test_notices_carry_text_html_and_their_relation() -> None:
    reply = Reply.plain("a <b>\nc")
    a = actions.notice("!r:x", reply, reply_to="$q")
    assert a.kind == ActionKind.SEND_NOTICE and a.room_id == "!r:x"
    assert dict(a.payload) == {"body": "a <b>\nc", "html": "a &lt;b&gt;<br>c", "reply_to": "$q"}
    assert dict(actions.notice("!r:x", reply).payload).keys() == {"body", "html"}
    w = actions.send_notice("!r:x", "hi", "<p>hi</p>", thread_root="$t", mentions=["@u:x"])
    assert dict(w.payload) == {
        "body": "hi",
        "html": "<p>hi</p>",
        "thread_root": "$t",
        "mentions": ["@u:x"],
    }
    c = actions.send_notice("!m:x", "cp", details={"checkpoint": {"seq": 1}})
    assert dict(c.payload) == {"body": "cp", "checkpoint": {"seq": 1}}


def test_redactions_name_the_sender_only_for_retention() -> None:
    dlp = actions.redact("!r:x", "$e", "removed by company policy (keyword:x)")
    assert dlp.kind == ActionKind.REDACT
    assert dict(dlp.payload) == {
        "event_id": "$e",
        "reason": "removed by company policy (keyword:x)",
    }
    kept = actions.redact("!r:x", "$e", "retention", retention=True, sender="@u:x")
    assert dict(kept.payload) == {
        "event_id": "$e",
        "reason": "retention",
        "retention": True,
        "sender": "@u:x",
    }


def test_room_and_admin_actions() -> None:
    assert dict(actions.kick("!r:x", "@u:x", "bye").payload) == {"user_id": "@u:x", "reason": "bye"}
    assert dict(actions.invite("!r:x", "@u:x").payload) == {"user_id": "@u:x"}
    assert actions.leave("!r:x").kind == ActionKind.LEAVE
    join = actions.join("!r:x", not_before=5.0)
    assert (join.kind, dict(join.payload), join.not_before) == (ActionKind.JOIN, {}, 5.0)
    admin = actions.make_room_admin("!r:x", "@bot:x", not_before=4.0)
    assert (admin.kind, dict(admin.payload), admin.not_before) == (
        ActionKind.MAKE_ROOM_ADMIN,
        {"user_id": "@bot:x"},
        4.0,
    )
    state = actions.send_state("!r:x", "m.room.topic", {"topic": "t"})
    assert dict(state.payload) == {
        "type": "m.room.topic",
        "content": {"topic": "t"},
        "state_key": "",
    }
    purge = actions.purge_history("!r:x", 1000, not_before=9.0)
    assert dict(purge.payload) == {"purge_up_to_ts": 1000, "delete_local_events": True}
    poll = actions.purge_status("!r:x", purge.payload, "p1", 12.5, not_before=13.5)
    assert (poll.kind, poll.room_id, poll.not_before) == (ActionKind.PURGE_STATUS, "!r:x", 13.5)
    assert dict(poll.payload) == {
        "purge_up_to_ts": 1000,
        "delete_local_events": True,
        "purge_id": "p1",
        "started": 12.5,
    }
