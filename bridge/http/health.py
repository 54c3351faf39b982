"""Operational endpoints: health (liveness and readiness) and Prometheus metrics, and the
loop that keeps the gauges read from the store current."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from bridge import metrics as gauges
from bridge.metrics import REGISTRY
from bridge.store import Store

log = logging.getLogger(__name__)

METRICS_INTERVAL_S = 15.0


@dataclass(frozen=True)
class HealthInfo:
    """What the health summary reports besides readiness."""

    version: str
    started_monotonic: float
    database: str  # the store's backend


def health_routes(ready: Callable[[], bool], info: HealthInfo) -> list[web.RouteDef]:
    """``/_bridge/health/live``, ``/_bridge/health/ready``, ``/_bridge/health``, ``/metrics``.

    ``ready`` says whether the bridge has started and not begun to stop.
    """

    async def live(_: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def ready_route(_: web.Request) -> web.Response:
        ok = ready()
        return web.json_response(
            {"status": "ready" if ok else "starting"}, status=200 if ok else 503
        )

    async def summary(_: web.Request) -> web.Response:
        ok = ready()
        return web.json_response(
            {
                "status": "ready" if ok else "starting",
                "version": info.version,
                "uptime_s": round(time.monotonic() - info.started_monotonic, 1),
                "database": info.database,
            },
            status=200 if ok else 503,
        )

    async def metrics(_: web.Request) -> web.Response:
        resp = web.Response(body=generate_latest(REGISTRY))
        resp.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return resp

    return [
        web.get("/_bridge/health/live", live),
        web.get("/_bridge/health/ready", ready_route),
        web.get("/_bridge/health", summary),
        web.get("/metrics", metrics),
    ]


async def refresh_gauges_once(store: Store) -> None:
    """Set the gauges that come from the store (queue, backlog, records, checkpoint age)."""
    stats = await store.stats()
    gauges.QUEUE_DEPTH.set(stats.queue_depth)
    gauges.QUEUE_LAG.set(stats.queue_lag_s)
    gauges.ACTIONS_BACKLOG.labels("pending").set(stats.actions_pending)
    gauges.ACTIONS_BACKLOG.labels("failed").set(stats.actions_failed)
    gauges.AUDIT_RECORDS.set(stats.records)
    cp_ts = store.last_checkpoint_ts
    if cp_ts:
        gauges.CHECKPOINT_AGE.set(max(0.0, time.time() - cp_ts / 1000))


async def refresh_gauges(store: Store, interval_s: float = METRICS_INTERVAL_S) -> None:
    """Forever: keep the gauges that come from the store current (a failure is logged)."""
    while True:
        try:
            await refresh_gauges_once(store)
        except Exception as e:
            log.warning("could not refresh metrics: %s", e.__class__.__name__)
        await asyncio.sleep(interval_s)
