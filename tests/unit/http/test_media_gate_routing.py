"""The bridge's real application routes the module's file callback to the media gate, not
to the gate's catch-all ``{callback}`` route (which allows what it does not judge, unread,
so a lost or renamed media route would let every file through). ``app.py`` adds the media
route first, as aiohttp releases that try routes in their order need; the aiohttp checked
here (3.14) looks plain paths up before patterns, so with it the order does not matter (tried:
this test passes with the two routes swapped)."""

from __future__ import annotations

import socket
from pathlib import Path

from aiohttp.test_utils import make_mocked_request

from bridge.app import Bridge
from bridge.http.gate import Gate
from bridge.http.media_gate import CALLBACK, MediaGate
from tests.kit.config import make_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_the_file_callback_reaches_the_media_gate(tmp_path: Path) -> None:
    config = make_config(
        {
            "homeserver": {"domain": "corp.example", "url": "http://127.0.0.1:9"},
            "appservice": {"hostname": "127.0.0.1", "port": _free_port()},
            "data_dir": str(tmp_path),
        },
        base_dir=tmp_path,
    )
    bridge = Bridge(config)
    await bridge.open()
    try:
        app = bridge.runner.app if bridge.runner is not None else None
        assert app is not None
        base = config.gate.base_path
        file_call = await app.router.resolve(
            make_mocked_request("POST", f"{base}/{CALLBACK}", app=app)
        )
        assert isinstance(file_call.handler.__self__, MediaGate)
        other = await app.router.resolve(
            make_mocked_request("POST", f"{base}/user_may_invite", app=app)
        )
        assert isinstance(other.handler.__self__, Gate)
    finally:
        await bridge.close()
