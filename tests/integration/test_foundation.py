"""The foundation against a real Synapse: bot joins, commands, exactly-once ingest."""

from __future__ import annotations

import sqlite3

import pytest
from conftest import Stack
from helpers import bot_replies
from matrix_client import wait_for

pytestmark = pytest.mark.integration


def stored_event_ids(stack: Stack) -> list[str]:
    with sqlite3.connect(stack.db_path) as db:
        return [r[0] for r in db.execute("SELECT event_id FROM records WHERE kind='event'")]


async def test_status_answers_admin_and_refuses_stranger(
    stack: Stack, management_room: str
) -> None:
    async with stack.client(stack.admin) as admin:
        cmd = await admin.send_text(management_room, "!policy status")
        [reply] = await bot_replies(admin, management_room, stack.bot, cmd)
        body = reply["content"]["body"]
        assert "Policy bridge status" in body
        assert "database: sqlite" in body
        assert "events stored:" in body
        assert reply["content"]["msgtype"] == "m.notice"
        assert "<li>" in reply["content"]["formatted_body"]

    # A stranger in a room with the bot gets a polite refusal, not silence.
    async with stack.client(stack.stranger) as stranger:
        room = await stranger.create_room(name="stranger's room", invite=[stack.bot])

        async def bot_joined() -> bool:
            return stack.bot in await stranger.joined_members(room)

        await wait_for(bot_joined, timeout=20, message="the bot to join on invite")
        cmd = await stranger.send_text(room, "!policy status")
        [reply] = await bot_replies(stranger, room, stack.bot, cmd)
        assert "not allowed" in reply["content"]["body"]
        assert "Policy bridge status" not in reply["content"]["body"]


async def test_help_is_generated_and_escaped(stack: Stack, management_room: str) -> None:
    async with stack.client(stack.auditor) as auditor:
        cmd = await auditor.send_text(management_room, "!policy help")
        [reply] = await bot_replies(auditor, management_room, stack.bot, cmd)
        assert "!policy status" in reply["content"]["body"]
        # An unknown command with HTML in it comes back escaped.
        cmd = await auditor.send_text(management_room, "!policy <b>nope</b>")
        [reply] = await bot_replies(auditor, management_room, stack.bot, cmd)
        assert "<b>" not in reply["content"]["formatted_body"]
        assert "&lt;b&gt;" in reply["content"]["formatted_body"]


async def test_messages_are_stored_exactly_once(stack: Stack) -> None:
    async with stack.client(stack.admin) as admin:
        room = await admin.create_room(name="ingest")
        sent = [await admin.send_text(room, f"hello {i}") for i in range(30)]

        async def all_stored() -> bool:
            return set(sent) <= set(stored_event_ids(stack))

        await wait_for(all_stored, timeout=30, message="all messages stored")
    ids = stored_event_ids(stack)
    assert len(ids) == len(set(ids))
