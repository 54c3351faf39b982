"""DLP through real Synapse: space scopes, --retroactive, encryption policy, warn."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import Stack, User
from helpers import bot_replies
from matrix_client import MatrixError, MatrixTestClient, wait_for

pytestmark = pytest.mark.integration

MEGOLM = {"algorithm": "m.megolm.v1.aes-sha2"}


async def command(stack: Stack, room: str, text: str) -> str:
    async with stack.client(stack.admin) as admin:
        cmd = await admin.send_text(room, text)
        [reply] = await bot_replies(admin, room, stack.bot, cmd)
        return str(reply["content"]["body"])


async def managed_room(stack: Stack, client: MatrixTestClient, **kw: Any) -> str:
    """A room with the bot joined and able to redact."""
    room = await client.create_room(
        invite=[stack.bot, *kw.pop("invite", [])],
        power_level_content_override={"users": {stack.bot: 50}},
        **kw,
    )

    async def bot_in() -> bool:
        return stack.bot in await client.joined_members(room)

    await wait_for(bot_in, timeout=20, message="bot joined")
    return room


async def management_notice(stack: Stack, room: str, *needles: str, timeout: float = 30) -> str:
    async with stack.client(stack.admin) as admin:

        async def find() -> str | None:
            for e in await admin.messages(room, limit=50):
                body = str(e.get("content", {}).get("body", ""))
                if e.get("sender") == stack.bot and all(n in body for n in needles):
                    return body
            return None

        return await wait_for(find, timeout=timeout, message=f"a notice with {needles}")


async def test_retroactive_keyword_redacts_an_earlier_message(
    stack: Stack, management_room: str
) -> None:
    user = stack.new_user("angler")
    async with stack.client(user) as u:
        room = await managed_room(stack, u, name="catch of the day")
        early = await u.send_text(room, "the wahoofish shipment lands on friday")
        kept = await u.send_text(room, "nothing to see here")
        reply = await command(
            stack, management_room, "!policy dlp add-keyword wahoofish --retroactive"
        )
        assert "keyword added" in reply and "Scanning the archive" in reply

        async def redacted() -> bool:
            event = await u.get_event(room, early)
            return "body" not in event.get("content", {})

        await wait_for(redacted, timeout=30, message="the retroactive redaction")
        assert "body" in (await u.get_event(room, kept))["content"]
        # And the rule is in force at the gate from now on.
        with pytest.raises(MatrixError) as exc:
            await u.send_text(room, "wahoofish again")
        assert exc.value.errcode == "M_FORBIDDEN"
    summary = await management_notice(stack, management_room, "Retroactive scan", "wahoofish")
    assert "1 queued for redaction" in summary and user.user_id in summary


async def test_space_rules_apply_in_the_rooms_of_the_space(
    stack: Stack, management_room: str
) -> None:
    owner = stack.new_user("spaceowner")
    async with stack.client(owner) as o, stack.client(stack.admin) as admin:
        space = await managed_room(
            stack,
            o,
            name="treasury",
            creation_content={"type": "m.space"},
            invite=[stack.admin.user_id],
        )
        await admin.join(space)
        reply = await command(stack, space, "!policy dlp add-keyword marlinspike --scope here")
        assert f"in {space}" in reply
        reply = await command(stack, space, "!policy dlp encryption forbid --scope here")
        assert "forbidden" in reply
        child = await o.create_room(name="treasury ops")
        outside = await o.create_room(name="canteen")
        await o.send_state(space, "m.space.child", child, {"via": [stack.dev.server_name]})
        await o.send_state(child, "m.space.parent", space, {"via": [stack.dev.server_name]})

        async def refused_in_child() -> MatrixError | None:
            try:
                await o.send_text(child, "marlinspike numbers")
            except MatrixError as e:
                return e
            return None

        err = await wait_for(refused_in_child, timeout=20, message="the space rule at the gate")
        assert err.errcode == "M_FORBIDDEN" and "keyword:admin-block" in err.error
        await o.send_text(outside, "marlinspike numbers")  # not in the space: allowed
        # Encryption is refused by the gate in the space's rooms (user_may_send_state_event:
        # Synapse passes on the code and its own words; the sender's notice says why).
        with pytest.raises(MatrixError) as exc:
            await o.send_state(child, "m.room.encryption", "", MEGOLM)
        assert exc.value.status == 403 and exc.value.errcode == "M_FORBIDDEN"
        assert exc.value.error == "You are not permitted to send the state event"
        assert await o.get_state(child, "m.room.encryption") is None
        await o.send_state(outside, "m.room.encryption", "", MEGOLM)  # elsewhere: allowed


async def test_encryption_at_room_creation_is_refused_or_reported(
    stack: Stack, management_room: str
) -> None:
    """The gate refuses an encrypted room at creation (the project's Synapse module sends the
    createRoom body); a server admin, whose rooms Synapse never gates, is reported instead."""
    reply = await command(stack, management_room, "!policy dlp encryption forbid")
    assert "forbidden globally" in reply
    encryption = [{"type": "m.room.encryption", "state_key": "", "content": MEGOLM}]
    try:
        user = stack.new_user("cryptofan")
        async with stack.client(user) as u:
            with pytest.raises(MatrixError) as exc:
                await u.create_room(name="secret plans", initial_state=encryption)
            assert exc.value.status == 403 and exc.value.errcode == "M_FORBIDDEN"
            assert "Create the room without encryption" in exc.value.error
        async with stack.client(stack.admin) as a:
            room = await a.create_room(name="admin plans", initial_state=encryption)
        body = await management_notice(
            stack, management_room, "turned on end-to-end encryption", room
        )
        assert stack.admin.user_id in body and "cannot be turned off" in body
    finally:
        reply = await command(stack, management_room, "!policy dlp encryption inherit")
        assert "wider scope decides" in reply


async def test_warn_replies_to_the_sender_in_a_thread(stack: Stack, management_room: str) -> None:
    reply = await command(stack, management_room, "!policy dlp add-keyword grouper --action warn")
    assert "keyword added (warn)" in reply
    user: User = stack.new_user("chef")
    async with stack.client(user) as u:
        room = await managed_room(stack, u, name="kitchen")
        sent = await u.send_text(room, "grouper special tonight")  # warn: the message stays

        async def warning() -> dict[str, Any] | None:
            for e in await u.messages(room, limit=50):
                rel = e.get("content", {}).get("m.relates_to", {})
                if (
                    e.get("sender") == stack.bot
                    and rel.get("rel_type") == "m.thread"
                    and rel.get("event_id") == sent
                ):
                    return e
            return None

        event = await wait_for(warning, timeout=30, message="the warning in a thread")
        body = event["content"]["body"]
        assert "keyword:admin-warn" in body and user.user_id in body
        assert event["content"].get("m.mentions", {}).get("user_ids") == [user.user_id]
        assert "body" in (await u.get_event(room, sent))["content"]
