"""Policy notices through the real Synapse: the blocked sender is told in a DM with the bot."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest
from conftest import Stack
from helpers import bot_notices, bot_replies, notice_invite, sync_token
from matrix_client import MatrixError, MatrixTestClient, wait_for

pytestmark = pytest.mark.integration

CARD = "4111 1111 1111 1111"


async def command(stack: Stack, room: str, text: str) -> None:
    async with stack.client(stack.admin) as admin:
        await admin.send_text(room, text)


async def test_a_blocked_sender_gets_one_grouped_notice_without_the_secret(
    stack: Stack, management_room: str
) -> None:
    await command(stack, management_room, "!policy dlp detectors enable card")
    user = stack.new_user("noticed")
    async with stack.client(user) as alice:
        room = await alice.create_room(name="payments desk")
        since = await sync_token(alice)

        async def refused_once() -> bool:
            try:
                await alice.send_text(room, f"my card is {CARD}")
            except MatrixError as e:
                return e.errcode == "M_FORBIDDEN" and "detector:card" in e.error
            return False

        await wait_for(refused_once, timeout=20, message="the card detector")
        notice_room, invite = await notice_invite(alice, stack.bot, since)
        since = await sync_token(alice)
        assert invite["content"].get("is_direct") is True
        await alice.join(notice_room)
        [notice] = await wait_for(
            lambda: bot_notices(alice, notice_room, stack.bot), timeout=20, message="a notice"
        )
        body = notice["content"]["body"]
        html = notice["content"]["formatted_body"]
        assert "detector:card" in body and room in body
        assert "reference" in body and "!policy report" in body
        for text in (body, html):
            assert "1111 1111" not in text and "4111" not in text
        # The same card pasted again within the window: refused, but no new notice.
        for _ in range(3):
            with pytest.raises(MatrixError):
                await alice.send_text(room, f"again {CARD}")
        await asyncio.sleep(3)
        assert len(await bot_notices(alice, notice_room, stack.bot)) == 1
        # Still the one notice room: no second invite.
        sync = await alice.request(
            "GET", "/_matrix/client/v3/sync", params={"timeout": "0", "since": since}
        )
        assert sync.get("rooms", {}).get("invite", {}) == {}


async def test_a_report_reaches_the_management_room_and_strangers_are_ignored(
    stack: Stack, management_room: str
) -> None:
    await command(stack, management_room, "!policy dlp detectors enable card")
    user = stack.new_user("reporter")
    async with stack.client(user) as alice:
        room = await alice.create_room(name="billing")
        since = await sync_token(alice)
        with pytest.raises(MatrixError):
            await alice.send_text(room, f"card {CARD} for the order")
        notice_room, _ = await notice_invite(alice, stack.bot, since)
        await alice.join(notice_room)
        [notice] = await wait_for(
            lambda: bot_notices(alice, notice_room, stack.bot), timeout=20, message="a notice"
        )
        match = re.search(r"reference ([A-Z0-9]{4}-[A-Z0-9]{4})", notice["content"]["body"])
        assert match is not None
        ref = match.group(1)
        # Someone else in the notice room: their commands do nothing.
        await alice.invite(notice_room, stack.stranger.user_id)
        async with stack.client(stack.stranger) as stranger:
            await stranger.join(notice_room)
            probe = await stranger.send_text(notice_room, f"!policy report {ref} not me")
        report = await alice.send_text(notice_room, f"!policy report {ref} it is a test card")
        [reply] = await bot_replies(alice, notice_room, stack.bot, report)
        assert "sent to the compliance team" in reply["content"]["body"]
        assert await bot_replies_now(alice, notice_room, stack.bot, probe) == []

    async with stack.client(stack.admin) as admin:

        async def reports() -> list[str]:
            events = await admin.messages(management_room, limit=50)
            return [
                e["content"]["body"]
                for e in events
                if e.get("sender") == stack.bot and ref in e.get("content", {}).get("body", "")
            ]

        [text] = await wait_for(reports, timeout=20, message="the report")
    assert user.user_id in text and "detector:card" in text and room in text
    assert "it is a test card" in text and "not me" not in text
    assert "1111 1111 1111" not in text and "****" in text  # the masked excerpt
    found = await admin_reply(stack, management_room, "!policy audit search --type report")
    assert "archive records match --type report" in found
    stats = await admin_reply(stack, management_room, "!policy dlp stats")
    assert "detector:card: 1 reports" in stats


async def bot_replies_now(
    client: MatrixTestClient, room: str, bot: str, event_id: str
) -> list[dict[str, Any]]:
    events = await client.messages(room, limit=50)
    return [
        e
        for e in events
        if e.get("sender") == bot
        and e.get("content", {}).get("m.relates_to", {}).get("m.in_reply_to", {}).get("event_id")
        == event_id
    ]


async def admin_reply(stack: Stack, room: str, text: str) -> str:
    async with stack.client(stack.admin) as admin:
        cmd = await admin.send_text(room, text)
        [reply] = await bot_replies(admin, room, stack.bot, cmd)
        return str(reply["content"]["body"])


def ref_of(notice: dict[str, Any]) -> str:
    match = re.search(r"reference ([A-Z0-9]{4}-[A-Z0-9]{4})", notice["content"]["body"])
    assert match is not None
    return match.group(1)


async def test_an_override_lets_exactly_that_message_through_once(
    stack: Stack, management_room: str
) -> None:
    reply = await admin_reply(
        stack, management_room, "!policy dlp add-regex ovr-ticket OVR-[0-9]{6} --overridable"
    )
    assert "ovr-ticket" in reply
    await command(stack, management_room, "!policy dlp detectors enable card")
    user = stack.new_user("justifier")
    secret = "ticket OVR-123456 for the auditor"
    async with stack.client(user) as alice:
        room = await alice.create_room(name="ops")
        other = await alice.create_room(name="ops 2")
        since = await sync_token(alice)

        async def refused(body: str, where: str = room) -> bool:
            try:
                await alice.send_text(where, body)
            except MatrixError as e:
                return e.errcode == "M_FORBIDDEN"
            return False

        await wait_for(lambda: refused(secret), timeout=20, message="the overridable rule")
        notice_room, _ = await notice_invite(alice, stack.bot, since)
        await alice.join(notice_room)
        [notice] = await wait_for(
            lambda: bot_notices(alice, notice_room, stack.bot), timeout=20, message="a notice"
        )
        assert "regex:ovr-ticket" in notice["content"]["body"]
        assert "!policy override" in notice["content"]["body"]
        ref = ref_of(notice)
        cmd = await alice.send_text(notice_room, f"!policy override {ref} the auditor needs it")
        [granted] = await bot_replies(alice, notice_room, stack.bot, cmd)
        assert "granted" in granted["content"]["body"]
        assert await refused(secret, other)  # another room
        assert await refused(secret + "!")  # another text
        await alice.send_text(room, secret)  # the one resend
        assert await refused(secret)  # used up

        # A rule not marked overridable: the notice says so and the override is refused.
        assert await refused(f"card {CARD}")

        async def card_notice() -> dict[str, Any] | None:
            found = [
                n
                for n in await bot_notices(alice, notice_room, stack.bot)
                if "detector:card" in n["content"]["body"]
            ]
            return found[0] if found else None

        card = await wait_for(card_notice, timeout=20, message="the card notice")
        assert "cannot be overridden" in card["content"]["body"]
        cmd = await alice.send_text(notice_room, f"!policy override {ref_of(card)} I need it")
        [refusal] = await bot_replies(alice, notice_room, stack.bot, cmd)
        assert "cannot be overridden" in refusal["content"]["body"]

    async with stack.client(stack.admin) as admin:

        async def told() -> list[str]:
            events = await admin.messages(management_room, limit=50)
            return [
                e["content"]["body"]
                for e in events
                if e.get("sender") == stack.bot
                and f"Override {ref} granted" in e.get("content", {}).get("body", "")
            ]

        [text] = await wait_for(told, timeout=20, message="the override in the management room")
    assert "the auditor needs it" in text and user.user_id in text
    found = await admin_reply(stack, management_room, "!policy audit search --type override")
    assert "archive records match --type override" in found  # granted and used
    assert "(granted)" in found and "(used)" in found


async def test_a_warning_where_the_bot_is_not_in_the_room_reaches_the_notice_room(
    stack: Stack, management_room: str
) -> None:
    reply = await admin_reply(
        stack, management_room, "!policy dlp add-regex wrn-ticket WRN-[0-9]{5} --action warn"
    )
    assert "wrn-ticket" in reply
    user = stack.new_user("warned")
    async with stack.client(user) as alice:
        room = await alice.create_room(name="no bot here")
        since = await sync_token(alice)
        await alice.send_text(room, "see WRN-12345")  # warn: sent
        notice_room, _ = await notice_invite(alice, stack.bot, since)
        await alice.join(notice_room)
        [notice] = await wait_for(
            lambda: bot_notices(alice, notice_room, stack.bot), timeout=20, message="a warning"
        )
        body = notice["content"]["body"]
        assert "regex:wrn-ticket" in body and room in body and "was sent" in body
        assert "WRN-12345" not in body
        members = await alice.joined_members(room)
        assert stack.bot not in members


async def test_a_reported_false_positive_answered_with_an_exception_then_passes(
    stack: Stack, management_room: str
) -> None:
    await command(stack, management_room, "!policy dlp detectors enable card")
    user = stack.new_user("excepted")
    message = f"for the demo use the test card {CARD} please"
    async with stack.client(user) as alice:
        room = await alice.create_room(name="demo shop")
        since = await sync_token(alice)

        async def refused(body: str) -> bool:
            try:
                await alice.send_text(room, body)
            except MatrixError as e:
                return e.errcode == "M_FORBIDDEN"
            return False

        await wait_for(lambda: refused(message), timeout=20, message="the card detector")
        notice_room, _ = await notice_invite(alice, stack.bot, since)
        await alice.join(notice_room)
        [notice] = await wait_for(
            lambda: bot_notices(alice, notice_room, stack.bot), timeout=20, message="a notice"
        )
        ref = ref_of(notice)
        report = await alice.send_text(notice_room, f"!policy report {ref} shop test card")
        [reply] = await bot_replies(alice, notice_room, stack.bot, report)
        assert "sent to the compliance team" in reply["content"]["body"]

        answer = await admin_reply(
            stack,
            management_room,
            f'!policy dlp except detector:card "test card {CARD}" --report {ref} --room {room}',
        )
        assert "exception added" in answer and f"report {ref} answered" in answer

        async def passes() -> bool:
            return not await refused(message)

        await wait_for(passes, timeout=20, message="the excepted message to pass")
        # The allowed phrase and a real card elsewhere in the same message: still refused.
        assert await refused(f"test card {CARD}, and mine is 5555 5555 5555 4444")
        assert await refused(f"my card {CARD}")  # the number outside the phrase

    stats = await admin_reply(stack, management_room, "!policy dlp stats")
    assert "answered with an exception" in stats
    listed = await admin_reply(stack, management_room, "!policy dlp exceptions")
    assert f"(report {ref})" in listed
