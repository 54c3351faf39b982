"""Health routes (from a readiness callable and fixed facts) and the gauges from the store."""

from __future__ import annotations

import time

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from bridge import metrics
from bridge.http.health import HealthInfo, health_routes, metrics_routes, refresh_gauges_once
from bridge.store import AuditEntry, NewAction, Store


async def test_health_follows_readiness() -> None:
    ready = [False]
    app = web.Application()
    app.add_routes(health_routes(lambda: ready[0], HealthInfo("9.9", time.monotonic(), "sqlite")))
    app.add_routes(metrics_routes())
    async with TestClient(TestServer(app)) as client:
        assert (await client.get("/_bridge/health/live")).status == 200
        resp = await client.get("/_bridge/health/ready")
        assert resp.status == 503 and (await resp.json())["status"] == "starting"
        ready[0] = True
        assert (await client.get("/_bridge/health/ready")).status == 200
        body = await (await client.get("/_bridge/health")).json()
        assert body["status"] == "ready" and body["version"] == "9.9"
        assert body["database"] == "sqlite" and body["uptime_s"] >= 0
        assert (await client.get("/metrics")).status == 200


async def test_leader_route_answers_only_on_the_ready_leader() -> None:
    ready, role = [False], ["leader"]
    app = web.Application()
    info = HealthInfo("9.9", time.monotonic(), "postgresql", role=lambda: role[0])
    app.add_routes(health_routes(lambda: ready[0], info))
    async with TestClient(TestServer(app)) as client:
        assert (await client.get("/_bridge/health/leader")).status == 503  # starting
        ready[0] = True
        resp = await client.get("/_bridge/health/leader")
        assert resp.status == 200 and (await resp.json())["role"] == "leader"
        role[0] = "follower"
        resp = await client.get("/_bridge/health/leader")
        assert resp.status == 503 and (await resp.json())["role"] == "follower"
        assert (await client.get("/_bridge/health/ready")).status == 200  # still serves


async def test_gauges_come_from_the_store(store: Store) -> None:
    await store.actions.enqueue([NewAction("join", {}, room_id="!r:x")])
    await refresh_gauges_once(store)
    assert metrics.ACTIONS_BACKLOG.labels("pending")._value.get() == 1


async def test_the_unsigned_tail_gauges_follow_the_signed_head(store: Store) -> None:
    await store.records.append([AuditEntry(kind="command", data={"n": 1})])
    await store.records.append([AuditEntry(kind="command", data={"n": 2})])
    since = store.records.unsigned_since
    assert since is not None
    await refresh_gauges_once(store)
    assert metrics.UNSIGNED_RECORDS._value.get() == 2
    assert metrics.UNSIGNED_AGE._value.get() >= 0
    await store.records.checkpoint()
    await refresh_gauges_once(store)
    assert metrics.UNSIGNED_RECORDS._value.get() == 0
    assert metrics.UNSIGNED_AGE._value.get() == 0
    assert metrics.CHECKPOINT_AGE._value.get() >= 0
