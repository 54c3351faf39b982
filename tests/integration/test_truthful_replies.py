"""Replies and rollout reports say what happened, with a real Synapse.

A room made by an ordinary user (room version 12: its creator outranks everyone) where the
bot joined with the default power 0, and no admin token: a retention change typed there
(``--scope here``) cannot be applied, and the reply, the management room's report and the
room itself say so.
"""

from __future__ import annotations

import asyncio

import pytest
from conftest import Stack
from helpers import bot_replies
from matrix_client import MatrixTestClient, wait_for

pytestmark = pytest.mark.integration

LACK = "lacks power level 50 to send m.room.retention"
ROOM_NOTICE = "cannot enforce the organization's policy in this room"


async def command(stack: Stack, room: str, text: str) -> str:
    async with stack.client(stack.admin) as admin:
        cmd = await admin.send_text(room, text)
        [reply] = await bot_replies(admin, room, stack.bot, cmd, timeout=30)
        return str(reply["content"]["body"])


async def bot_bodies(client: MatrixTestClient, room: str, bot: str) -> list[str]:
    events = await client.messages(room, limit=200)
    return [str(e.get("content", {}).get("body", "")) for e in events if e.get("sender") == bot]


async def finished_report(client: MatrixTestClient, room: str, bot: str, what: str) -> str:
    """The final report of the rollout ``what`` in the management room."""

    async def find() -> str | None:
        for body in await bot_bodies(client, room, bot):
            if f"Policy rollout ({what}) finished" in body:
                return body
        return None

    found: str = await wait_for(find, timeout=60, interval=1, message=f"the report of {what}")
    return found


async def test_retention_where_the_bot_lacks_power_is_reported_as_not_applied(
    stack: Stack, management_room: str
) -> None:
    owner = stack.new_user("truthowner")
    async with stack.client(owner) as o:
        room = await o.create_room(name="no power for the bot", room_version="12")
        await o.invite(room, stack.admin.user_id)
        async with stack.client(stack.admin) as admin:
            await admin.join(room)
        await o.invite(room, stack.bot)

        async def joined() -> bool:
            return stack.bot in await o.joined_members(room)

        await wait_for(joined, timeout=20, message="the bot to join")

        async def listed() -> bool:
            return room in await command(stack, management_room, "!policy rooms")

        await wait_for(listed, timeout=30, interval=1, message="the room in !policy rooms")
        await asyncio.sleep(3)  # the join's reconcile reads the room's power levels

        # (typed in the room: `--scope here`)
        reply = await command(stack, room, "!policy retention set 30d --scope here")
        # Recorded, but not applied there: why, and the fix.
        assert reply.startswith("⚠️ messages older than 30d will be removed in " + room)
        assert "the bot cannot apply it in the 1 room it reaches" in reply
        assert f"{LACK}: 1 room" in reply
        assert "bridge.obtain_power: true" in reply and "room creator" in reply

        async with stack.client(stack.admin) as admin:
            report = await finished_report(
                admin, management_room, stack.bot, "retention set to 30d"
            )
            assert report.startswith("⚠️")
            assert "applied in 0 rooms, not applied in 1 room, failed in 0 rooms" in report
            assert f"• {LACK}: 1 room" in report
            assert f"• {room}: power level 50 to send m.room.retention" in report

        # The room itself is told, once.
        async def room_notices() -> list[str] | None:
            found = [b for b in await bot_bodies(o, room, stack.bot) if ROOM_NOTICE in b]
            return found or None

        notices = await wait_for(room_notices, timeout=30, interval=1, message="the notice")
        assert len(notices) == 1
        notice = notices[0]
        assert "power level 50" in notice and "old messages are not removed" in notice

        # A second change that cannot be applied either: reported, but the room is not
        # told again, and the management room does not list the same lack twice.
        reply = await command(stack, room, "!policy retention set 60d --scope here")
        assert f"{LACK}: 1 room" in reply
        async with stack.client(stack.admin) as admin:
            report = await finished_report(
                admin, management_room, stack.bot, "retention set to 60d"
            )
            assert "not applied in 1 room" in report
            assert f"• {room}: power level" not in report  # told the admins already
        await asyncio.sleep(2)
        assert len(await room_notices() or []) == 1

    # Back to no retention in that room for the other tests.
    await command(stack, room, "!policy retention off --scope here")
