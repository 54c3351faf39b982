"""``/metrics``: open by default, behind a bearer token with ``metrics.token``, and on its own
address with ``metrics.listen`` (then not on the appservice listener)."""

from __future__ import annotations

import socket

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from bridge.config import MetricsConfig, build_config
from bridge.http.health import main_listener_metrics, metrics_routes, start_metrics_listener

TOKEN = "metrics-token-for-tests-0123456789"


async def get(app: web.Application, headers: dict[str, str] | None = None) -> tuple[int, str]:
    async with TestClient(TestServer(app)) as client:
        resp = await client.get("/metrics", headers=headers or {})
        return resp.status, await resp.text()


def app_with(token: str) -> web.Application:
    app = web.Application()
    app.add_routes(metrics_routes(token))
    return app


async def test_without_a_token_metrics_are_open() -> None:
    status, text = await get(app_with(""))
    assert status == 200 and "bridge_" in text


async def test_with_a_token_only_its_bearer_reads_metrics() -> None:
    app = app_with(TOKEN)
    for headers in (
        None,
        {"Authorization": "Bearer wrong"},
        {"Authorization": TOKEN},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Basic {TOKEN}"},
    ):
        status, text = await get(app, headers)
        assert status == 401, headers
        assert "bridge_" not in text and "metrics.token" in text
    status, text = await get(app, {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and "bridge_" in text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_metrics_on_their_own_listener() -> None:
    assert await start_metrics_listener(MetricsConfig(token="", listen=None)) is None
    port = free_port()
    runner = await start_metrics_listener(MetricsConfig(token=TOKEN, listen=("127.0.0.1", port)))
    assert runner is not None
    try:
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{port}/metrics"
            async with session.get(url) as resp:
                assert resp.status == 401
            async with session.get(url, headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
                assert resp.status == 200 and "bridge_" in await resp.text()
            async with session.get(f"http://127.0.0.1:{port}/_bridge/health") as resp:
                assert resp.status == 404  # only metrics there
    finally:
        await runner.cleanup()


async def test_the_appservice_listener_serves_metrics_unless_they_have_their_own() -> None:
    base = {
        "homeserver": {"domain": "corp.example"},
        "appservice": {"as_token": "a" * 32, "hs_token": "h" * 32},
        "gate": {"token": "g" * 32},
    }

    async def status(config_data: dict) -> int:
        app = web.Application()
        app.add_routes(main_listener_metrics(build_config(config_data, env={}).metrics))
        return (await get(app, {"Authorization": f"Bearer {TOKEN}"}))[0]

    assert await status(base) == 200
    assert await status({**base, "metrics": {"token": "m" * 32}}) == 401
    assert await status({**base, "metrics": {"token": TOKEN}}) == 200
    assert await status({**base, "metrics": {"listen": "127.0.0.1:9102"}}) == 404
