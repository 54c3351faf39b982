"""Retention with a real Synapse: m.room.retention, the sweeper's redactions and purges,
legal hold, a restart in the middle of a sweep, and durations refused with an example.

The module runs its own stack (Synapse's own retention left off, so whatever disappears
was removed by the bot) with a sweep every second and small batches, so a sweep over a few
rooms takes several ticks. The last test restarts the bridge with the admin user's access
token as ``homeserver.admin_token`` to exercise ``purge_history``.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from conftest import User
from helpers import bot_replies
from matrix_client import MatrixTestClient, wait_for
from synapse_fixtures import require_synapse

from bridge.dev.devstack import BridgeProcess, DevStack, prepare_stack

pytestmark = pytest.mark.integration

DAY_MS = 86_400_000


@dataclass
class RetentionStack:
    dev: DevStack
    bridge: BridgeProcess
    admin: User

    @property
    def bot(self) -> str:
        return f"@policybot:{self.dev.server_name}"

    def client(self) -> MatrixTestClient:
        return MatrixTestClient(self.dev.synapse.url, self.admin.user_id, self.admin.token)

    def restart(self) -> None:
        self.bridge.stop()
        self.bridge.start()


@pytest.fixture(scope="module")
def rstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RetentionStack]:
    require_synapse(antispam=True)
    workdir = tmp_path_factory.mktemp("retention")
    dev = prepare_stack(
        workdir,
        permissions={"@admin:localhost": "admin"},
        bridge_options={
            "retention": {"sweep_interval": "1s", "sweep_batch": 2, "sweep_max_events": 2},
            "executor": {"rate_per_second": 50},
        },
    )
    dev.synapse.start()
    bridge = BridgeProcess(dev.config_path, workdir / "bridge.log", dev.bridge_port)
    try:
        admin = User(*dev.synapse.register_user("admin", "admin-pw", admin=True))
        bridge.start()
        yield RetentionStack(dev, bridge, admin)
    finally:
        bridge.stop()
        dev.synapse.stop()


async def managed_room(stack: RetentionStack, c: MatrixTestClient, name: str) -> str:
    room = await c.create_room(
        name=name,
        invite=[stack.bot],
        power_level_content_override={"users": {stack.bot: 100}},
    )

    async def joined() -> bool:
        return stack.bot in await c.joined_members(room)

    await wait_for(joined, timeout=30, message="the bot to join")
    return room


async def command(stack: RetentionStack, c: MatrixTestClient, room: str, text: str) -> str:
    cmd = await c.send_text(room, text)
    [reply] = await bot_replies(c, room, stack.bot, cmd, timeout=30)
    return str(reply["content"]["body"])


async def send_messages(c: MatrixTestClient, room: str, prefix: str, n: int) -> list[str]:
    return [await c.send_text(room, f"{prefix} {i}") for i in range(n)]


def is_redacted(event: dict[str, Any]) -> bool:
    return bool(event.get("unsigned", {}).get("redacted_because")) or not event.get("content")


async def timeline(c: MatrixTestClient, room: str) -> dict[str, dict[str, Any]]:
    return {e["event_id"]: e for e in await c.messages(room, limit=500)}


async def bot_redactions(stack: RetentionStack, c: MatrixTestClient, room: str) -> list[str]:
    """The targets of every redaction the bot sent in the room (one entry per redaction)."""
    return [
        e.get("redacts") or e.get("content", {}).get("redacts")
        for e in await c.messages(room, limit=1000)
        if e["type"] == "m.room.redaction" and e["sender"] == stack.bot
    ]


async def wait_redacted(
    c: MatrixTestClient, room: str, ids: list[str], timeout: float = 60
) -> None:
    async def done() -> bool:
        events = await timeline(c, room)
        return all(i in events and is_redacted(events[i]) for i in ids)

    await wait_for(done, timeout=timeout, interval=0.3, message=f"{len(ids)} redactions")


async def test_retention_set_writes_room_state_and_bad_durations_are_refused(
    rstack: RetentionStack,
) -> None:
    async with rstack.client() as c:
        room = await managed_room(rstack, c, "thirty days")
        reply = await command(rstack, c, room, "!policy retention set 30d --scope here")
        assert "older than 30d will be removed in" in reply

        async def state() -> dict[str, Any] | None:
            return await c.get_state(room, "m.room.retention") or None

        content = await wait_for(state, timeout=30, interval=0.3, message="m.room.retention")
        assert content["max_lifetime"] == 30 * DAY_MS == 2_592_000_000
        for bad in ("-3d", "10x"):
            reply = await command(rstack, c, room, f"!policy retention set {bad} --scope here")
            assert f"'{bad}' is not a valid duration" in reply
            assert "expected a duration like 30d, 12h or 1y" in reply
        show = await command(rstack, c, room, "!policy retention show --scope here")
        assert "messages are deleted after 30d" in show


async def test_old_messages_are_redacted_newer_ones_stay(rstack: RetentionStack) -> None:
    async with rstack.client() as c:
        room = await managed_room(rstack, c, "short lifetime")
        old = await send_messages(c, room, "old", 3)
        await asyncio.sleep(10)
        new = await send_messages(c, room, "new", 2)
        # shortening asks first, with the count of messages it would delete
        reply = await command(rstack, c, room, "!policy retention set 8s --scope here")
        assert re.search(r"this would delete 3 existing message\(s\) in 1 room\(s\)", reply), reply
        reply = await command(rstack, c, room, "!policy retention set 8s --scope here --yes")
        assert "older than 8s will be removed" in reply
        await wait_redacted(c, room, old, timeout=30)
        events = await timeline(c, room)
        assert not any(is_redacted(events[i]) for i in new)
        # freeze: retention off here, and the newer messages are still there afterwards
        await command(rstack, c, room, "!policy retention off --scope here")

        async def lifted() -> bool:  # the room no longer shows the old limit
            return "max_lifetime" not in (await c.get_state(room, "m.room.retention") or {})

        await wait_for(lifted, timeout=30, interval=0.3, message="m.room.retention emptied")
        await asyncio.sleep(9)
        events = await timeline(c, room)
        assert not any(is_redacted(events[i]) for i in new)
        assert events[new[0]]["content"]["body"] == "new 0"
        reasons = {
            e["content"].get("reason")
            for e in events.values()
            if e["type"] == "m.room.redaction" and e["sender"] == rstack.bot
        }
        assert reasons == {"retention: older than 8s"}
        status = await command(rstack, c, room, "!policy status")
        assert re.search(r"retention totals: [1-9]\d* event\(s\) removed", status), status


async def test_room_on_legal_hold_keeps_everything(rstack: RetentionStack) -> None:
    async with rstack.client() as c:
        room = await managed_room(rstack, c, "on hold")
        kept = await send_messages(c, room, "evidence", 3)
        reply = await command(rstack, c, room, "!policy hold on --reason litigation")
        assert "hold" in reply.lower()
        await asyncio.sleep(3)
        await command(rstack, c, room, "!policy retention set 2s --scope here --yes")
        await asyncio.sleep(8)  # many sweeps
        events = await timeline(c, room)
        assert all(not is_redacted(events[i]) for i in kept)
        assert await bot_redactions(rstack, c, room) == []
        status = await command(rstack, c, room, "!policy status")
        assert re.search(r"[1-9]\d* on legal hold", status), status
        # lifted: the sweep catches up
        await command(rstack, c, room, "!policy hold off")
        await wait_redacted(c, room, kept, timeout=30)
        await command(rstack, c, room, "!policy retention off --scope here")


async def test_restart_in_the_middle_of_a_sweep_resumes(rstack: RetentionStack) -> None:
    async with rstack.client() as c:
        rooms = [await managed_room(rstack, c, f"sweep {i}") for i in range(3)]
        sent = {room: await send_messages(c, room, "bulk", 6) for room in rooms}
        await asyncio.sleep(3)
        for room in rooms:
            await command(rstack, c, room, "!policy retention set 2s --scope here --yes")

        async def progress() -> tuple[list[str], list[str]]:
            done, todo = [], []
            for room in rooms:
                events = await timeline(c, room)
                finished = all(is_redacted(events[i]) for i in sent[room])
                (done if finished else todo).append(room)
            return done, todo

        # 2 events per second in all: stop as soon as one room is finished
        async def one_done() -> tuple[list[str], list[str]] | None:
            done, todo = await progress()
            return (done, todo) if done else None

        done_before, _ = await wait_for(one_done, timeout=60, interval=0.2, message="a room")
        await asyncio.to_thread(rstack.restart)
        for room in rooms:
            await wait_redacted(c, room, sent[room], timeout=60)
        for room in rooms:
            # (the commands and the bot's replies expire too: only the bulk is counted)
            targets = [t for t in await bot_redactions(rstack, c, room) if t in sent[room]]
            assert sorted(targets) == sorted(sent[room]), (room, room in done_before)
            await command(rstack, c, room, "!policy retention off --scope here")


async def test_purge_with_admin_token_removes_events_from_messages(
    rstack: RetentionStack,
) -> None:
    rstack.dev.set_bridge_options("homeserver", {"admin_token": rstack.admin.token})
    rstack.dev.set_bridge_options("retention", {"sweep_batch": 50, "sweep_max_events": 500})
    await asyncio.to_thread(rstack.restart)
    async with rstack.client() as c:
        room = await managed_room(rstack, c, "purged")
        old = await send_messages(c, room, "purge me", 3)
        await asyncio.sleep(8)
        new = await send_messages(c, room, "keep me", 2)
        await command(rstack, c, room, "!policy retention set 6s --scope here --yes")

        async def gone() -> bool:
            events = await timeline(c, room)
            return not any(i in events for i in old)

        await wait_for(gone, timeout=60, interval=0.5, message="old events purged")
        events = await timeline(c, room)
        assert all(i in events for i in new)
        # state survives a purge: the room still has its name and the retention state
        assert (await c.get_state(room, "m.room.name"))["name"] == "purged"
        assert (await c.get_state(room, "m.room.retention"))["max_lifetime"] == 6000
        await command(rstack, c, room, "!policy retention off --scope here")
