"""The transaction endpoint hands its to-device part to the bot's E2EE device before
answering: a failure there (the store cannot keep it) answers 503, and the registration asks
Synapse for that part only when e2ee is on."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from bridge.http.transactions import AppserviceAPI
from bridge.registration import registration_dict
from bridge.store import Store
from tests.kit.config import make_config

TOKEN = "hs-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TO_DEVICE = {
    "type": "m.room.encrypted",
    "sender": "@a:x",
    "to_user_id": "@bot:x",
    "to_device_id": "D",
    "content": {},
}


async def test_to_device_part_is_handled_before_the_200_and_a_failure_is_retried(
    store: Store,
) -> None:
    seen: list[Mapping[str, Any]] = []
    fail = [True]

    async def on_ephemeral(payload: Mapping[str, Any]) -> None:
        seen.append(payload)
        if fail[0]:
            raise RuntimeError("device not open")

    api = AppserviceAPI(store, TOKEN, on_ephemeral=on_ephemeral)
    app = web.Application()
    app.add_routes(api.routes())
    body = {"events": [], "de.sorunome.msc2409.to_device": [TO_DEVICE]}
    async with TestClient(TestServer(app)) as c:
        r = await c.put("/_matrix/app/v1/transactions/e1", json=body, headers=AUTH)
        assert r.status == 503
        fail[0] = False
        r = await c.put("/_matrix/app/v1/transactions/e1", json=body, headers=AUTH)
        assert r.status == 200
    assert [p["de.sorunome.msc2409.to_device"] for p in seen] == [[TO_DEVICE], [TO_DEVICE]]


def test_registration_asks_for_to_device_only_with_e2ee(tmp_path: Path) -> None:
    off = registration_dict(make_config({}, base_dir=tmp_path), "a", "h")
    assert "de.sorunome.msc2409.push_ephemeral" not in off and "org.matrix.msc3202" not in off
    on = registration_dict(make_config({"e2ee": {"enabled": True}}, base_dir=tmp_path), "a", "h")
    assert on["de.sorunome.msc2409.push_ephemeral"] is True and on["org.matrix.msc3202"] is True
    assert "io.element.msc4190" not in on  # it would turn off the appservice login
