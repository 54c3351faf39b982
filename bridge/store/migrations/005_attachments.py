"""Schema 4 → 5: the attachment tables (in-room media checks, the extraction cache).

Both are new and start empty: ``create_all`` makes them; nothing to carry over.
"""

from __future__ import annotations

from collections.abc import Mapping

from sqlalchemy.ext.asyncio import AsyncConnection

from bridge.store.migrations import MigrationContext

VERSION = 5
RETIRES: tuple[str, ...] = ()


async def upgrade(ctx: MigrationContext, conn: AsyncConnection, retired: Mapping[str, str]) -> None:
    """Nothing to move: the new tables were created with the schema."""
    del ctx, conn, retired
