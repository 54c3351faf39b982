"""Override grants of several replicas merge without losing a use or a grant."""

from __future__ import annotations

import json

from bridge.policy.overrides import Grant, OverrideBook


def grant(ref: str, expires: float = 1000.0, **kw: object) -> Grant:
    return Grant(ref, "@u:x", "!r:x", f"d-{ref}", "rule", expires, "why", **kw)  # type: ignore[arg-type]


def book(*grants: Grant) -> OverrideBook:
    b = OverrideBook()
    for g in grants:
        b.add(g)
    return b


def test_a_use_on_one_replica_and_a_grant_on_another_both_survive() -> None:
    leader = book(grant("A"), grant("B"))  # the leader granted B after the follower read A
    follower = book(grant("A"))
    assert follower.consume("@u:x", "!r:x", "d-A", now=1.0) is not None
    leader.merge(follower.dumps())
    follower.merge(leader.dumps())
    for b in (leader, follower):
        assert {g.ref: g.used for g in b.grants()} == {"A": True, "B": False}
    assert leader.consume("@u:x", "!r:x", "d-A", now=1.0) is None  # used up everywhere


def test_merging_is_order_independent_and_a_fresh_grant_wins() -> None:
    revoked = book(grant("A", revoked_by="@admin:x"))
    regranted = book(grant("A", expires=2000.0))
    one, two = book(), book()
    one.merge(revoked.dumps())
    one.merge(regranted.dumps())
    two.merge(regranted.dumps())
    two.merge(revoked.dumps())
    assert json.loads(one.dumps()) == json.loads(two.dumps())
    assert one.get("A") == grant("A", expires=2000.0)


def test_merging_tells_no_one() -> None:
    calls: list[int] = []
    b = OverrideBook(on_change=lambda: calls.append(1))
    b.merge(book(grant("A")).dumps())
    assert calls == [] and b.get("A") is not None
