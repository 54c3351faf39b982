"""`!policy rooms` with e2ee on: the encrypted events still undecryptable, per room."""

from __future__ import annotations

from pathlib import Path

from bridge.commands import rooms
from bridge.commands.roles import Role
from bridge.store import Store
from tests.kit.services import CommandFake
from tests.unit.commands.conftest import MGMT, make_config


async def test_rooms_lists_undecryptable_counts_per_room(
    sqlite_store: Store, tmp_path: Path
) -> None:
    fake = CommandFake(sqlite_store, make_config(tmp_path, e2ee={"enabled": True}), MGMT)
    reply = await rooms.rooms_cmd(fake.context(role=Role.AUDITOR))
    assert "🔒 no end-to-end encrypted events undecryptable" in reply.text
    fake.undecryptable = {"!a:corp.example": 2, "!b:corp.example": 5}
    reply = await rooms.rooms_cmd(fake.context(role=Role.AUDITOR))
    lines = reply.text.splitlines()
    start = next(i for i, line in enumerate(lines) if "7 end-to-end encrypted" in line)
    assert lines[start + 1 :] == [
        "• !b:corp.example: 5 undecryptable",
        "• !a:corp.example: 2 undecryptable",
    ]


async def test_rooms_says_nothing_of_encryption_with_e2ee_off(fake: CommandFake) -> None:
    fake.undecryptable = {"!a:corp.example": 2}
    reply = await rooms.rooms_cmd(fake.context(role=Role.AUDITOR))
    assert "undecryptable" not in reply.text
