"""Schema 3 → 4: the compliance console's tables (created by the schema), the per-day
counters of record kinds filled from the records' plain columns (no decryption), and the
indexes of its newest-first pages (room, sender, type, kind or kind and room, then seq; the
sender, type and kind/ts indexes are replaced by these, which serve their lookups too).

DLP findings per rule and gate refusals are inside the ciphertext: they are counted from
the upgrade on, not for the records before it.
"""

from __future__ import annotations

from collections.abc import Mapping

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from bridge.store.console import DAY_MS
from bridge.store.migrations import MigrationContext

VERSION = 4
_BACKFILL = (
    "INSERT INTO console_daily (day, metric, label, n) "  # noqa: S608 - constants only
    f"SELECT ts / {DAY_MS}, kind, '', COUNT(*) FROM records GROUP BY ts / {DAY_MS}, kind"
)
RETIRES: tuple[str, ...] = ()


async def upgrade(ctx: MigrationContext, conn: AsyncConnection, retired: Mapping[str, str]) -> None:
    """Count the existing records per archive day and kind; index for the console."""
    await conn.execute(text("DROP INDEX IF EXISTS ix_records_sender"))
    await conn.execute(text("DROP INDEX IF EXISTS ix_records_type"))
    await conn.execute(text("DROP INDEX IF EXISTS ix_records_kind_ts"))
    for name, cols in (
        ("ix_records_sender_seq", "sender_idx, seq"),
        ("ix_records_type_seq", "type_idx, seq"),
        ("ix_records_room_seq", "room_idx, seq"),
        ("ix_records_kind_seq", "kind, seq"),
        ("ix_records_kind_room_seq", "kind, room_idx, seq"),
    ):
        await conn.execute(text(f"CREATE INDEX IF NOT EXISTS {name} ON records ({cols})"))
    await conn.execute(text("DELETE FROM console_daily"))
    await conn.execute(text(_BACKFILL))
