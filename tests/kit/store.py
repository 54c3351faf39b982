"""Store reads and writes only the tests need (the bridge has no use for them)."""

from __future__ import annotations

from sqlalchemy import func, select

from bridge.store import ActionRow, Store, now_ms
from bridge.store.schema import actions, records


async def get_action(store: Store, action_id: str) -> ActionRow | None:
    """One executor action by id, opened, or None."""
    found = await store.actions.select(select(actions).where(actions.c.id == action_id))
    return found[0] if found else None


async def actions_by_status(store: Store, status: str, limit: int = 100) -> list[ActionRow]:
    """The actions with ``status``, the most recently updated first."""
    return await store.actions.select(
        select(actions)
        .where(actions.c.status == status)
        .order_by(actions.c.updated_ts.desc())
        .limit(limit)
    )


async def count_events(store: Store, event_id: str) -> int:
    """How many records hold the event ``event_id`` (0 or 1: event IDs are unique)."""
    async with store.db.connect() as conn:
        return int(
            (
                await conn.execute(
                    select(func.count()).where(
                        records.c.event_id_idx == store.keys.bidx("event_id", event_id)
                    )
                )
            ).scalar_one()
        )


async def destroy_room_key(store: Store, room_id: str) -> bool:
    """Crypto-shred a room: delete its data key (records stay, chain still verifies).

    The deletion commits with a shred record naming the key (and a checkpoint over it).
    """
    scope = store.keys.bidx("room", room_id)
    key_id = await store.records.write(lambda conn: store.expiry.shred_in(conn, scope, now_ms()))
    if key_id is None:
        return False
    store.keys.shredded_now(scope, key_id)
    return True
