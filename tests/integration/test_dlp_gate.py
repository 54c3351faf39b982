"""DLP through the real Synapse send path, with the real synapse-http-antispam module."""

from __future__ import annotations

import pytest
from conftest import Stack
from helpers import bot_replies
from matrix_client import MatrixError, MatrixTestClient, wait_for

pytestmark = pytest.mark.integration

CARD = "4111 1111 1111 1111"
NOT_A_CARD = "4111 1111 1111 1112"  # fails the Luhn check


async def command(stack: Stack, room: str, text: str) -> str:
    async with stack.client(stack.admin) as admin:
        cmd = await admin.send_text(room, text)
        [reply] = await bot_replies(admin, room, stack.bot, cmd)
        return str(reply["content"]["body"])


async def refused(client: MatrixTestClient, room: str, body: str, **kw: object) -> MatrixError:
    with pytest.raises(MatrixError) as exc:
        await client.send_text(room, body, **kw)  # type: ignore[arg-type]
    return exc.value


async def test_card_numbers_never_reach_the_room(stack: Stack, management_room: str) -> None:
    assert "enabled" in await command(stack, management_room, "!policy dlp detectors enable card")
    user = stack.new_user("cardholder")
    async with stack.client(user) as alice:
        room = await alice.create_room(name="payments")
        err = await refused(alice, room, f"my card is {CARD} thanks")
        assert err.status == 403 and err.errcode == "M_FORBIDDEN"
        assert "detector:card" in err.error
        assert "1111 1111 1111" not in err.error  # never the secret itself
        ok = await alice.send_text(room, f"order number {NOT_A_CARD}")
        history = await alice.messages(room, limit=50)
        bodies = [e.get("content", {}).get("body", "") for e in history]
        assert not any(CARD in b for b in bodies)
        assert any(e["event_id"] == ok for e in history)
    # The exempt compliance user may send it.
    compliance = stack.new_user("compliance")
    async with stack.client(compliance) as c:
        room = await c.create_room(name="compliance desk")
        await c.send_text(room, f"test card {CARD}")


async def test_cards_as_numbers_keys_and_after_an_override_are_refused(
    stack: Stack, management_room: str
) -> None:
    """Found in review: a card as a JSON integer or as a content key, a card typed after
    U+202E (shown reversed, copied as typed) and a card as a spoiler's reason (shown by
    Element) went through Synapse's send path."""
    assert "enabled" in await command(stack, management_room, "!policy dlp detectors enable card")
    user = stack.new_user("cardleaker")
    async with stack.client(user) as alice:
        room = await alice.create_room(name="payments 2")
        digits = int(CARD.replace(" ", ""))  # below 2**53: legal canonical JSON
        for content in (
            {"msgtype": "m.text", "body": "see data", "n": digits},
            {"msgtype": "m.text", "body": "see data", "x": {CARD: True}},
            {"msgtype": "m.text", "body": f"\u202e{CARD}"},
            {
                "msgtype": "m.text",
                "body": "spoiler",
                "format": "org.matrix.custom.html",
                "formatted_body": f'<span data-mx-spoiler="{CARD}">spoiler</span>',
            },
        ):
            with pytest.raises(MatrixError) as exc:
                await alice.send_event(room, "m.room.message", content)
            assert exc.value.status == 403 and "detector:card" in exc.value.error
        # Sizes and millisecond timestamps stay numbers nobody reads.
        await alice.send_event(
            room, "m.room.message", {"msgtype": "m.text", "body": "ok", "ts": 1733364000006}
        )


