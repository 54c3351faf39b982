"""The federation, retention and rooms commands, called alone: staged documents and
rollouts, confirmations, the rooms listing."""

from __future__ import annotations

import pytest

from bridge.commands import rooms
from bridge.commands.errors import CommandError, NeedsConfirmation
from bridge.commands.roles import Role
from bridge.policy.rooms import DRIFTED
from tests.kit.services import CommandFake, Removed
from tests.unit.commands.conftest import MGMT, ROOM

DAY = 86_400_000


async def test_retention_set_stages_the_document_and_a_rollout(fake: CommandFake) -> None:
    ctx = fake.context(args={"duration": "30d"})
    reply = await rooms.ret_set(ctx)
    assert reply.text == (
        "✅ messages older than 30d will be removed globally. Recorded; applying it to 1 room."
    )
    # the management room is never rolled out to
    assert fake.rooms.staged == [([ROOM], "retention set to 30d")]
    assert set(ctx.state_updates) == {"policy.retention", "rollout"}
    assert [a.room_id for a in ctx.actions] == [ROOM]
    assert fake.expiring_asked == [("global", 30 * DAY)]
    assert fake.policy.engine.retention_for(ROOM).max_lifetime_ms is None
    fake.commit(ctx)
    assert fake.policy.engine.retention_for(ROOM).max_lifetime_ms == 30 * DAY
    assert fake.rooms.started == ["retention set to 30d"]


NO_RETENTION = "power level 50 to send m.room.retention (the bot has 0)"
NO_ACL = "power level 50 to send m.room.server_acl (the bot has 0)"


async def test_retention_set_where_the_bot_lacks_power_says_so_with_why_and_fix(
    fake: CommandFake,
) -> None:
    fake.rooms.lacks[(ROOM, "m.room.retention")] = NO_RETENTION
    fake.rooms.lacks[(ROOM, "m.room.server_acl")] = NO_ACL  # not what this change sends
    ctx = fake.context(room_id=ROOM, args={"duration": "30d"}, flags={"scope": "here"})
    reply = await rooms.ret_set(ctx)
    assert reply.text.splitlines() == [
        f"⚠️ messages older than 30d will be removed in {ROOM}. Recorded, but the bot cannot "
        "apply it in the 1 room it reaches:",
        "• lacks power level 50 to send m.room.retention: 1 room",
        "`!policy rooms lacking` lists them. To fix it, a room creator raises the bot's power "
        "level to the level named, or set homeserver.admin_token with bridge.obtain_power: "
        "true so the bot obtains it itself.",
    ]
    assert not reply.text.startswith("✅")
    assert fake.rooms.staged == [([ROOM], "retention set to 30d")]  # still recorded


async def test_federation_change_names_the_rooms_lacking_power_for_the_acl(
    fake: CommandFake,
) -> None:
    fake.rooms.lacks[(ROOM, "m.room.server_acl")] = NO_ACL
    ctx = fake.context(args={"server": "evil.example"})
    reply = await rooms.fed_deny(ctx)
    assert reply.text.startswith(
        "⚠️ federation deny evil.example globally. Recorded, but the bot cannot apply it in "
        "the 1 room it reaches:\n• lacks power level 50 to send m.room.server_acl: 1 room\n"
    )
    # A lack of power for retention does not matter to a federation change.
    del fake.rooms.lacks[(ROOM, "m.room.server_acl")]
    fake.rooms.lacks[(ROOM, "m.room.retention")] = NO_RETENTION
    reply = await rooms.fed_mode(fake.context(args={"mode": "open"}))
    assert reply.text == "✅ federation mode set to open globally. Recorded; applying it to 1 room."


