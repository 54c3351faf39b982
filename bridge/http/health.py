"""Operational endpoints: health (liveness and readiness) and Prometheus metrics."""

from __future__ import annotations

import hmac
import logging
import time
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from bridge.config import MetricsConfig
from bridge.metrics import REGISTRY

log = logging.getLogger(__name__)


def health_routes(bridge: Any) -> list[web.RouteDef]:
    """``/_bridge/health/live``, ``/_bridge/health/ready``, ``/_bridge/health``."""

    async def live(_: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def ready(_: web.Request) -> web.Response:
        ok = bool(bridge.ready)
        return web.json_response(
            {"status": "ready" if ok else "starting"}, status=200 if ok else 503
        )

    async def summary(_: web.Request) -> web.Response:
        ok = bool(bridge.ready)
        return web.json_response(
            {
                "status": "ready" if ok else "starting",
                "version": bridge.version,
                "uptime_s": round(time.monotonic() - bridge.started_monotonic, 1),
                "database": bridge.store.backend,
            },
            status=200 if ok else 503,
        )

    return [
        web.get("/_bridge/health/live", live),
        web.get("/_bridge/health/ready", ready),
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