async def test_obfuscated_keywords_edits_and_html_are_caught(
    stack: Stack, management_room: str
) -> None:
    reply = await command(stack, management_room, '!policy dlp add-keyword "project nightingale"')
    assert "keyword added" in reply
    user = stack.new_user("leaker")
    async with stack.client(user) as bob:
        room = await bob.create_room(name="chatter")
        for body in (
            "the Project Nightingale launch",
            "project night\u200bingale",  # zero-width space
            "ｐｒｏｊｅｃｔ ｎｉｇｈｔｉｎｇａｌｅ",  # full-width letters
            "project   nightingale",
        ):
            err = await refused(bob, room, body)
            assert err.errcode == "M_FORBIDDEN" and "keyword:" in err.error, body
        err = await refused(
            bob, room, "see below", formatted_body="<p>project <b>night</b>ingale</p>"
        )
        assert err.errcode == "M_FORBIDDEN"
        original = await bob.send_text(room, "the launch is on track")
        with pytest.raises(MatrixError) as exc:
            await bob.send_event(
                room,
                "m.room.message",
                {
                    "msgtype": "m.text",
                    "body": "* the launch of project nightingale",
                    "m.new_content": {"msgtype": "m.text", "body": "project nightingale"},
                    "m.relates_to": {"rel_type": "m.replace", "event_id": original},
                },
            )
        assert exc.value.errcode == "M_FORBIDDEN"
        await bob.send_text(room, "nightingales sing at night")  # whole words only


async def test_regexes_are_re2_and_refusals_explained(stack: Stack, management_room: str) -> None:
    reply = await command(stack, management_room, "!policy dlp add-regex fancy (a+)+$")
    assert "regex fancy" in reply
    reply = await command(stack, management_room, r"!policy dlp add-regex backref (a)\1")
    assert "refused by RE2" in reply
    reply = await command(stack, management_room, "!policy dlp list")
    assert "regex fancy" in reply and "backref" not in reply
    reply = await command(stack, management_room, "!policy dlp test aaaa")
    assert "regex:fancy" in reply and "would refuse" in reply
    user = stack.new_user("regexer")
    async with stack.client(user) as u:
        room = await u.create_room(name="regex room")
        err = await refused(u, room, "a" * 5000)
        assert "regex:fancy" in err.error
        await u.send_text(room, "a" * 5000 + "!")


async def test_redact_and_notify_act_after_the_fact(stack: Stack, management_room: str) -> None:
    await command(stack, management_room, "!policy dlp add-keyword bluefin --action redact")
    await command(stack, management_room, "!policy dlp add-keyword swordfish --action notify")
    user = stack.new_user("fisher")
    async with stack.client(user) as u:
        room = await u.create_room(
            name="fish",
            invite=[stack.bot],
            power_level_content_override={"users": {stack.bot: 50}},
        )

        async def bot_in() -> bool:
            return stack.bot in await u.joined_members(room)

        await wait_for(bot_in, timeout=20, message="bot joined")
        gone = await u.send_text(room, "bluefin tuna for lunch")
        await u.send_text(room, "swordfish is on the menu")

        async def redacted() -> bool:
            event = await u.get_event(room, gone)
            return "body" not in event.get("content", {})

        await wait_for(redacted, timeout=30, message="the redaction")
    async with stack.client(stack.admin) as admin:

        async def notified() -> bool:
            events = await admin.messages(management_room, limit=50)
            return any(
                "keyword:admin-notify" in e.get("content", {}).get("body", "")
                and user.user_id in e["content"]["body"]
                for e in events
            )

        await wait_for(notified, timeout=30, message="the management-room notice")


async def test_block_and_notify_reaches_the_management_room(
    stack: Stack, management_room: str
) -> None:
    await command(stack, management_room, "!policy dlp add-keyword kingfisher --action notify")
    await command(stack, management_room, "!policy dlp add-keyword kingfisher --action block")
    user = stack.new_user("birdwatcher")
    async with stack.client(user) as u:
        room = await u.create_room(name="birds")
        err = await refused(u, room, "a kingfisher on the river")
        assert err.errcode == "M_FORBIDDEN"
    async with stack.client(stack.admin) as admin:

        async def notified() -> bool:
            events = await admin.messages(management_room, limit=50)
            return any(
                "blocked a message from" in e.get("content", {}).get("body", "")
                and user.user_id in e["content"]["body"]
                for e in events
            )

        await wait_for(notified, timeout=30, message="the notice about the refused message")