async def test_retention_that_deletes_messages_needs_confirmation(fake: CommandFake) -> None:
    fake.expiring = (12, 3)
    ctx = fake.context(args={"duration": "1d"})
    with pytest.raises(NeedsConfirmation, match=r"would delete 12 existing message\(s\) in 3"):
        await rooms.ret_set(ctx)
    assert ctx.state_updates == {} and fake.rooms.staged == []
    confirmed = fake.context(args={"duration": "1d"}, flags={"yes": True})
    await rooms.ret_set(confirmed)
    assert fake.expiring_asked == [("global", DAY)]  # --yes does not ask again
    assert fake.rooms.staged


async def test_retention_bad_duration_and_off(fake: CommandFake) -> None:
    with pytest.raises(CommandError):
        await rooms.ret_set(fake.context(args={"duration": "soon"}))
    ctx = fake.context(room_id=ROOM, flags={"scope": "here"})
    assert (await rooms.ret_off(ctx)).text == (
        f"✅ retention off in {ROOM}. Recorded; applying it to 1 room."
    )
    shown = await rooms.ret_show(fake.context(role=Role.AUDITOR))
    assert shown.text.startswith("Retention globally: ")


async def test_federation_allow_switches_to_an_allowlist_and_confirms_removals(
    fake: CommandFake,
) -> None:
    fake.rooms.removed = Removed({ROOM: ("@guest:other.example",)})
    ctx = fake.context(args={"server": "Partner.Example"})
    with pytest.raises(NeedsConfirmation, match=r"remove 1 member\(s\) from !room"):
        await rooms.fed_allow(ctx)
    ctx = fake.context(args={"server": "Partner.Example"}, flags={"yes": True})
    reply = await rooms.fed_allow(ctx)
    assert reply.text == (
        "✅ federation allow partner.example globally. Recorded; applying it to 1 room."
    )
    fake.commit(ctx)
    policy = fake.policy.engine.federation_for(ROOM)
    assert (policy.mode.value, list(policy.servers)) == ("allowlist", ["partner.example"])

    removed = fake.context(args={"server": "partner.example"}, flags={"yes": True})
    await rooms.fed_remove(removed)
    fake.commit(removed)
    assert list(fake.policy.engine.federation_for(ROOM).servers) == []
    with pytest.raises(CommandError, match=r"evil\.example is not in the list"):
        await rooms.fed_remove(fake.context(args={"server": "evil.example"}))


async def test_federation_mode_and_show(fake: CommandFake) -> None:
    ctx = fake.context(args={"mode": "internal"}, flags={"yes": True})
    await rooms.fed_mode(ctx)
    fake.commit(ctx)
    shown = await rooms.fed_show(fake.context(role=Role.AUDITOR))
    assert shown.text.startswith("Federation policy globally\n• mode: internal")


async def test_rooms_lists_states_filters_and_pages(fake: CommandFake) -> None:
    store = fake.store
    await store.rooms.upsert("!drift:corp.example", joined=True, lacking=DRIFTED)
    await store.rooms.upsert("!weak:corp.example", joined=True, lacking="power level 50")
    await store.rooms.upsert("!gone:corp.example", joined=False)
    for i in range(rooms.ROOMS_PAGE):
        await store.rooms.upsert(f"!r{i:03}:corp.example", joined=True)
    reply = await rooms.rooms_cmd(fake.context(role=Role.AUDITOR))
    assert reply.text.startswith(
        f"{rooms.ROOMS_PAGE + 4} room(s) besides the management room: "
        f"{rooms.ROOMS_PAGE + 1} enforced, 1 drifted, "
        "1 lack power, 1 not joined. Page 1 of 2 (next: !policy rooms all --page 2)"
    )
    assert MGMT not in reply.text
    drifted = await rooms.rooms_cmd(fake.context(args={"state": "drifted"}))
    assert drifted.text.endswith("1 drifted\n• !drift:corp.example: drifted")
    with pytest.raises(CommandError, match="there are 2 page"):
        await rooms.rooms_cmd(fake.context(flags={"page": "3"}))
    with pytest.raises(CommandError, match="--page must be a whole number"):
        await rooms.rooms_cmd(fake.context(flags={"page": "0"}))
