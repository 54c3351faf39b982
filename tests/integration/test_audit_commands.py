"""Legal hold and the audit archive from Matrix, through a real Synapse and bridge."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime

import pytest
from conftest import Stack, User
from helpers import bot_replies
from matrix_client import wait_for

pytestmark = pytest.mark.integration

SECRET = "the merger closes on the 14th, tell nobody"


async def command(stack: Stack, user: User, room: str, text: str) -> dict:
    async with stack.client(user) as c:
        cmd = await c.send_text(room, text)
        [reply] = await bot_replies(c, room, stack.bot, cmd)
        return reply["content"]


async def test_hold_commands_verify_and_search(stack: Stack, management_room: str) -> None:
    async with stack.client(stack.admin) as admin:
        room = await admin.create_room(name="evidence <room>", invite=[stack.bot])

        async def bot_joined() -> bool:
            return stack.bot in await admin.joined_members(room)

        await wait_for(bot_joined, timeout=20, message="the bot to join")
        secret_event = await admin.send_text(room, SECRET)
        await asyncio.sleep(0.05)
        until = datetime.now(UTC).isoformat()

    # an admin puts the room they are in on hold; the reason is kept with it
    reply = await command(stack, stack.admin, room, '!policy hold on --reason "case <7>"')
    assert "legal hold" in reply["body"] and room in reply["body"]
    reply = await command(stack, stack.admin, room, "!policy hold on")
    assert "already on legal hold" in reply["body"]

    # an auditor may list holds but not change them
    reply = await command(stack, stack.auditor, management_room, "!policy hold list")
    assert room in reply["body"] and "case <7>" in reply["body"]
    assert "case &lt;7&gt;" in reply["formatted_body"]
    assert "<7>" not in reply["formatted_body"]
    reply = await command(stack, stack.auditor, management_room, f"!policy hold off {room}")
    assert "needs the admin role" in reply["body"]
    reply = await command(stack, stack.admin, management_room, "!policy hold on @someone:localhost")
    assert "user @someone:localhost is on legal hold" in reply["body"]

    # the chain verifies from Matrix too
    reply = await command(stack, stack.auditor, management_room, "!policy audit verify")
    assert "intact" in reply["body"], reply["body"]
    assert "records verified" in reply["body"]

    # search: counts and event IDs, never the message text
    async def found() -> dict | None:
        content = await command(
            stack,
            stack.auditor,
            management_room,
            f"!policy audit search --room {room} --type m.room.message --until {until}",
        )
        return content if secret_event in content["body"] else None

    reply = await wait_for(found, timeout=30, message="the message in the archive")
    assert "archive records match" in reply["body"]
    assert "m.room.message" in reply["body"]
    assert SECRET not in reply["body"] and SECRET not in reply["formatted_body"]
    # --type with a record kind: the hold records, grouped by room (the room hold in its
    # room, the user hold in none), never other kinds
    reply = await command(
        stack, stack.auditor, management_room, "!policy audit search --type hold --since 2020-01-01"
    )
    body = reply["body"]
    assert re.search(r"\d+ archive records match .*--type hold", body), body
    assert re.search(rf"\b1 x hold in {re.escape(room)} ", body), body
    assert re.search(r"\b\d+ x hold in \(no room\) ", body), body
    assert " x m.room.message " not in body and " x command " not in body, body
    reply = await command(stack, stack.auditor, management_room, "!policy audit search --since x")
    assert "not an ISO date" in reply["body"]
    # not in ordinary rooms: search and verify are management-room commands
    reply = await command(stack, stack.admin, room, "!policy audit search")
    assert "only works in the management room" in reply["body"]

    # lifting the hold
    reply = await command(stack, stack.admin, management_room, f"!policy hold off {room}")
    assert "lifted" in reply["body"]
    reply = await command(stack, stack.auditor, management_room, "!policy hold list")
    assert room not in reply["body"]
