"""Handlers called alone: a config, a SQLite store and the CommandFake services."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bridge.config import Config
from bridge.store import Store
from tests.kit import config as kit
from tests.kit.services import CommandFake

MGMT = "!mgmt:corp.example"
ROOM = "!room:corp.example"
ADMIN = "@boss:corp.example"
AUDITOR = "@eve:corp.example"


def make_config(tmp_path: Path, **sections: Any) -> Config:
    """A valid config for corp.example with an admin and an auditor, plus ``sections``."""
    return kit.make_config(
        {
            "homeserver": {"domain": "corp.example"},
            "bridge": {"permissions": {ADMIN: "admin", AUDITOR: "auditor"}},
            **sections,
        },
        base_dir=tmp_path,
    )


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[Store]:
    """A fresh SQLite store (for handlers whose store use is incidental)."""
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'bridge.db'}")
    yield store
    await store.close()


@pytest.fixture
async def fake(sqlite_store: Store, tmp_path: Path) -> CommandFake:
    """CommandFake with the management room and one other joined room."""
    for room in (MGMT, ROOM):
        await sqlite_store.rooms.upsert(room, joined=True)
    return CommandFake(sqlite_store, make_config(tmp_path), MGMT)
