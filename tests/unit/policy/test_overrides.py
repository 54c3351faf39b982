"""Overrides: keyed digests, one use per grant, expiry, revocation, persistence."""

from __future__ import annotations

from bridge.policy.model import Action, Finding, Verdict
from bridge.policy.overrides import Grant, OverrideBook, content_digest, override_digest

KEY = "gate-token-xxxxxxxxxxxxxxxxxxxxx"
CARD = "4111 1111 1111 1111"


def event(body: str) -> dict[str, object]:
    return {"type": "m.room.message", "content": {"msgtype": "m.text", "body": body}}


def grant(**kw: object) -> Grant:
    values: dict[str, object] = {
        "ref": "AAAA-BBBB",
        "sender": "@a:x",
        "room_id": "!r:x",
        "digest": content_digest(KEY, event(CARD)),
        "rule": "detector:card",
        "expires": 2000.0,
        "justification": "customer asked",
    }
    values.update(kw)
    return Grant(**values)  # type: ignore[arg-type]


def test_the_digest_is_keyed_and_depends_on_type_and_content_only() -> None:
    a = content_digest(KEY, event(CARD))
    assert a == content_digest(KEY, {**event(CARD), "event_id": "$other", "sender": "@b:x"})
    assert a != content_digest("another-key-xxxxxxxxxxxxxxxxxxxxxxx", event(CARD))
    assert a != content_digest(KEY, event(CARD + " "))
    assert CARD not in a


def test_a_grant_is_used_exactly_once_and_only_for_that_message() -> None:
    changes: list[int] = []
    book = OverrideBook(on_change=lambda: changes.append(1))
    book.add(grant())
    digest = content_digest(KEY, event(CARD))
    assert book.consume("@a:x", "!other:x", digest, 1000.0) is None  # another room
    assert book.consume("@b:x", "!r:x", digest, 1000.0) is None  # another sender
    assert book.consume("@a:x", "!r:x", content_digest(KEY, event("x")), 1000.0) is None
    assert book.consume("@a:x", "!r:x", digest, 1000.0) is not None
    assert book.consume("@a:x", "!r:x", digest, 1000.0) is None  # used up
    assert len(changes) == 2


def test_expired_and_revoked_grants_are_not_usable() -> None:
    digest = content_digest(KEY, event(CARD))
    book = OverrideBook()
    book.add(grant())
    assert book.consume("@a:x", "!r:x", digest, 2000.0) is None
    book.add(grant())
    assert book.revoke("AAAA-BBBB", "@admin:x") is not None
    assert book.consume("@a:x", "!r:x", digest, 1000.0) is None
    assert book.revoke("NOPE-NOPE", "@admin:x") is None


def test_the_book_round_trips() -> None:
    book = OverrideBook()
    book.add(grant())
    again = OverrideBook()
    again.load(book.dumps())
    assert list(again.grants()) == list(book.grants())
    again.load(book.dumps(now=2000.0 + 86_401))
    assert list(again.grants()) == []
    again.load("garbage")
    assert list(again.grants()) == []


def finding(overridable: bool, action: Action = Action.BLOCK) -> Finding:
    return Finding("r", "dlp", frozenset({action}), "m", overridable=overridable)


def test_only_events_refused_by_overridable_rules_get_a_digest() -> None:
    body = {"event": event(CARD)}
    assert override_digest(KEY, "check_event_for_spam", body, Verdict((finding(True),)))
    assert not override_digest(KEY, "check_event_for_spam", body, Verdict((finding(False),)))
    mixed = Verdict((finding(True), finding(False)))
    assert not override_digest(KEY, "check_event_for_spam", body, mixed)
    with_notify = Verdict((finding(True), finding(False, Action.NOTIFY)))
    assert override_digest(KEY, "check_event_for_spam", body, with_notify)
    assert not override_digest(KEY, "user_may_invite", body, Verdict((finding(True),)))
