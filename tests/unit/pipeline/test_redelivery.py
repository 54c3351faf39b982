"""The redelivery nudger: one ping once the database is back after a refused transaction."""

from __future__ import annotations

import asyncio

import pytest

from bridge.pipeline.redelivery import RedeliveryNudger
from tests.conftest import in_background


class Database:
    """A database that is down until ``up`` is set; counts the probes."""

    def __init__(self) -> None:
        self.up = False
        self.probes = 0

    async def reachable(self) -> bool:
        self.probes += 1
        return self.up


class Homeserver:
    def __init__(self, fail: bool = False) -> None:
        self.pings = 0
        self.fail = fail
        self.pinged = asyncio.Event()

    async def ping(self) -> int:
        self.pings += 1
        self.pinged.set()
        if self.fail:
            raise RuntimeError("homeserver down too")
        return 3


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_no_refusal_no_ping() -> None:
    db, hs = Database(), Homeserver()
    db.up = True
    nudger = RedeliveryNudger(db.reachable, hs.ping, probe_interval=0.001)
    async with in_background(nudger.run()):
        await asyncio.sleep(0.02)
    assert hs.pings == 0 and db.probes == 0


async def test_pings_once_when_the_database_comes_back() -> None:
    db, hs = Database(), Homeserver()
    nudger = RedeliveryNudger(db.reachable, hs.ping, probe_interval=0.001)
    async with in_background(nudger.run()):
        nudger.refused()
        nudger.refused()  # several refusals during one outage make one ping
        await asyncio.sleep(0.02)
        assert hs.pings == 0, "pinged while the database was still down"
        assert db.probes >= 2
        db.up = True
        await asyncio.wait_for(hs.pinged.wait(), 5)
        await asyncio.sleep(0.02)
    assert hs.pings == 1
    assert nudger.nudges == 1


async def test_a_failing_ping_is_logged_and_the_nudger_keeps_serving(
    caplog: pytest.LogCaptureFixture,
) -> None:
    db, hs = Database(), Homeserver(fail=True)
    db.up = True
    nudger = RedeliveryNudger(db.reachable, hs.ping, probe_interval=0.001)
    async with in_background(nudger.run()):
        nudger.refused()
        await asyncio.wait_for(hs.pinged.wait(), 5)
        await asyncio.sleep(0.02)
        hs.pinged.clear()
        hs.fail = False
        nudger.refused()
        await asyncio.wait_for(hs.pinged.wait(), 5)
        await settle()
    assert hs.pings == 2
    assert nudger.nudges == 1
    assert "could not ask the homeserver to redeliver" in caplog.text


async def test_refusals_right_after_a_ping_space_the_pings_out() -> None:
    """The database answers probes but writes still fail: pings back off, not a hot loop."""
    db, hs = Database(), Homeserver()
    db.up = True
    slept: list[float] = []
    refusing = True

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        if refusing and hs.pings < 5:
            nudger.refused()  # Synapse's retry, triggered by the ping, was refused again
        await asyncio.sleep(0)

    nudger = RedeliveryNudger(db.reachable, hs.ping, probe_interval=1, max_gap=4, sleep=sleep)
    async with in_background(nudger.run()):
        nudger.refused()
        await settle()
        assert hs.pings == 5
        assert slept == [1, 2, 4, 4, 4]
        # Once a ping is not followed by a refusal, the gap starts small again.
        nudger.refused()
        await settle()
        assert hs.pings == 6
        assert slept[-1] == 1
