"""The bridge's lifecycle without a homeserver: what ``close()`` leaves behind, and how the
death of a critical task ends ``run()``."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

from bridge.app import Bridge
from bridge.config import Config
from bridge.pipeline import retroactive
from bridge.policy.scopes import GLOBAL
from bridge.scheduler import TaskKind
from tests.kit.config import make_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(tmp_path: Path) -> Config:
    return make_config(
        {
            "homeserver": {"domain": "corp.example", "url": "http://127.0.0.1:9"},
            "appservice": {
                "hostname": "127.0.0.1",
                "port": _free_port(),
            },
            "data_dir": str(tmp_path),
        },
        base_dir=tmp_path,
    )


def _others() -> set[asyncio.Task[Any]]:
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}


async def _forever() -> None:
    await asyncio.Event().wait()


async def test_close_leaves_no_task_running(tmp_path: Path) -> None:
    bridge = Bridge(_config(tmp_path))
    await bridge.open()
    bridge.management.room_id = "!mgmt:corp.example"
    # one of each owner: the bridge's own tasks, a one-off, room bookkeeping, a scan
    bridge.scheduler.spawn(_forever(), "appservice-ping", TaskKind.ONE_OFF)
    bridge.rooms.note_member("!r:corp.example", "@u:elsewhere.example", "join")
    job = retroactive.RetroJob(
        scope=GLOBAL,
        rules=frozenset({"keyword:x"}),
        since_ms=0,
        window_ms=1,
        requested_by="@a:corp.example",
        command_room="",
        change="test",
    )
    assert retroactive.start(bridge, bridge.policy.engine, job) is not None
    await asyncio.sleep(0)
    names = {t.get_name() for t in bridge.scheduler.running}
    assert {"audit-sink", "metrics", "appservice-ping", "retroactive"} <= names
    await bridge.close()
    assert bridge.scheduler.running == []
    assert _others() == set()


async def test_a_dying_critical_task_stops_the_bridge_with_exit_code_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def startup(self: Bridge) -> None:
        async def worker() -> None:
            await asyncio.sleep(0.01)
            raise RuntimeError("worker broke")

        self.scheduler.spawn(worker(), "worker")
        self.scheduler.spawn(_forever(), "executor")
        self.ready = True

    monkeypatch.setattr(Bridge, "startup", startup)
    bridge = Bridge(_config(tmp_path))
    assert await asyncio.wait_for(bridge.run(), 30) == 1
    assert not bridge.ready
    assert _others() == set()


async def test_a_stop_request_ends_run_with_exit_code_0(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def startup(self: Bridge) -> None:
        self.scheduler.spawn(_forever(), "worker")
        asyncio.get_running_loop().call_later(0.01, self.request_stop)

    monkeypatch.setattr(Bridge, "startup", startup)
    bridge = Bridge(_config(tmp_path))
    assert await asyncio.wait_for(bridge.run(), 30) == 0
    assert _others() == set()


async def test_sighup_reloads_the_config_file_in_the_background(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(tmp_path)
    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "homeserver": {"domain": "corp.example", "url": "http://127.0.0.1:9"},
                "appservice": {
                    "as_token": "a" * 32,
                    "hs_token": "h" * 32,
                    "hostname": "127.0.0.1",
                    "port": config.appservice.port,
                },
                "gate": {"token": "g" * 32},
                "data_dir": str(tmp_path),
                "executor": {"rate_per_second": 3},
            }
        )
    )
    reloaded: list[Config] = []

    async def startup(self: Bridge) -> None:
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(500):
            if self.config is not config:
                reloaded.append(self.config)
                break
            await asyncio.sleep(0.01)
        self.request_stop()

    monkeypatch.setattr(Bridge, "startup", startup)
    bridge = Bridge(config, path)
    assert await asyncio.wait_for(bridge.run(), 30) == 0
    [new] = reloaded
    assert new.executor.rate_per_second == 3
    assert bridge.executor.config is new.executor
