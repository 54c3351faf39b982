"""Schema 1 → 2: the plaintext records encrypted and hash-chained, in seq order."""

from __future__ import annotations

import json
from collections.abc import Mapping

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from bridge.audit.codec import dumps
from bridge.store.database import log
from bridge.store.migrations import MigrationContext, drop_retired, old_rows
from bridge.store.models import Plain, StoreError
from bridge.store.schema import transactions

VERSION = 2
RETIRES = ("records",)


async def upgrade(ctx: MigrationContext, conn: AsyncConnection, retired: Mapping[str, str]) -> None:
    """Encrypt and chain the plaintext records of schema 1, in seq order.

    Seqs are renumbered 1, 2, 3 … when the old ones had gaps (the chain has none), and
    the work queue's seq ranges follow. Checkpoints: one, at the end.
    """
    old = retired.get("records")
    if old is None:
        return
    bounds: set[int] = set()
    for first, last in await conn.execute(
        select(transactions.c.first_seq, transactions.c.last_seq)
    ):
        bounds.update(x for x in (first, last) if x is not None)
    index = ctx.keys.index
    columns = "seq, ts, kind, event_id, room_id, sender, type, origin_ts, data"
    remap: dict[int, int] = {}
    count = 0
    async for rows in old_rows(conn, old, columns, "seq", -(1 << 62)):
        items = []
        for seq, ts, kind, event_id, room_id, sender, etype, origin, data in rows:
            raw = bytes(data)
            if kind == "event":
                plaintext = raw
            else:
                try:
                    inner = json.loads(raw)
                except ValueError:
                    raise StoreError(
                        f"schema 1 record seq {seq} ({kind}): its data is not JSON"
                    ) from None
                plaintext = dumps(
                    {"room_id": room_id, "sender": sender, "type": etype, "data": inner}
                )
            items.append(
                Plain(
                    str(kind),
                    index("event_id", event_id) if isinstance(event_id, str) else None,
                    room_id,
                    sender,
                    etype,
                    origin if isinstance(origin, int) else ts,
                    plaintext,
                    ts,
                )
            )
        first_new, _ = await ctx.records.append_records(conn, items, 0, checkpoints=False)
        ctx.records.adopt_tentative()
        for offset, row in enumerate(rows):
            if row[0] != first_new + offset and row[0] in bounds:
                remap[row[0]] = first_new + offset
        count += len(rows)
    for col in (transactions.c.first_seq, transactions.c.last_seq):
        for old_seq, new_seq in remap.items():
            await conn.execute(
                update(transactions).where(col == old_seq).values({col.name: new_seq})
            )
    await drop_retired(conn, old)
    if count:
        await ctx.records.sign_head(conn)
    log.warning("encrypted and chained %d plaintext records of schema 1", count)
