"""Operational endpoints: health (liveness and readiness) and Prometheus metrics, and the
loop that keeps the gauges read from the store current."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from bridge import metrics as gauges
from bridge.config import MetricsConfig
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
    #: "leader" or "follower" right now (replicas on PostgreSQL; always leader on SQLite)
    role: Callable[[], str] = field(default=lambda: "leader")


def health_routes(ready: Callable[[], bool], info: HealthInfo) -> list[web.RouteDef]:
    """``/_bridge/health/live``, ``/_bridge/health/ready``, ``/_bridge/health/leader``,
    ``/_bridge/health``.

    ``ready`` says whether the bridge has started and not begun to stop. ``leader`` answers
    200 only on the ready leader: a load balancer can send the appservice transactions there
    when the bot's E2EE device (held by the leader) must receive their to-device part.
    """

    async def live(_: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def ready_route(_: web.Request) -> web.Response:
        ok = ready()
        return web.json_response(
            {"status": "ready" if ok else "starting"}, status=200 if ok else 503
        )

    async def leader_route(_: web.Request) -> web.Response:
        role = info.role()
        ok = ready() and role == "leader"
        return web.json_response({"status": "ready" if ready() else "starting", "role": role},
                                 status=200 if ok else 503)  # fmt: skip

    async def summary(_: web.Request) -> web.Response:
        ok = ready()
        return web.json_response(
            {
                "status": "ready" if ok else "starting",
                "version": info.version,
                "uptime_s": round(time.monotonic() - info.started_monotonic, 1),
                "database": info.database,
                "role": info.role(),
            },
            status=200 if ok else 503,
        )

    return [
        web.get("/_bridge/health/live", live),
        web.get("/_bridge/health/ready", ready_route),
        web.get("/_bridge/health/leader", leader_route),
        web.get("/_bridge/health", summary),
    ]


def metrics_routes(token: str = "") -> list[web.RouteDef]:
    """``/metrics`` (Prometheus text format); with ``token``, only for its bearer."""
    expected = f"Bearer {token}".encode()

    async def metrics(request: web.Request) -> web.Response:
        if token:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return web.json_response(
                    {"error": "a bearer token (metrics.token) is required"},
                    status=401,
                    headers={"WWW-Authenticate": 'Bearer realm="metrics"'},
                )
        resp = web.Response(body=generate_latest(REGISTRY))
        resp.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return resp

    return [web.get("/metrics", metrics)]


def main_listener_metrics(config: MetricsConfig) -> list[web.RouteDef]:
    """``/metrics`` for the appservice listener: none when it has a listener of its own."""
    return metrics_routes(config.token) if config.listen is None else []


async def start_metrics_listener(config: MetricsConfig) -> web.AppRunner | None:
    """Serve ``/metrics`` on ``metrics.listen`` when set (None: it is on the main listener).

    Raises OSError when the address cannot be bound.
    """
    if config.listen is None:
        return None
    app = web.Application()
    app.add_routes(metrics_routes(config.token))
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=5)
    await runner.setup()
    host, port = config.listen
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError:
        await runner.cleanup()
        raise
    log.info("metrics on %s:%d%s", host, port, " (bearer token required)" if config.token else "")
    return runner


async def refresh_gauges_once(store: Store) -> None:
    """Set the gauges that come from the store (queue, backlog, records, checkpoint age)."""
    stats = await store.stats.snapshot()
    gauges.QUEUE_DEPTH.set(stats.queue_depth)
    gauges.QUEUE_LAG.set(stats.queue_lag_s)
    gauges.ACTIONS_BACKLOG.labels("pending").set(stats.actions_pending)
    gauges.ACTIONS_BACKLOG.labels("failed").set(stats.actions_failed)
    gauges.AUDIT_RECORDS.set(stats.records)
    records = store.records
    now = time.time()
    if records.last_checkpoint_ts:
        gauges.CHECKPOINT_AGE.set(max(0.0, now - records.last_checkpoint_ts / 1000))
    since = records.unsigned_since
    gauges.UNSIGNED_AGE.set(0.0 if since is None else max(0.0, now - since / 1000))
    gauges.UNSIGNED_RECORDS.set(records.unsigned_records)


async def refresh_gauges(store: Store, interval_s: float = METRICS_INTERVAL_S) -> None:
    """Forever: keep the gauges that come from the store current (a failure is logged)."""
    while True:
        try:
            await refresh_gauges_once(store)
        except Exception as e:
            log.warning("could not refresh metrics: %s", e.__class__.__name__)
        await asyncio.sleep(interval_s)
