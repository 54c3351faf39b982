"""A policy rollout over 10,000 rooms: spread at the configured rate, durable across a
restart, progress reported at 25/50/75/100 %."""

from __future__ import annotations

import itertools
import json
import time
from typing import Any

from bridge.commands.registry import Reply
from bridge.pipeline.enforcement import ROLLOUT_KEY, RoomEnforcer
from bridge.store import Store


def rooms(n: int) -> list[str]:
    return [f"!room{i:05d}:corp.example" for i in range(n)]


async def _quiet(_reply: Reply) -> None:
    return None


def test_rollout_of_10k_rooms_is_spread_at_the_configured_rate(store: Store) -> None:
    enforcer = RoomEnforcer(store, lambda: 50.0, _quiet)
    before = time.time()
    acts, record = enforcer.rollout(rooms(10_000), "federation mode internal")
    assert record["total"] == 10_000 and len({a.room_id for a in acts}) == 10_000
    # Steady rate: one room every 1/50 s, the whole rollout over ~200 s.
    starts = sorted(a.not_before for a in acts)
    assert {round(b - a, 6) for a, b in itertools.pairwise(starts)} == {0.02}
    assert before <= starts[0] and abs((starts[-1] - starts[0]) - 0.02 * 9_999) < 1e-6


async def test_rollout_is_durable_across_a_restart_and_reported(store: Store) -> None:
    said: list[str] = []

    async def notify(reply: Reply) -> None:
        said.append(reply.text)

    enforcer = RoomEnforcer(store, lambda: 1000.0, notify)
    acts, record = enforcer.rollout(rooms(1_000), "federation mode internal")
    await store.actions.enqueue(acts)
    await store.state.set(ROLLOUT_KEY, json.dumps(record))
    enforcer.start_rollout(record)

    async def run_some(enf: RoomEnforcer, n: int) -> None:
        # What the executor does for each due action: record the outcome, report the result.
        due = await store.actions.due(now=time.time() + 10**6, limit=n)
        for a in due:
            await store.actions.finish(a.id, status="done", attempts=1)
            result: dict[str, Any] = {"sent": [], "kicked": [], "lacking": [], "payload": a.payload}
            await enf.on_result(a.room_id or "", result)

    await run_some(enforcer, 300)
    assert said == [
        "Policy rollout (federation mode internal): 250 of 1000 rooms processed (25%): "
        "applied in 250 rooms, not applied in 0 rooms, failed in 0 rooms."
    ]

    # Restart: a new enforcer resumes reporting from the stored rollout record.
    resumed = RoomEnforcer(store, lambda: 1000.0, notify)
    await resumed.load()
    await run_some(resumed, 700)
    marks = [s.split(": ")[1] for s in said[:3]]
    quarters = ((250, 25), (500, 50), (750, 75))
    assert marks == [f"{n} of 1000 rooms processed ({pct}%)" for n, pct in quarters]
    assert said[3] == (
        "✅ Policy rollout (federation mode internal) finished: applied in all 1000 rooms."
    )
    assert (await store.stats.snapshot()).actions_pending == 0
    known = {r["room_id"]: r for r in await store.rooms.known()}
    assert len(known) == 1_000 and all(r["joined"] for r in known.values())
