"""Schema 2 → 3: the operational tables (rooms, actions, state values) sealed."""

from __future__ import annotations

import json
from collections.abc import Mapping

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from bridge.store.migrations import MigrationContext, drop_retired, old_rows
from bridge.store.models import StoreError
from bridge.store.schema import actions, rooms

VERSION = 3
RETIRES = ("rooms", "actions")


async def upgrade(ctx: MigrationContext, conn: AsyncConnection, retired: Mapping[str, str]) -> None:
    """Seal the plaintext rooms, actions and state values of schemas 1 and 2."""
    dk = await ctx.keys.op_key_in(conn)
    old_rooms = retired.get("rooms")
    if old_rooms is not None:
        columns = "room_id, joined, lacking, updated_ts"
        async for rows in old_rows(conn, old_rooms, columns, "room_id", ""):
            await conn.execute(
                insert(rooms),
                [
                    ctx.rooms.values(dk, room_id, lacking or "")
                    | {"joined": bool(joined), "updated_ts": updated}
                    for room_id, joined, lacking, updated in rows
                ],
            )
        await drop_retired(conn, old_rooms)
    old_actions = retired.get("actions")
    if old_actions is not None:
        columns = (
            "id, kind, room_id, payload, status, attempts, next_at, last_error, "
            "created_ts, updated_ts"
        )
        async for rows in old_rows(conn, old_actions, columns, "id", ""):
            out = []
            for aid, kind, room_id, payload, status, attempts, nxt, err, cts, uts in rows:
                try:
                    body = json.loads(payload)
                except ValueError:
                    raise StoreError(f"action {aid}: its payload is not JSON") from None
                out.append(
                    ctx.actions.values(dk, aid, room_id, body)
                    | {
                        "kind": kind,
                        "status": status,
                        "attempts": attempts,
                        "next_at": nxt,
                        "last_error": ctx.actions.seal_error(dk, aid, err),
                        "created_ts": cts,
                        "updated_ts": uts,
                    }
                )
            await conn.execute(insert(actions), out)
        await drop_retired(conn, old_actions)
    await ctx.state.seal_plaintext(conn)
