"""Federation limits with a real Synapse: room ACLs, drift repair, gate refusals."""

from __future__ import annotations

import pytest
from conftest import Stack
from helpers import bot_replies
from matrix_client import MatrixError, MatrixTestClient, wait_for

pytestmark = pytest.mark.integration


async def command(stack: Stack, room: str, text: str) -> str:
    async with stack.client(stack.admin) as admin:
        cmd = await admin.send_text(room, text)
        [reply] = await bot_replies(admin, room, stack.bot, cmd, timeout=30)
        return str(reply["content"]["body"])


async def managed_room(
    stack: Stack,
    client: MatrixTestClient,
    name: str,
    power: int = 100,
    also: dict[str, int] | None = None,
) -> str:
    """A room with the bot (at ``power``) and, invited with their power, the users ``also``."""
    users = {stack.bot: power, **(also or {})}
    room = await client.create_room(
        name=name, invite=list(users), power_level_content_override={"users": users}
    )

    async def joined() -> bool:
        return stack.bot in await client.joined_members(room)

    await wait_for(joined, timeout=20, message="the bot to join")
    return room


async def wait_acl(client: MatrixTestClient, room: str, expected: dict) -> None:
    async def matches() -> bool:
        acl = await client.get_state(room, "m.room.server_acl")
        return (
            bool(acl)
            and {k: sorted(v) if isinstance(v, list) else v for k, v in acl.items()} == expected
        )

    await wait_for(matches, timeout=30, interval=0.3, message=f"ACL {expected}")


async def test_allowlist_sets_acl_restores_drift_and_refuses_invites(
    stack: Stack, management_room: str
) -> None:
    owner = stack.new_user("fedowner")
    async with stack.client(owner) as o:
        existing = await managed_room(stack, o, "existing room")
        weak = await managed_room(stack, o, "bot without power", power=0)
        reply = await command(stack, management_room, "!policy federation allow partner.example")
        assert "federation allow partner.example" in reply
        expected = {
            "allow": ["localhost", "partner.example"],
            "deny": [],
            "allow_ip_literals": False,
        }
        await wait_acl(o, existing, expected)

        # A room the bot joins later gets the ACL at once.
        fresh = await managed_room(stack, o, "new room", also={stack.admin.user_id: 100})
        await wait_acl(o, fresh, expected)

        # A member's ACL that departs from the policy is refused by the gate
        # (user_may_send_state_event; Synapse passes on the code only).
        loose = {"allow": ["*"], "deny": [], "allow_ip_literals": False}
        with pytest.raises(MatrixError) as exc:
            await o.send_state(fresh, "m.room.server_acl", "", loose)
        assert exc.value.errcode == "M_FORBIDDEN"
        # A server admin, whose state events Synapse never gates, changes it anyway: the
        # bridge puts it back and tells the admins.
        async with stack.client(stack.admin) as admin:
            await admin.join(fresh)
            await admin.send_state(fresh, "m.room.server_acl", "", loose)
        await wait_acl(o, fresh, expected)

        # The gate refuses invites to servers outside the policy, with the policy's reason.
        with pytest.raises(MatrixError) as exc:
            await o.invite(existing, "@x:evil.example")
        assert exc.value.errcode == "M_FORBIDDEN"
        assert "evil.example is not allowed by company policy" in exc.value.error

        # The room where the bot has no power is reported as such.
        async def weak_reported() -> bool:
            text = await command(stack, management_room, "!policy rooms")
            return any(weak in line and "lacks power" in line for line in text.splitlines())

        await wait_for(
            weak_reported, timeout=30, interval=1, message="lacks power in !policy rooms"
        )
        # The filter lists only such rooms.
        lacking = await command(stack, management_room, "!policy rooms lacking")
        assert weak in lacking and existing not in lacking and fresh not in lacking
        show = await command(stack, management_room, "!policy federation show")
        assert "mode: allowlist" in show and "partner.example" in show

    async with stack.client(stack.admin) as admin:
        events = await admin.messages(management_room, limit=100)
        bodies = [e.get("content", {}).get("body", "") for e in events]
        assert any("changed m.room.server_acl" in b and fresh in b for b in bodies)

        # Unasked, the bridge tells the management room what it lacks in the weak room:
        # once, in a batched notice (sent within the report delay, 30 s by default).
        def lack_notices(events: list[dict]) -> list[str]:
            return [
                line
                for e in events
                if e.get("sender") == stack.bot
                for line in str(e.get("content", {}).get("body", "")).splitlines()
                # "• ROOM: power level …" (the replies of !policy rooms say "lacks power: …")
                if line.startswith(f"• {weak}: power level") and "m.room.server_acl" in line
            ]

        async def weak_notice() -> list[str] | None:
            return lack_notices(await admin.messages(management_room, limit=200)) or None

        await wait_for(weak_notice, timeout=60, interval=2, message="a notice about the weak room")
        assert len(lack_notices(await admin.messages(management_room, limit=200))) == 1

    # Back to open for the other tests.
    assert "open" in await command(stack, management_room, "!policy federation mode open")
