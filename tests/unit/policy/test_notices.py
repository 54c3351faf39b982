"""The pure core of policy notices: grouping, rate limits, opt-out, ledger, text."""

from __future__ import annotations

from dataclasses import replace

from bridge.policy.notices import (
    MAX_RECENT,
    Ledger,
    NoticeOutcome,
    NoticeSettings,
    Refusal,
    Subject,
    decide,
    is_local_user,
    new_ref,
    normalize_ref,
    render,
    subject_of,
)

SECRET = "4111 1111 1111 1111"
SETTINGS = NoticeSettings(enabled=True, group_window=600.0, per_minute=3, per_day=5)


def refusal(at: float, rule: str = "detector:card", ref: str = "") -> Refusal:
    return Refusal(
        ref=ref or new_ref(),
        rule=rule,
        room_id="!room:corp.example",
        at=at,
        subject=Subject.MESSAGE,
        reason="Your message was blocked by the data-loss-prevention rule 'detector:card'.",
        excerpt="4111 **** **** 1111",
    )


def run(ledger: Ledger, *items: Refusal, settings: NoticeSettings = SETTINGS) -> list[str]:
    outcomes = []
    for item in items:
        decision = decide(ledger, item, settings)
        ledger = decision.ledger
        outcomes.append(str(decision.outcome))
    return outcomes


def test_the_same_rule_five_times_in_the_window_gives_one_notice() -> None:
    outcomes = run(Ledger(), *(refusal(1000.0 + i) for i in range(5)))
    assert outcomes == ["sent"] + ["grouped"] * 4


def test_after_the_window_a_new_notice_counts_the_grouped_ones() -> None:
    ledger = Ledger()
    for i in range(3):
        ledger = decide(ledger, refusal(1000.0 + i), SETTINGS).ledger
    later = decide(ledger, refusal(1000.0 + 601), SETTINGS)
    assert later.outcome is NoticeOutcome.SENT
    assert later.grouped_before == 2
    again = decide(later.ledger, refusal(1000.0 + 1300), SETTINGS)
    assert (again.outcome, again.grouped_before) == (NoticeOutcome.SENT, 0)


def test_different_rules_are_not_grouped_but_limited_per_minute() -> None:
    rules = [f"keyword:list{i}" for i in range(5)]
    outcomes = run(Ledger(), *(refusal(1000.0 + i, rule=r) for i, r in enumerate(rules)))
    assert outcomes == ["sent", "sent", "sent", "rate limited", "rate limited"]


def test_per_day_limit() -> None:
    settings = replace(SETTINGS, per_minute=100, group_window=0.0)
    items = [refusal(1000.0 + 120 * i) for i in range(7)]
    assert run(Ledger(), *items, settings=settings) == ["sent"] * 5 + ["rate limited"] * 2
    # A day later the oldest have left the window.
    ledger = Ledger()
    for item in items:
        ledger = decide(ledger, item, settings).ledger
    assert decide(ledger, refusal(1000.0 + 86_400 + 1), settings).outcome is NoticeOutcome.SENT


def test_rate_limited_refusals_are_mentioned_in_the_next_notice() -> None:
    settings = replace(SETTINGS, per_minute=1)
    ledger = decide(Ledger(), refusal(1000.0, rule="a"), settings).ledger
    held = decide(ledger, refusal(1001.0, rule="b"), settings)
    assert held.outcome is NoticeOutcome.RATE_LIMITED
    nxt = decide(held.ledger, refusal(1100.0, rule="b"), settings)
    assert (nxt.outcome, nxt.grouped_before) == (NoticeOutcome.SENT, 1)


def test_opt_out_and_disabled_write_nothing_but_remember_the_refusal() -> None:
    item = refusal(1000.0)
    opted = decide(Ledger(), item, SETTINGS, notify_sender=False)
    assert opted.outcome is NoticeOutcome.OPTED_OUT
    assert opted.ledger.find(item.ref) == item
    off = decide(Ledger(), item, replace(SETTINGS, enabled=False))
    assert off.outcome is NoticeOutcome.DISABLED
    assert off.ledger.sent == ()


