"""The one scheduler of background tasks: critical deaths stop, one-off failures are logged,
stop cancels everything (retroactive scans and room bookkeeping included)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from bridge.pipeline import retroactive
from bridge.pipeline.enforcement import RoomEnforcer
from bridge.policy.scopes import GLOBAL
from bridge.scheduler import Scheduler, TaskKind


async def _boom() -> None:
    await asyncio.sleep(0)
    raise RuntimeError("boom")


async def _forever() -> None:
    await asyncio.Event().wait()


async def test_a_critical_task_that_dies_reports_its_death(
    caplog: pytest.LogCaptureFixture,
) -> None:
    deaths: list[tuple[str, BaseException]] = []
    scheduler = Scheduler(on_critical_death=lambda name, exc: deaths.append((name, exc)))
    scheduler.spawn(_boom(), "worker")
    await scheduler.wait()
    [(name, exc)] = deaths
    assert name == "worker" and isinstance(exc, RuntimeError)
    assert "background task worker died" in caplog.text
    assert scheduler.running == []


async def test_a_one_off_failure_is_logged_and_nothing_stops(
    caplog: pytest.LogCaptureFixture,
) -> None:
    deaths: list[str] = []
    scheduler = Scheduler(on_critical_death=lambda name, _exc: deaths.append(name))
    with caplog.at_level(logging.ERROR):
        scheduler.spawn(_boom(), "auto-enroll", TaskKind.ONE_OFF)
        await scheduler.wait()
    assert deaths == []
    assert "auto-enroll failed: RuntimeError('boom')" in caplog.text


async def test_a_cancelled_critical_task_is_not_a_death() -> None:
    deaths: list[str] = []
    scheduler = Scheduler(on_critical_death=lambda name, _exc: deaths.append(name))
    task = scheduler.spawn(_forever(), "executor")
    assert task is not None
    await asyncio.sleep(0)
    task.cancel()
    await scheduler.wait()
    assert deaths == []


async def test_stop_cancels_every_task_and_refuses_new_ones() -> None:
    scheduler = Scheduler()
    tasks = [
        scheduler.spawn(_forever(), "worker"),
        scheduler.spawn(_forever(), "ping", TaskKind.ONE_OFF),
    ]
    await asyncio.sleep(0)
    await scheduler.stop(1.0)
    assert all(t is not None and t.cancelled() for t in tasks)
    assert scheduler.running == [] and scheduler.stopping
    coro = _forever()
    assert scheduler.spawn(coro, "late", TaskKind.ONE_OFF) is None
    assert coro.cr_frame is None  # closed, never started (no "never awaited" warning)


async def test_stop_is_bounded_when_a_task_ignores_cancellation(
    caplog: pytest.LogCaptureFixture,
) -> None:
    release = asyncio.Event()

    async def stubborn() -> None:
        while True:
            try:
                await release.wait()
                return
            except asyncio.CancelledError:
                continue  # swallows the cancellation

    scheduler = Scheduler()
    scheduler.spawn(stubborn(), "stubborn", TaskKind.ONE_OFF)
    await asyncio.sleep(0)
    await asyncio.wait_for(scheduler.stop(0.05), 1.0)
    assert "did not stop within 0.05s: stubborn" in caplog.text
    release.set()
    await scheduler.wait()


class _Rooms:
    async def known(self) -> list[dict[str, Any]]:
        return [{"room_id": "!r:x", "joined": True}]


class _Reader:
    """An archive read that never ends (a scan in progress)."""

    def __init__(self) -> None:
        self.reading = asyncio.Event()

    async def iter(self, **_: Any) -> Any:
        self.reading.set()
        await asyncio.Event().wait()
        yield {}  # pragma: no cover


class _State:
    def __init__(self) -> None:
        self.values: dict[str, str] = {}

    async def get(self, key: str) -> str | None:
        return self.values.get(key)

    async def set(self, key: str, value: str) -> None:
        self.values[key] = value


class _SlowStore:
    """A store whose archive read never ends (a scan in progress)."""

    def __init__(self) -> None:
        self.rooms = _Rooms()
        self.reader = _Reader()
        self.state = _State()


class _Engine:
    class policy:
        room_spaces: dict[str, tuple[str, ...]] = {}


class _RetroServices:
    def __init__(self, scheduler: Scheduler) -> None:
        self.store = _SlowStore()
        self.scheduler = scheduler
        self.management_room = ""
        self.executor = None
        self.policy = None


async def test_stop_cancels_a_running_retroactive_scan() -> None:
    scheduler = Scheduler()
    services = _RetroServices(scheduler)
    job = retroactive.RetroJob(
        scope=GLOBAL,
        rules=frozenset({"keyword:x"}),
        since_ms=0,
        window_ms=1,
        requested_by="@a:x",
        command_room="",
        change="test",
    )
    task = retroactive.start(services, _Engine(), job)  # type: ignore[arg-type]
    assert task is not None and task.get_name() == retroactive.TASK_NAME
    await asyncio.wait_for(services.store.reader.reading.wait(), 5)
    assert task in scheduler.running
    await scheduler.stop(1.0)
    assert task.cancelled()
    # stopped mid-scan: still recorded as pending, so the next start runs it again
    assert job.id in services.store.state.values[retroactive.PENDING_KEY]


async def test_room_bookkeeping_runs_under_the_injected_scheduler() -> None:
    class Rooms:
        started = asyncio.Event()

        async def update_data(self, _updates: Any) -> None:
            self.started.set()
            await asyncio.Event().wait()

    class Store:
        rooms = Rooms()

    scheduler = Scheduler()
    store = Store()

    async def quiet(_reply: Any) -> None:
        return None

    rooms = RoomEnforcer(store, lambda: 1.0, quiet, scheduler=scheduler)  # type: ignore[arg-type]
    rooms.note_member("!r:x", "@u:y", "join")
    await asyncio.wait_for(store.rooms.started.wait(), 5)
    [task] = scheduler.running
    assert task.get_name() == "room-flush"
    await scheduler.stop(1.0)
    assert task.cancelled()
