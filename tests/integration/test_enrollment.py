"""Auto-enrolment through the Synapse admin API, on a stack of its own.

With ``homeserver.admin_token`` and ``bridge.auto_enroll`` the bridge manages every room on
the server: rooms that existed before it started (listed through the admin API) and rooms
created later (seen on the event stream). ``make_room_admin`` gets the bot invited and
powered, also in room version 12 where the creator outranks everyone.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from matrix_client import MatrixTestClient, wait_for
from synapse_fixtures import require_synapse

from bridge.dev.devstack import BridgeProcess, prepare_stack

pytestmark = pytest.mark.integration

BOT = "@policybot:localhost"


async def enrolled(client: MatrixTestClient, room: str, timeout: float = 45) -> int:
    """Wait until the bot is joined in ``room`` with power of at least 50; return it."""

    async def check() -> int | None:
        members = await client.joined_members(room)
        if BOT not in members:
            return None
        levels = await client.get_state(room, "m.room.power_levels") or {}
        level = int(levels.get("users", {}).get(BOT, levels.get("users_default", 0)))
        return level if level >= 50 else None

    return await wait_for(
        check, timeout=timeout, interval=0.25, message=f"{BOT} enrolled in {room}"
    )


async def test_rooms_before_and_after_start_are_enrolled(tmp_path: Path) -> None:
    require_synapse(antispam=True)
    # Rooms are made before the bridge runs: room creation must not wait for its gate
    # (the Synapse module's user_may_create_room fails closed by default).
    dev = prepare_stack(
        tmp_path / "stack",
        permissions={"@admin:localhost": "admin"},
        fail_open={"user_may_create_room": True},
    )
    bridge = BridgeProcess(dev.config_path, dev.workdir / "bridge.log", dev.bridge_port)
    try:
        await asyncio.to_thread(dev.synapse.start)
        _admin_id, admin_token = await asyncio.to_thread(
            dev.synapse.register_user, "admin", "admin-pw", True
        )
        alice_id, alice_token = await asyncio.to_thread(dev.synapse.register_user, "alice")
        dev.set_bridge_options("homeserver", {"admin_token": admin_token})
        dev.set_bridge_options("bridge", {"auto_enroll": True})
        config = dev.bridge_config()
        assert config["bridge"]["permissions"] == {"@admin:localhost": "admin"}

        async with MatrixTestClient(dev.synapse.url, alice_id, alice_token) as alice:
            # A private room (room version 12 by default: alice, its creator, outranks all).
            before = await alice.create_room(name="before the bridge", preset="private_chat")
            assert BOT not in await alice.joined_members(before)

            await asyncio.to_thread(bridge.start, timeout=90)
            assert await enrolled(alice, before) >= 50

            after = await alice.create_room(name="after the bridge", preset="private_chat")
            assert await enrolled(alice, after) >= 50
            # A public room: make_room_admin does not invite there, the bot joins itself.
            public = await alice.create_room(name="public", preset="public_chat")
            assert await enrolled(alice, public) >= 50

            # Enrolled rooms are managed: the bot answers there as a member would see it.
            assert BOT in await alice.joined_members(before)
        assert bridge.running, bridge.log_tail()
        # Enrolment went without refused actions (each would be a warning to the admins).
        log = (dev.workdir / "bridge.log").read_text("utf-8")
        assert "failed permanently" not in log, log
    finally:
        await asyncio.to_thread(bridge.stop)
        await asyncio.to_thread(dev.synapse.stop)


async def test_obtain_power_with_make_room_admin_to_enforce_acl(tmp_path: Path) -> None:
    """A room where the bot lacks power: with `bridge.obtain_power` the bridge gets it
    through the admin API and then sets the ACL the policy asks for."""
    require_synapse(antispam=True)
    dev = prepare_stack(
        tmp_path / "stack",
        permissions={"@admin:localhost": "admin"},
        bridge_options={"federation": {"mode": "internal"}},
    )
    bridge = BridgeProcess(dev.config_path, dev.workdir / "bridge.log", dev.bridge_port)
    try:
        await asyncio.to_thread(dev.synapse.start)
        _admin_id, admin_token = await asyncio.to_thread(
            dev.synapse.register_user, "admin", "admin-pw", True
        )
        bob_id, bob_token = await asyncio.to_thread(dev.synapse.register_user, "bob")
        dev.set_bridge_options("homeserver", {"admin_token": admin_token})
        dev.set_bridge_options("bridge", {"obtain_power": True})
        await asyncio.to_thread(bridge.start, timeout=90)
        async with MatrixTestClient(dev.synapse.url, bob_id, bob_token) as bob:
            room = await bob.create_room(name="bob's room", invite=[BOT])  # bot gets power 0

            async def acl() -> dict | None:
                return await bob.get_state(room, "m.room.server_acl")

            content = await wait_for(acl, timeout=60, interval=0.5, message="the ACL")
            assert content["allow"] == ["localhost"]
            assert content["allow_ip_literals"] is False
            levels = await bob.get_state(room, "m.room.power_levels") or {}
            assert int(levels.get("users", {}).get(BOT, 0)) >= 100
        log = (dev.workdir / "bridge.log").read_text("utf-8")
        assert "obtaining power in" in log
    finally:
        await asyncio.to_thread(bridge.stop)
        await asyncio.to_thread(dev.synapse.stop)