def test_the_ledger_round_trips_and_keeps_only_recent_refusals() -> None:
    ledger = Ledger()
    items = [refusal(1000.0 + 700 * i) for i in range(MAX_RECENT + 3)]
    for item in items:
        ledger = decide(ledger, item, replace(SETTINGS, per_day=1000)).ledger
    assert len(ledger.recent) == MAX_RECENT
    assert ledger.find(items[0].ref) is None
    assert Ledger.loads(ledger.dumps()) == ledger
    assert Ledger.loads("not json") == Ledger()
    assert Ledger.loads(None) == Ledger()


def test_the_notice_names_room_rule_reason_and_ref_but_never_the_excerpt() -> None:
    item = refusal(0.0)
    text, html = render(item, 2, "!policy")
    for part in ("!room:corp.example", "detector:card", item.ref, "1970-01-01 00:00:00 UTC"):
        assert part in text and part in html
    assert "What to do instead" in text
    assert f"!policy report {item.ref}" in text
    assert "2 earlier attempts" in text
    assert "4111" not in text and "4111" not in html and SECRET not in text


def test_a_room_refused_at_creation_is_named_as_such() -> None:
    item = replace(refusal(0.0), room_id="", subject=Subject.ROOM, rule="encryption:forbidden")
    text, html = render(item, 0, "!policy")
    assert text.startswith(f"🛡️ Your new room was not created (reference {item.ref}).")
    assert " in  " not in text and "matrix.to" not in html
    assert "create the room again without what the rule names" in text


def test_an_upload_is_named_by_type_and_size_and_cannot_be_overridden() -> None:
    item = replace(
        refusal(0.0), room_id="", subject=Subject.UPLOAD, file="PDF, 988 KiB", overridable=True
    )
    text, html = render(item, 0, "!policy")
    assert text.startswith(f"🛡️ Your upload (PDF, 988 KiB) was not stored (reference {item.ref}).")
    assert "matrix.to" not in html and "<b>Your upload (PDF, 988 KiB)</b>" in html
    assert "upload it again" in text and f"!policy report {item.ref}" in text
    assert "a refused upload cannot be overridden" in text and "override " + item.ref not in text
    assert SECRET not in text and "4111" not in html
    assert Refusal.from_json(item.to_json()) == item


def test_refs_are_short_distinct_and_normalized_as_typed() -> None:
    refs = {new_ref() for _ in range(200)}
    assert len(refs) == 200
    ref = next(iter(refs))
    assert len(ref) == 9 and ref[4] == "-"
    assert normalize_ref(ref.lower().replace("-", "")) == ref
    assert normalize_ref(" " + ref + " ") == ref


def test_subjects_and_local_users() -> None:
    assert subject_of({"type": "m.room.message"}) is Subject.MESSAGE
    assert subject_of({"type": "m.room.topic"}) is Subject.EVENT
    assert subject_of({"invitee": "@x:y"}) is Subject.INVITE
    assert subject_of({"sender": "@x:y", "room_id": "!r"}) is Subject.JOIN
    # A room refused at creation (user_may_create_room) has no room ID to name.
    assert subject_of({"sender": "@x:y", "room_id": None, "type": "m.room.create"}) is (
        Subject.ROOM
    )
    assert is_local_user("@a:corp.example", "corp.example")
    assert not is_local_user("@a:evil.corp.example.org", "corp.example")
    assert not is_local_user("@a:other.example", "corp.example")
    assert not is_local_user(None, "corp.example")


def test_warnings_go_to_a_thread_only_where_readable() -> None:
    from bridge.policy.notices import WarnPlace, render_warning, warn_place

    assert warn_place(True, False, True) is WarnPlace.THREAD
    assert warn_place(True, False, False) is WarnPlace.THREAD
    assert warn_place(True, True, True) is WarnPlace.NOTICE_ROOM
    assert warn_place(False, False, True) is WarnPlace.NOTICE_ROOM
    assert warn_place(False, False, False) is WarnPlace.NOWHERE
    assert warn_place(True, True, False) is WarnPlace.NOWHERE
    text, html = render_warning("!r:x", "keyword:x", "it matched", 0.0)
    assert "!r:x" in text and "keyword:x" in html and "was sent" in text
