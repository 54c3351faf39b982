"""Integration fixtures: one real Synapse + bridge stack per test session.

Synapse runs with the appservice registration the bridge generated and the real
synapse-http-antispam module pointed at the bridge's gate. The bridge runs as a child
process (``python -m bridge run``), exactly as in production.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from matrix_client import MatrixTestClient, wait_for
from synapse_fixtures import require_synapse

from bridge.dev.devstack import BridgeProcess, DevStack, prepare_stack


@dataclass
class User:
    user_id: str
    token: str


@dataclass
class Stack:
    dev: DevStack
    bridge: BridgeProcess
    admin: User
    auditor: User
    stranger: User

    @property
    def hs_url(self) -> str:
        return self.dev.synapse.url

    @property
    def bot(self) -> str:
        return f"@policybot:{self.dev.server_name}"

    def client(self, user: User) -> MatrixTestClient:
        return MatrixTestClient(self.hs_url, user.user_id, user.token)

    def new_user(self, localpart: str) -> User:
        return User(*self.dev.synapse.register_user(localpart))

    @property
    def db_path(self) -> Path:
        return self.dev.workdir / "data" / "bridge.db"


def running_stack(
    workdir: Path, bridge_options: dict[str, Any], database_url: str = ""
) -> Iterator[Stack]:
    """Synapse + the bridge in ``workdir``, with an admin, an auditor and a user without a
    role; stopped when the generator is closed (for fixtures to ``yield from``)."""
    require_synapse(antispam=True)
    dev = prepare_stack(
        workdir,
        permissions={"@admin:localhost": "admin", "@auditor:localhost": "auditor"},
        database_url=database_url,
        bridge_options=bridge_options,
    )
    dev.synapse.start()
    admin = User(*dev.synapse.register_user("admin", "admin-pw", admin=True))
    auditor = User(*dev.synapse.register_user("auditor", "auditor-pw"))
    stranger = User(*dev.synapse.register_user("stranger", "stranger-pw"))
    bridge = BridgeProcess(dev.config_path, workdir / "bridge.log", dev.bridge_port)
    try:
        bridge.start()
        yield Stack(dev, bridge, admin, auditor, stranger)
    finally:
        bridge.stop()
        dev.synapse.stop()


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A running Synapse + bridge (SQLite), shared by the integration tests."""
    yield from running_stack(
        tmp_path_factory.mktemp("stack"),
        {"dlp": {"exempt_users": ["@compliance:localhost"]}},
        os.environ.get("BRIDGE_TEST_STACK_DATABASE_URL", ""),
    )


async def accept_invites(client: MatrixTestClient, timeout: float = 15) -> list[str]:
    """Join every room the user is invited to (waits for at least one invite)."""

    async def invites() -> list[str] | None:
        sync = await client.request("GET", "/_matrix/client/v3/sync", params={"timeout": "0"})
        rooms = list(sync.get("rooms", {}).get("invite", {}))
        return rooms or None

    rooms = await wait_for(invites, timeout=timeout, message="an invite")
    for room in rooms:
        await client.join(room)
    return rooms


@pytest.fixture(scope="session")
async def management_room(stack: Stack) -> str:
    """The management room the bridge created, joined by the admin and the auditor."""

    async def leading() -> bool:  # on PostgreSQL the room is created after ready
        return "leader work started" in stack.bridge.log_path.read_text("utf-8", "replace")

    await wait_for(leading, timeout=30, message="the leader's start")
    async with stack.client(stack.admin) as admin:
        rooms = await accept_invites(admin)
    assert len(rooms) == 1, rooms
    room = rooms[0]
    async with stack.client(stack.admin) as admin:
        await admin.invite(room, stack.auditor.user_id)
    async with stack.client(stack.auditor) as auditor:
        await auditor.join(room)
    return room


@pytest.fixture
async def admin_client(stack: Stack) -> AsyncIterator[MatrixTestClient]:
    async with stack.client(stack.admin) as c:
        yield c
