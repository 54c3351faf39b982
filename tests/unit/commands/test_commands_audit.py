"""``hold`` and ``audit`` commands, called alone on a real store (SQLite and PostgreSQL)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from bridge.audit import tail
from bridge.audit.kinds import AuditKind
from bridge.commands import audit
from bridge.commands.errors import CommandError
from bridge.commands.roles import Role
from bridge.store import AuditEntry, Store
from tests.kit.services import CommandFake
from tests.unit.commands.conftest import AUDITOR, MGMT, ROOM, make_config

OTHER = "!other:corp.example"


@pytest.fixture
def services(store: Store, tmp_path: Path) -> CommandFake:
    return CommandFake(store, make_config(tmp_path), MGMT)


def event(n: int, room: str = ROOM, etype: str = "m.room.message") -> dict[str, object]:
    return {
        "event_id": f"$e{n}",
        "room_id": room,
        "sender": "@joe:corp.example",
        "type": etype,
        "origin_server_ts": 1_700_000_000_000 + n,
        "content": {"body": f"message {n}"},
    }


def command(name: str, room: str = MGMT) -> AuditEntry:
    return AuditEntry(AuditKind.COMMAND, {"command": name}, room_id=room, sender=AUDITOR, type=name)


async def search(services: CommandFake, **flags: str) -> list[str]:
    ctx = services.context(sender=AUDITOR, role=Role.AUDITOR, flags=flags)
    return (await audit.audit_search(ctx)).text.split("\n")


def groups(lines: Sequence[str]) -> list[str]:
    """The group lines of a search reply, without their times."""
    out = []
    for line in lines[1:]:
        if line.startswith("• latest"):
            break
        out.append(line.split(" (latest ")[0])
    return out


async def test_search_by_type_finds_retroactive_records(services: CommandFake) -> None:
    """`--type retroactive` filters on the kind (it used to search event types and find
    nothing, because the kind was missing from the list of kinds)."""
    await services.store.records.append(
        [
            AuditEntry(
                AuditKind.RETROACTIVE,
                {"change": "keyword", "matched": 2},
                room_id=ROOM,
                sender="@boss:corp.example",
                type="dlp",
            )
        ]
    )
    lines = await search(services, type="retroactive")
    assert lines[0] == "1 archive records match --type retroactive"
    assert groups(lines) == [f"• 1 x retroactive in {ROOM}"]


async def test_search_groups_commands_by_room_with_a_count(services: CommandFake) -> None:
    """Command records of different names count as one group per room (they used to show
    as one line per name, each reading "1 x command in !room")."""
    await services.store.records.append(
        [command("status"), command("dlp list"), command("hold list"), command("status", OTHER)]
    )
    lines = await search(services, type="command")
    assert lines[0] == "4 archive records match --type command"
    assert groups(lines) == [f"• 3 x command in {MGMT}", f"• 1 x command in {OTHER}"]


async def test_search_shows_the_event_type_of_events_and_decisions(services: CommandFake) -> None:
    await services.store.queue.ingest(
        "t1", [event(1), event(2), event(3, etype="m.reaction"), event(4, room=OTHER)]
    )
    await services.store.records.append(
        [
            AuditEntry(AuditKind.DECISION, {"n": 1}, room_id=ROOM, type="m.room.message"),
            AuditEntry(AuditKind.DECISION, {"n": 2}, room_id=ROOM, type="m.reaction"),
        ]
    )
    assert sorted(groups(await search(services, room=ROOM))) == sorted(
        [
            f"• 2 x m.room.message in {ROOM}",
            f"• 1 x m.reaction in {ROOM}",
            f"• 1 x decision (m.room.message) in {ROOM}",
            f"• 1 x decision (m.reaction) in {ROOM}",
        ]
    )
    lines = await search(services, type="m.room.message")  # events and their decisions
    assert lines[0] == "4 archive records match --type m.room.message"
    lines = await search(services, type="event")
    assert lines[0] == "4 archive records match --type event"


async def test_search_with_nothing_found_or_a_bad_time(services: CommandFake) -> None:
    assert await search(services, type="export") == ["No archive records match --type export."]
    with pytest.raises(CommandError, match="--since: 'x' is not an ISO date/time"):
        await search(services, since="x")


async def test_holds_on_off_and_list(services: CommandFake) -> None:
    services.client.aliases["#legal:corp.example"] = OTHER
    on = services.context(room_id=ROOM, flags={"reason": "case 7"})
    assert (await audit.hold_on(on)).text.startswith(f"🔒 room {ROOM} is on legal hold")
    assert on.audit == {"hold": {"scope": "room", "target": ROOM, "result": "on"}}
    again = await audit.hold_on(services.context(args={"target": ROOM}))
    assert again.text == f"Room {ROOM} is already on legal hold."
    alias = await audit.hold_on(services.context(args={"target": "#legal:corp.example"}))
    assert OTHER in alias.text
    user = await audit.hold_on(services.context(args={"target": "@joe:corp.example"}))
    assert user.text.startswith("🔒 user @joe:corp.example is on legal hold")

    listed = await audit.hold_list(services.context(role=Role.AUDITOR))
    assert listed.text.startswith("Legal holds: 3")
    assert f"room {ROOM}: since " in listed.text and ": case 7" in listed.text

    off = await audit.hold_off(services.context(args={"target": ROOM}))
    assert off.text == f"🔓 legal hold on room {ROOM} lifted."
    assert (await audit.hold_off(services.context(args={"target": ROOM}))).text == (
        f"Room {ROOM} is not on legal hold."
    )


async def test_hold_targets_that_cannot_be_used(services: CommandFake) -> None:
    with pytest.raises(CommandError, match=r"cannot resolve #nowhere:corp\.example"):
        await audit.hold_on(services.context(args={"target": "#nowhere:corp.example"}))
    with pytest.raises(CommandError, match="is neither a room"):
        await audit.hold_on(services.context(args={"target": "nonsense"}))


async def test_verify_reports_an_intact_archive(services: CommandFake) -> None:
    await services.store.queue.ingest("t1", [event(1), event(2)])
    ctx = services.context(role=Role.AUDITOR)
    reply = await audit.audit_verify(ctx)
    assert reply.text.startswith("✅ Audit archive intact\n• 2 records verified")
    assert ctx.audit["ok"] is True and ctx.audit["records"] == 2


async def test_verify_reports_the_unsigned_tail_and_warns_when_it_is_too_old(
    services: CommandFake, monkeypatch: pytest.MonkeyPatch
) -> None:

    await services.store.queue.ingest("t1", [event(1), event(2)])  # no checkpoint yet
    since = services.store.records.unsigned_since
    assert since is not None
    monkeypatch.setattr(tail, "now_ms", lambda: since + 3_000)
    ctx = services.context(role=Role.AUDITOR)
    reply = await audit.audit_verify(ctx)
    assert reply.text.startswith("✅ Audit archive intact")
    assert "signed head: no signed checkpoint; unsigned tail: 2 records, the oldest" in reply.text
    assert ctx.audit["unsigned_records"] == 2 and ctx.audit["signed_seq"] == 0
    limit = services.config.audit.checkpoint_interval_s + tail.TAIL_MARGIN_S  # type: ignore[union-attr]
    monkeypatch.setattr(tail, "now_ms", lambda: since + int(limit * 1000) + 1_000)
    ctx = services.context(role=Role.AUDITOR)
    reply = await audit.audit_verify(ctx)
    assert reply.text.startswith("⚠️ Audit archive intact, but its newest records are not signed")
    assert "records 1..2 have been unsigned for" in reply.text
    assert ctx.audit["ok"] is True and ctx.audit["stale_tail"] is True
    await services.store.records.checkpoint()
    reply = await audit.audit_verify(services.context(role=Role.AUDITOR))
    assert reply.text.startswith("✅") and "every record is signed" in reply.text
