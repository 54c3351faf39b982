"""Retention policy, m.room.retention content, expiry and legal holds."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.policy.durations import MAX_DURATION_MS, DurationError
from bridge.policy.retention import (
    Purge,
    RetentionPolicy,
    RetentionPolicyError,
    RoomRetention,
    SkippedPurge,
    expiry_cutoff,
    is_expired,
    is_on_hold,
    plan_sweep,
    retention_content,
    retention_matches,
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
    assert retention_content(RetentionPolicy()) is None
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


def test_is_on_hold() -> None:
    assert is_on_hold("!a:x", "@u:x", {"!a:x"}, set())
    assert is_on_hold("!b:x", "@u:x", set(), {"@u:x"})
    assert not is_on_hold("!b:x", "@v:x", {"!a:x"}, {"@u:x"})
    assert not is_on_hold(None, None, {"!a:x"}, {"@u:x"})


def test_plan_sweep() -> None:
    thirty = RetentionPolicy(30 * D)
    rooms = [
        RoomRetention("!plain:x", thirty, frozenset({"@a:x"})),
        RoomRetention("!held:x", thirty),
        RoomRetention("!user-held:x", thirty, frozenset({"@b:x", "@c:x"})),
        RoomRetention("!no-max:x", RetentionPolicy(None, D)),
        RoomRetention("!none:x", None),
        RoomRetention("!done:x", thirty),
        RoomRetention("!stale:x", thirty),
    ]
    cutoff = NOW - 30 * D
    plan = plan_sweep(
        rooms,
        NOW,
        held_rooms={"!held:x"},
        held_users={"@c:x"},
        last_purged={"!done:x": cutoff, "!stale:x": cutoff - 1},
    )
    assert plan.purges == (Purge("!plain:x", cutoff), Purge("!stale:x", cutoff))
    assert plan.skipped == (
        SkippedPurge("!held:x", "room !held:x is on legal hold"),
        SkippedPurge("!user-held:x", "legal hold on @c:x, who sent messages in !user-held:x"),
    )


def test_plan_sweep_nothing_expired_yet() -> None:
    plan = plan_sweep([RoomRetention("!a:x", RetentionPolicy(30 * D))], now_ms=D)
    assert plan.purges == () and plan.skipped == ()


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
