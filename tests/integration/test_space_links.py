"""Space links through real Synapse and the real gate: a room cannot put itself in a lax space,
nor take itself out of a strict one."""

from __future__ import annotations

import pytest
from conftest import Stack
from matrix_client import MatrixError, MatrixTestClient, wait_for
from test_dlp_scopes import command, managed_room

pytestmark = pytest.mark.integration

CARD = "4111 1111 1111 1111"


async def refused(client: MatrixTestClient, room: str, body: str) -> MatrixError | None:
    """The gate's refusal of ``body`` in ``room``, or None when it went through."""
    try:
        await client.send_text(room, body)
    except MatrixError as e:
        return e
    return None


async def list_in_space(stack: Stack, admin: MatrixTestClient, space: str, room: str) -> None:
    await admin.send_state(space, "m.space.child", room, {"via": [stack.dev.server_name]})


async def settled(
    stack: Stack, admin: MatrixTestClient, space: str, body: str, *, passes: bool
) -> None:
    """Wait until the bridge has processed everything sent so far: a room the space's admin
    lists now shows the space's rule at the gate (events are processed in order)."""
    probe = await admin.create_room(name="probe")
    await list_in_space(stack, admin, space, probe)

    async def in_force() -> bool:
        return (await refused(admin, probe, body) is None) == passes

    await wait_for(in_force, timeout=30, message="the space rule in a listed room")


async def test_a_room_cannot_name_a_lax_space_as_its_parent(
    stack: Stack, management_room: str
) -> None:
    assert "enabled" in await command(stack, management_room, "!policy dlp detectors enable card")
    mallory = stack.new_user("mallory")
    async with stack.client(stack.admin) as admin, stack.client(mallory) as m:
        space = await managed_room(
            stack, admin, name="card lab", creation_content={"type": "m.space"}
        )
        reply = await command(stack, space, "!policy dlp detectors disable card --scope here")
        assert "disabled" in reply
        # The space's own rooms get its lax rule: a card goes through there ...
        await settled(stack, admin, space, f"card {CARD}", passes=True)
        # ... but a room that only names the space itself does not.
        own = await m.create_room(name="mallory's den")
        await m.send_state(own, "m.space.parent", space, {"via": [stack.dev.server_name]})
        await settled(stack, admin, space, f"card {CARD}", passes=True)
        err = await refused(m, own, f"my card is {CARD}")
        assert err is not None and err.errcode == "M_FORBIDDEN" and "detector:card" in err.error


async def test_a_room_cannot_leave_a_strict_space_that_lists_it(
    stack: Stack, management_room: str
) -> None:
    owner = stack.new_user("roomowner")
    async with stack.client(stack.admin) as admin, stack.client(owner) as o:
        space = await managed_room(stack, admin, name="vault", creation_content={"type": "m.space"})
        reply = await command(stack, space, "!policy dlp add-keyword barracuda --scope here")
        assert f"in {space}" in reply
        room = await o.create_room(name="owner's room")
        await o.send_text(room, "barracuda for dinner")  # not in the space yet: allowed
        await list_in_space(stack, admin, space, room)

        async def strict() -> MatrixError | None:
            return await refused(o, room, "barracuda report")

        err = await wait_for(strict, timeout=30, message="the space's keyword in the room")
        assert err.errcode == "M_FORBIDDEN" and "keyword:admin-block" in err.error
        # The owner withdraws the room's side: nothing the space made is dropped.
        await o.send_state(room, "m.space.parent", space, {})
        await settled(stack, admin, space, "barracuda", passes=False)
        err = await refused(o, room, "barracuda report")
        assert err is not None and "keyword:admin-block" in err.error
