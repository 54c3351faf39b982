"""The retention sweeper against a real store (SQLite and PostgreSQL), no homeserver.

Events are ingested like appservice transactions; the sweeper's actions land in the
store's action queue, where the tests read them.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import Any

import pytest

from bridge.config import Config, build_config
from bridge.pipeline.live_policy import build_engine
from bridge.pipeline.sweeper import (
    PROGRESS_PREFIX,
    TOTALS_KEY,
    RetentionSweeper,
    SweepSettings,
    load_holds,
)
from bridge.policy.engine import PolicyEngine
from bridge.store import ActionRow, Store
from tests.kit.config import make_config

DAY = 86_400_000
NOW = 1_750_000_000_000
OLD = NOW - 3 * DAY
BOT = "@policybot:example.org"
ROOM_A = "!a:example.org"
ROOM_B = "!b:example.org"
ROOM_C = "!c:example.org"
ALICE = "@alice:example.org"
BOB = "@bob:example.org"

_ids = itertools.count()


def config(**audit: Any) -> Config:
    data: dict[str, Any] = {
        "homeserver": {"url": "http://127.0.0.1:1", "domain": "example.org"},
        "appservice": {
            "as_token": "as-secret-xxxxxxxxxxxxxxxxxxxxxx",
            "hs_token": "hs-secret-xxxxxxxxxxxxxxxxxxxxxx",
        },
        "gate": {"token": "gate-secret-xxxxxxxxxxxxxxxxxxxx"},
        "retention": {"max_lifetime": "1d"},
    }
    if audit:
        data["audit"] = audit
    return build_config(data, env={})


def message(room: str, ts: int, sender: str = ALICE, body: str = "hi") -> dict[str, Any]:
    return {
        "event_id": f"$m{next(_ids)}",
        "room_id": room,
        "sender": sender,
        "type": "m.room.message",
        "origin_server_ts": ts,
        "content": {"msgtype": "m.text", "body": body},
    }


def state_event(room: str, ts: int) -> dict[str, Any]:
    return {
        "event_id": f"$s{next(_ids)}",
        "room_id": room,
        "sender": ALICE,
        "type": "m.room.topic",
        "state_key": "",
        "origin_server_ts": ts,
        "content": {"topic": "old topic"},
    }


def redaction(room: str, ts: int, target: str, sender: str = ALICE) -> dict[str, Any]:
    return {
        "event_id": f"$r{next(_ids)}",
        "room_id": room,
        "sender": sender,
        "type": "m.room.redaction",
        "redacts": target,
        "origin_server_ts": ts,
        "content": {},
    }


async def ingest(store: Store, events: Sequence[dict[str, Any]]) -> None:
    await store.queue.ingest(f"t{next(_ids)}", list(events))


async def actions(store: Store) -> list[ActionRow]:
    return await store.actions.due(time.time() + 3600, limit=10_000)


def redacted_ids(rows: Sequence[ActionRow]) -> list[str]:
    return [a.payload["event_id"] for a in rows if a.kind == "redact"]


class Harness:
    def __init__(self, store: Store, cfg: Config, *, purge: bool = False, **settings: Any) -> None:
        self.store = store
        self.cfg = cfg
        self.engine: PolicyEngine = build_engine(cfg, {}, "!mgmt:example.org")
        self.now = NOW
        self.purge = purge
        self.settings = SweepSettings(**{"purge_delay_s": 0.0, **settings})

    def sweeper(self) -> RetentionSweeper:
        return RetentionSweeper(
            self.store,
            lambda: self.engine,
            lambda: self.cfg,
            purge=lambda: self.purge,
            management_room=lambda: "!mgmt:example.org",
            clock=lambda: self.now,
            settings=self.settings,
        )


async def joined(store: Store, *rooms: str) -> None:
    for room in rooms:
        await store.rooms.upsert(room, joined=True)


async def test_redacts_old_messages_only_and_skips_state_and_redacted(store: Store) -> None:
    await joined(store, ROOM_A, "!mgmt:example.org")
    old = [message(ROOM_A, OLD + i) for i in range(5)]
    user_redaction = redaction(ROOM_A, OLD + 10, old[1]["event_id"])
    new = [message(ROOM_A, NOW - 1000), message(ROOM_A, NOW - 10)]
    mgmt_old = message("!mgmt:example.org", OLD)
    await ingest(store, [*old, state_event(ROOM_A, OLD + 7), user_redaction, *new, mgmt_old])
    h = Harness(store, config())
    sweeper = h.sweeper()
    assert not await sweeper.tick()
    rows = await actions(store)
    assert sorted(redacted_ids(rows)) == sorted(e["event_id"] for i, e in enumerate(old) if i != 1)
    assert {a.room_id for a in rows} == {ROOM_A}
    assert all(a.payload["reason"] == "retention: older than 1d" for a in rows)
    # nothing twice, and nothing readable in the state table
    assert not await sweeper.tick()
    assert len(await actions(store)) == 4
    keys = [k for k in await store_keys(store) if k.startswith(PROGRESS_PREFIX)]
    assert len(keys) == 1 and ROOM_A not in keys[0]
    assert ROOM_A not in (await store.state.get(keys[0]) or "")
    assert sweeper.totals.events_removed == 4
    assert "4 event(s) removed" in "\n".join(sweeper.status_lines())
    # time passes: the newer messages expire too
    h.now = NOW + 2 * DAY
    await sweeper.tick()
    assert sorted(redacted_ids(await actions(store))[4:]) == sorted(e["event_id"] for e in new)


async def store_keys(store: Store) -> list[str]:
    from sqlalchemy import select

    from bridge.store.schema import state

    async with store.db.engine.connect() as conn:
        return [r[0] for r in await conn.execute(select(state.c.key))]


async def test_batches_resume_after_restart_without_redoing(store: Store) -> None:
    await joined(store, ROOM_A, ROOM_B)
    events_a = [message(ROOM_A, OLD + i) for i in range(5)]
    events_b = [message(ROOM_B, OLD + i) for i in range(3)]
    await ingest(store, events_a + events_b)
    h = Harness(store, config(), batch=2)
    assert await h.sweeper().tick()  # one batch per room: work left
    assert len(await actions(store)) == 4
    # a "restart": a new sweeper reads the committed progress
    assert await h.sweeper().tick()
    assert len(await actions(store)) == 7
    assert not await h.sweeper().tick()
    ids = redacted_ids(await actions(store))
    assert sorted(ids) == sorted(e["event_id"] for e in events_a + events_b)
    assert len(set(ids)) == len(ids)


async def test_tick_cap_round_robin(store: Store) -> None:
    await joined(store, ROOM_A, ROOM_B, ROOM_C)
    await ingest(store, [message(r, OLD + i) for r in (ROOM_A, ROOM_B, ROOM_C) for i in range(3)])
    h = Harness(store, config(), batch=10, max_events=4)
    sweeper = h.sweeper()
    assert await sweeper.tick()
    first = await actions(store)
    assert len(first) == 4  # A's 3, then one of B's
    assert await sweeper.tick()  # continues after B, wraps to A (done) and B
    assert len(await actions(store)) == 8
    assert not await sweeper.tick()
    ids = redacted_ids(await actions(store))
    assert len(ids) == 9 == len(set(ids))


async def test_waits_while_the_executor_is_busy(store: Store) -> None:
    await joined(store, ROOM_A)
    await ingest(store, [message(ROOM_A, OLD + i) for i in range(5)])
    h = Harness(store, config(), batch=3, max_pending=2)
    sweeper = h.sweeper()
    await sweeper.tick()
    assert len(await actions(store)) == 3
    assert await sweeper.tick()  # 3 pending > 2: no new work
    assert len(await actions(store)) == 3
    assert sweeper.totals.waiting
    assert "waiting for the executor" in sweeper.status_lines()[0]


async def test_room_on_hold_keeps_everything_and_hold_stops_a_running_sweep(
    store: Store,
) -> None:
    await joined(store, ROOM_A, ROOM_B)
    await ingest(store, [message(ROOM_A, OLD + i) for i in range(3)])
    await ingest(store, [message(ROOM_B, OLD + i) for i in range(6)])
    cfg = config(legal_hold={"rooms": [ROOM_A], "users": []})
    h = Harness(store, cfg, batch=2, purge=True)
    sweeper = h.sweeper()
    await sweeper.tick()
    rows = await actions(store)
    assert {a.room_id for a in rows} == {ROOM_B} and len(rows) == 2
    audits = [r async for r in store.reader.iter(kind="retention")]
    skipped = [r for r in audits if r["data"]["outcome"] == "skipped"]
    assert len(skipped) == 1 and skipped[0]["room_id"] == ROOM_A
    assert skipped[0]["data"]["events"] == 3
    # the same skip is not audited again on every tick
    await sweeper.tick()
    audits = [r async for r in store.reader.iter(kind="retention")]
    assert len([r for r in audits if r["data"]["outcome"] == "skipped"]) == 1
    assert len(await actions(store)) == 4
    # a hold placed while ROOM_B is being swept stops it before its next batch
    assert await store.holds.set("room", ROOM_B, True, by="@admin:example.org") == "on"
    await sweeper.tick()
    rows = await actions(store)
    assert len(rows) == 4 and not [a for a in rows if a.kind == "purge_history"]
    assert sweeper.totals.rooms_held == 2
    assert (await load_holds(store, cfg)).rooms == {ROOM_A, ROOM_B}
    # lifted: the sweep goes on where it stopped, and the room is purged at the end
    await store.holds.set("room", ROOM_B, False, by="@admin:example.org")
    assert await sweeper.tick()  # the last full batch: not known to be the end yet
    assert not await sweeper.tick()
    rows = await actions(store)
    assert len(redacted_ids(rows)) == 6
    assert [a.room_id for a in rows if a.kind == "purge_history"] == [ROOM_B]


async def test_user_on_hold_not_redacted_room_not_purged_until_lifted(store: Store) -> None:
    await joined(store, ROOM_A)
    alice = [message(ROOM_A, OLD + i, ALICE) for i in range(3)]
    bob = [message(ROOM_A, OLD + 10 + i, BOB) for i in range(2)]
    await ingest(store, alice + bob)
    await store.holds.set("user", BOB, True, by="@admin:example.org")
    h = Harness(store, config(), purge=True, batch=3)
    sweeper = h.sweeper()
    await sweeper.tick()
    await sweeper.tick()
    rows = await actions(store)
    assert sorted(redacted_ids(rows)) == sorted(e["event_id"] for e in alice)
    assert not [a for a in rows if a.kind == "purge_history"]
    audits = [r["data"] async for r in store.reader.iter(kind="retention")]
    assert {"outcome": "skipped", "reason": "user on legal hold", "events": 2} in audits
    assert any(a["outcome"] == "purge_skipped" for a in audits)
    # the hold is lifted: Bob's messages go too (Alice's are not redacted twice), then a purge
    await store.holds.set("user", BOB, False, by="@admin:example.org")
    await sweeper.tick()
    await sweeper.tick()
    rows = await actions(store)
    ids = redacted_ids(rows)
    assert sorted(ids) == sorted(e["event_id"] for e in alice + bob)
    assert len(set(ids)) == len(ids)
    purges = [a for a in rows if a.kind == "purge_history"]
    assert len(purges) == 1
    assert purges[0].payload == {"purge_up_to_ts": NOW - DAY, "delete_local_events": True}


async def test_purge_once_per_new_expiry(store: Store) -> None:
    await joined(store, ROOM_A)
    await ingest(store, [message(ROOM_A, OLD + i) for i in range(2)])
    await ingest(store, [message(ROOM_A, NOW - 1000)])
    h = Harness(store, config(), purge=True)
    sweeper = h.sweeper()
    await sweeper.tick()
    await sweeper.tick()
    purges = [a for a in await actions(store) if a.kind == "purge_history"]
    assert len(purges) == 1
    audits = [r["data"] async for r in store.reader.iter(kind="retention")]
    purge_audit = [a for a in audits if a["outcome"] == "purge"]
    assert purge_audit == [
        {"outcome": "purge", "reason": "expired history", "events": 2, "purge_up_to_ts": NOW - DAY}
    ]
    h.now = NOW + DAY
    await sweeper.tick()
    purges = [a for a in await actions(store) if a.kind == "purge_history"]
    assert [p.payload["purge_up_to_ts"] for p in purges] == [NOW - DAY, NOW]
    assert sweeper.totals.purges == 2
    persisted = await store.state.get(TOTALS_KEY)
    assert persisted and '"purges":2' in persisted


async def test_rooms_without_power_or_policy_are_left_alone(store: Store) -> None:
    await joined(store, ROOM_A, ROOM_B)
    await store.rooms.upsert(ROOM_A, lacking="cannot redact events")
    await ingest(store, [message(ROOM_A, OLD), message(ROOM_B, OLD)])
    cfg = make_config(
        {
            "homeserver": {"url": "http://127.0.0.1:1", "domain": "example.org"},
            "retention": {"max_lifetime": "", "rooms": {ROOM_A: {"max_lifetime": "1d"}}},
        }
    )
    h = Harness(store, cfg)
    sweeper = h.sweeper()
    await sweeper.tick()
    assert await actions(store) == []
    assert sweeper.totals.rooms_in_policy == 1


async def test_count_expiring(store: Store) -> None:
    await joined(store, ROOM_A, ROOM_B, ROOM_C)
    await ingest(store, [message(ROOM_A, NOW - 10 * DAY + i) for i in range(4)])
    await ingest(store, [message(ROOM_B, NOW - 3 * DAY), state_event(ROOM_B, NOW - 3 * DAY)])
    await ingest(store, [message(ROOM_C, NOW - 3 * DAY)])
    await store.holds.set("room", ROOM_C, True, by="@admin:example.org")
    cfg = make_config(
        {
            "homeserver": {"url": "http://127.0.0.1:1", "domain": "example.org"},
            "retention": {"max_lifetime": "30d"},
        }
    )
    h = Harness(store, cfg)
    sweeper = h.sweeper()
    current = h.engine
    week = build_engine(cfg, {"retention": {"global": {"max_lifetime": "7d"}}})
    day = build_engine(cfg, {"retention": {"global": {"max_lifetime": "1d"}}})
    assert await sweeper.count_expiring("global", week, current) == (4, 1)
    assert await sweeper.count_expiring("global", day, current) == (5, 2)
    assert await sweeper.count_expiring(ROOM_B, day, current) == (1, 1)
    # what the policy in force already removes is not counted again
    assert await sweeper.count_expiring("global", day, week) == (1, 1)


@pytest.mark.parametrize("bad", ["-3d", "10x", "0s", "soon"])
def test_sweep_interval_is_validated(bad: str) -> None:
    from bridge.config import ConfigError

    with pytest.raises(
        ConfigError, match=r"retention.sweep_interval: got .*e\.g\. 60s|such as 60s"
    ):
        make_config(
            {
                "homeserver": {"url": "http://127.0.0.1:1", "domain": "example.org"},
                "retention": {"sweep_interval": bad},
            }
        )


async def test_hold_placed_during_a_tick_stops_the_next_batch(store: Store) -> None:
    await joined(store, ROOM_A, ROOM_B)
    await ingest(store, [message(r, OLD + i) for r in (ROOM_A, ROOM_B) for i in range(2)])
    h = Harness(store, config(), group_rooms=1)
    sweeper = h.sweeper()
    plain = sweeper.commit
    first: set[str] = set()

    async def commit_then_hold(acts: Any, audit: Any, state: Any) -> None:
        # Rooms are swept in blind-index order: hold whichever comes second.
        await plain(acts, audit, state)
        if not first:
            first.update(a.room_id for a in acts)
            (other,) = {ROOM_A, ROOM_B} - first
            await store.holds.set("room", other, True, by="@admin:example.org")

    sweeper.commit = commit_then_hold
    await sweeper.tick()
    assert len(first) == 1
    assert {a.room_id for a in await actions(store)} == first


async def test_a_group_computed_under_other_holds_is_dropped(store: Store) -> None:
    await joined(store, ROOM_A, ROOM_B)
    await ingest(store, [message(r, OLD + i) for r in (ROOM_A, ROOM_B) for i in range(2)])
    h = Harness(store, config())
    sweeper = h.sweeper()
    real = sweeper.q.expired_batch

    async def batch_then_hold(room: str, *args: Any) -> Any:
        out = await real(room, *args)
        if room == ROOM_B:
            await store.holds.set("room", ROOM_A, True, by="@admin:example.org")
        return out

    sweeper.q.expired_batch = batch_then_hold  # type: ignore[method-assign,assignment]
    assert await sweeper.tick()  # nothing committed: left for the next tick
    assert await actions(store) == []
    sweeper.q.expired_batch = real  # type: ignore[method-assign]
    await sweeper.tick()
    assert {a.room_id for a in await actions(store)} == {ROOM_B}


async def test_count_expiring_for_a_space_counts_the_rooms_of_the_space(store: Store) -> None:
    space = "!space:example.org"
    await joined(store, space, ROOM_A, ROOM_B, ROOM_C)
    await ingest(store, [message(ROOM_A, OLD + i) for i in range(3)])  # in the space
    await ingest(store, [message(ROOM_C, OLD + i) for i in range(2)])  # in it, but held
    await ingest(store, [message(ROOM_B, OLD + i) for i in range(4)])  # outside
    await ingest(store, [message(space, OLD)])
    await store.holds.set("room", ROOM_C, True, by="@admin:example.org")
    cfg_none = make_config(
        {
            "homeserver": {"url": "http://127.0.0.1:1", "domain": "example.org"},
        }
    )
    spaces = {ROOM_A: (space,), ROOM_C: (space,)}
    h = Harness(store, cfg_none)
    current = build_engine(cfg_none, {}, "!mgmt:example.org", spaces)
    candidate = build_engine(
        cfg_none, {"retention": {space: {"max_lifetime": "1d"}}}, "!mgmt:example.org", spaces
    )
    # the space room itself (1) and its joined, not held child ROOM_A (3); not ROOM_B
    assert await h.sweeper().count_expiring(space, candidate, current) == (4, 2)


async def test_sweep_progress_shows_in_the_metrics(store: Store) -> None:
    from bridge import metrics

    def sample(name: str, **labels: str) -> float:
        return metrics.REGISTRY.get_sample_value(name, labels) or 0.0

    await joined(store, ROOM_A, ROOM_B, ROOM_C)
    await ingest(store, [message(ROOM_A, OLD + i) for i in range(3)])
    await ingest(store, [message(ROOM_B, OLD + i) for i in range(2)])
    await ingest(store, [message(ROOM_C, OLD)])
    await store.holds.set("room", ROOM_C, True, by="@admin:example.org")
    redacts = sample("bridge_retention_removals_total", kind="redact")
    purges = sample("bridge_retention_removals_total", kind="purge")
    skips = sample("bridge_retention_hold_skips_total")
    h = Harness(store, config(), batch=2, purge=True)
    sweeper = h.sweeper()
    assert await sweeper.tick()
    assert sample("bridge_retention_rooms", state="limited") == 3
    assert sample("bridge_retention_rooms", state="behind") == 2  # A and B: full batches
    assert sample("bridge_retention_rooms", state="held") == 1
    assert sample("bridge_retention_removals_total", kind="redact") == redacts + 4
    assert sample("bridge_retention_hold_skips_total") == skips + 1
    assert sample("bridge_retention_last_sweep_timestamp_seconds") == NOW / 1000
    while await sweeper.tick():
        pass
    assert sample("bridge_retention_rooms", state="behind") == 0
    assert sample("bridge_retention_removals_total", kind="redact") == redacts + 5
    assert sample("bridge_retention_removals_total", kind="purge") == purges + 2
