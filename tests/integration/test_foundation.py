"""The foundation against a real Synapse: bot joins, commands, exactly-once ingest."""

from __future__ import annotations

import sqlite3

import pytest
from conftest import Stack
from helpers import bot_replies
from matrix_client import wait_for

from bridge.audit.crypto import BlindIndexer
from bridge.audit.keyring import Keyring

pytestmark = pytest.mark.integration


def stored_counts(stack: Stack, event_ids: list[str]) -> dict[str, int]:
    """How often each event is in the archive (found through its blind index)."""
    keyring = Keyring.load(stack.dev.workdir / "data" / "audit-keyring.json")
    index = BlindIndexer(keyring.index_key)
    by_idx = {index("event_id", e): e for e in event_ids}
    counts = dict.fromkeys(event_ids, 0)
    with sqlite3.connect(stack.db_path) as db:
        for (idx,) in db.execute("SELECT event_id_idx FROM records WHERE kind='event'"):
            if idx in by_idx:
                counts[by_idx[idx]] += 1
    return counts


def appservice_delivery_log(stack: Stack, lines: int = 60) -> str:
    """Synapse's log lines about delivering to appservices (recoverer, retries, pings)."""
    words = ("recoverer", "Retrying", "Scheduling retries", "ping", "push_bulk", "transactions/")
    log = stack.dev.synapse.log_path.read_text("utf-8", "replace").splitlines()
    return "\n".join([line for line in log if any(w in line for w in words)][-lines:])


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
            return all(stored_counts(stack, sent).values())

        await wait_for(all_stored, timeout=30, message="all messages stored")
    assert set(stored_counts(stack, sent).values()) == {1}


async def test_wrong_hs_token_is_refused_and_stores_nothing(stack: Stack) -> None:
    import aiohttp

    body = {
        "events": [{"event_id": "$forged", "room_id": "!x:localhost", "type": "m.room.message"}]
    }
    async with aiohttp.ClientSession() as s:
        async with s.put(
            f"{stack.dev.bridge_url}/_matrix/app/v1/transactions/forged",
            json=body,
            headers={"Authorization": "Bearer not-the-token"},
        ) as r:
            assert r.status == 403
            assert (await r.json())["errcode"] == "M_FORBIDDEN"
    assert stored_counts(stack, ["$forged"]) == {"$forged": 0}


async def test_sigkill_under_load_loses_and_duplicates_nothing(stack: Stack) -> None:
    import asyncio

    async with stack.client(stack.admin) as admin:
        room = await admin.create_room(name="crash test")
        sent: list[str] = []

        async def sender() -> None:
            for i in range(120):
                sent.append(await admin.send_text(room, f"load {i}"))
                await asyncio.sleep(0.01)

        task = asyncio.create_task(sender())
        await wait_for(lambda_async(lambda: len(sent) >= 40), timeout=30, message="40 sends")
        stack.bridge.kill()  # SIGKILL mid-stream: no cleanup, no flush
        await asyncio.sleep(1.0)  # Synapse keeps accepting messages while we are down
        await asyncio.to_thread(stack.bridge.start)
        await task

        async def all_stored() -> bool:
            return all(stored_counts(stack, sent).values())

        try:
            await wait_for(all_stored, timeout=90, interval=0.5, message="every message stored")
        except TimeoutError:
            missing = sum(1 for n in stored_counts(stack, sent).values() if n == 0)
            raise AssertionError(
                f"{missing} of {len(sent)} messages not stored\n"
                f"bridge log:\n{stack.bridge.log_tail(60)}\n"
                f"Synapse's appservice delivery:\n{appservice_delivery_log(stack)}"
            ) from None
    assert set(stored_counts(stack, sent).values()) == {1}, "an event was stored twice"
    assert len(sent) == 120


def lambda_async(fn):  # type: ignore[no-untyped-def]
    async def wrapped():  # type: ignore[no-untyped-def]
        return fn()

    return wrapped
