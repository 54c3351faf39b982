"""Retention policy, m.room.retention content, expiry and legal holds."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.policy.durations import MAX_DURATION_MS, DurationError
from bridge.policy.retention import (
    Fate,
    Purge,
    RetentionPolicy,
    RetentionPolicyError,
    SkippedPurge,
    already_redacted,
    event_hold,
    expiry_cutoff,
    is_expired,
    plan_purge,
    purge_due,
    purge_hold,
    retention_content,
    retention_matches,
    sweep_fate,
)

D = 24 * 60 * 60 * 1000
NOW = 1_700_000_000_000


def test_policy_validation() -> None:
    RetentionPolicy(30 * D, 1 * D)
    RetentionPolicy(30 * D, 30 * D)
    RetentionPolicy(None, 1 * D)
    RetentionPolicy()
    with pytest.raises(RetentionPolicyError, match=r"min_lifetime \(31d\) is longer than"):
        RetentionPolicy(30 * D, 31 * D)
    with pytest.raises(RetentionPolicyError, match="longer than zero"):
        RetentionPolicy(0)
    with pytest.raises(RetentionPolicyError, match="longer than zero"):
        RetentionPolicy(None, -5)
    with pytest.raises(RetentionPolicyError, match="whole number"):
        RetentionPolicy(1.5)  # type: ignore[arg-type]
    with pytest.raises(RetentionPolicyError, match="whole number"):
        RetentionPolicy(True)
    with pytest.raises(RetentionPolicyError, match="too long"):
        RetentionPolicy(MAX_DURATION_MS + 1)


def test_from_text() -> None:
    assert RetentionPolicy.from_text("90d", "1d") == RetentionPolicy(90 * D, D)
    assert RetentionPolicy.from_text("90d") == RetentionPolicy(90 * D, None)
    assert RetentionPolicy.from_text(None, "") == RetentionPolicy()
    with pytest.raises(DurationError):
        RetentionPolicy.from_text("90 days")
    with pytest.raises(RetentionPolicyError):
        RetentionPolicy.from_text("1d", "2d")


def test_describe() -> None:
    assert RetentionPolicy().describe() == "no retention limits"
    assert RetentionPolicy(90 * D, D).describe() == (
        "messages are deleted after 90d, kept at least 1d"
    )


def test_retention_content() -> None:
    assert retention_content(None) is None
    # lifted: the room's retention state is emptied, not left as it was
    assert retention_content(RetentionPolicy()) == {}
    assert retention_content(RetentionPolicy(30 * D)) == {"max_lifetime": 30 * D}
    assert retention_content(RetentionPolicy(30 * D, D)) == {
        "max_lifetime": 30 * D,
        "min_lifetime": D,
    }
    assert retention_content(RetentionPolicy(None, D)) == {"min_lifetime": D}


def test_retention_matches() -> None:
    desired = {"max_lifetime": 30 * D}
    assert retention_matches({"max_lifetime": 30 * D}, desired)
    assert retention_matches({"max_lifetime": 30 * D, "extra": "x"}, desired)
    assert not retention_matches({"max_lifetime": 31 * D}, desired)
    assert not retention_matches({"max_lifetime": 30 * D, "min_lifetime": D}, desired)
    assert not retention_matches(None, desired)
    assert not retention_matches({"max_lifetime": "2592000000"}, desired)  # string is no bound
    assert retention_matches({"max_lifetime": "30d"}, {})  # both unbounded
    assert retention_matches(None, {})  # no retention state: already unbounded
    assert retention_matches({}, {})
    assert not retention_matches({"max_lifetime": 30 * D}, {})  # a stale limit
    assert not retention_matches({"min_lifetime": D}, {})
    assert retention_matches({"max_lifetime": 1}, None)  # unmanaged


def test_expiry_cutoff_and_is_expired() -> None:
    policy = RetentionPolicy(30 * D)
    cutoff = expiry_cutoff(policy, NOW)
    assert cutoff == NOW - 30 * D
    assert is_expired(policy, cutoff - 1, NOW)
    assert not is_expired(policy, cutoff, NOW)
    assert expiry_cutoff(RetentionPolicy(None, D), NOW) is None
    assert expiry_cutoff(None, NOW) is None
    assert not is_expired(None, 0, NOW)
    assert expiry_cutoff(policy, 5) == 0  # never negative


def test_event_hold() -> None:
    assert event_hold("!a:x", "@u:x", {"!a:x"}, set()) == "room on legal hold"
    assert event_hold("!b:x", "@u:x", set(), {"@u:x"}) == "user on legal hold"
    assert event_hold("!a:x", "@u:x", {"!a:x"}, {"@u:x"}) == "room on legal hold"
    assert event_hold("!b:x", "@v:x", {"!a:x"}, {"@u:x"}) is None
    assert event_hold(None, None, {"!a:x"}, {"@u:x"}) is None


def test_purge_hold() -> None:
    assert purge_hold("!a:x", {"!a:x"}, ()) == "room on legal hold"
    assert purge_hold("!b:x", {"!a:x"}, {"@u:x"}) == (
        "a user on legal hold sent messages in this room"
    )
    assert purge_hold("!b:x", {"!a:x"}, ()) is None


def message(**over: object) -> dict[str, object]:
    return {
        "event_id": "$e",
        "type": "m.room.message",
        "sender": "@a:x",
        "content": {"body": "hi"},
        **over,
    }


def test_sweep_fate() -> None:
    assert sweep_fate(message(), set(), set()) is Fate.REDACT
    assert sweep_fate(None, set(), set()) is Fate.UNREADABLE
    # state events and redactions are never removed by retention
    assert sweep_fate(message(type="m.room.topic", state_key=""), set(), set()) is Fate.STATE
    assert sweep_fate(message(type="m.room.redaction", content={}), set(), set()) is Fate.STATE
    # gone already: redacted by someone (known), redacted on arrival, or no ID to redact
    assert sweep_fate(message(), {"$e"}, set()) is Fate.REDACTED
    assert sweep_fate(message(content={}), set(), set()) is Fate.REDACTED
    redacted = message(unsigned={"redacted_because": {"event_id": "$r"}})
    assert sweep_fate(redacted, set(), set()) is Fate.REDACTED
    assert sweep_fate(message(event_id=None), set(), set()) is Fate.REDACTED
    # a held sender's messages stay; a state event of theirs is still just state
    assert sweep_fate(message(), set(), {"@a:x"}) is Fate.HELD
    assert sweep_fate(message(sender="@b:x"), set(), {"@a:x"}) is Fate.REDACT
    assert sweep_fate(message(state_key="x"), set(), {"@a:x"}) is Fate.STATE
    assert not already_redacted(message(type="m.room.redaction", content={}))


def test_plan_purge() -> None:
    cutoff = NOW - 30 * D
    kw = {"held_rooms": {"!held:x"}, "held_senders": ()}
    assert plan_purge("!a:x", cutoff, purged_to=0, pending=3, **kw) == Purge("!a:x", cutoff)
    # nothing swept since the last purge, or that purge already reached this cutoff
    assert plan_purge("!a:x", cutoff, purged_to=0, pending=0, **kw) is None
    assert plan_purge("!a:x", cutoff, purged_to=cutoff, pending=3, **kw) is None
    assert plan_purge("!a:x", cutoff, purged_to=cutoff - 1, pending=3, **kw) == Purge(
        "!a:x", cutoff
    )
    assert plan_purge("!held:x", cutoff, purged_to=0, pending=3, **kw) == SkippedPurge(
        "!held:x", "room on legal hold"
    )
    assert plan_purge(
        "!a:x", cutoff, purged_to=0, pending=3, held_rooms=(), held_senders={"@c:x"}
    ) == SkippedPurge("!a:x", "a user on legal hold sent messages in this room")
    assert purge_due(cutoff, 0, 1) and not purge_due(cutoff, cutoff, 1)


lifetimes = st.one_of(st.none(), st.integers(1, MAX_DURATION_MS))


@given(lifetimes, lifetimes)
def test_content_round_trips_through_matches(a: int | None, b: int | None) -> None:
    lo, hi = (a, b) if a is None or b is None or a <= b else (b, a)
    policy = RetentionPolicy(max_lifetime_ms=hi, min_lifetime_ms=lo)
    content = retention_content(policy)
    assert retention_matches(content, content)
    if content is not None:
        assert content.get("max_lifetime") == hi
        assert content.get("min_lifetime") == lo
