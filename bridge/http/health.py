"""Operational endpoints: health (liveness and readiness) and Prometheus metrics."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from bridge.metrics import REGISTRY


def health_routes(bridge: Any) -> list[web.RouteDef]:
    """``/_bridge/health/live``, ``/_bridge/health/ready``, ``/_bridge/health``, ``/metrics``."""

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
                "database": bridge.store.db.backend,
            },
            status=200 if ok else 503,
        )

    async def metrics(_: web.Request) -> web.Response:
        resp = web.Response(body=generate_latest(REGISTRY))
        resp.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return resp

    return [
        web.get("/_bridge/health/live", live),
        web.get("/_bridge/health/ready", ready),
        web.get("/_bridge/health", summary),
        web.get("/metrics", metrics),
    ]
