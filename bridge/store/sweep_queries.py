"""Read-only queries the retention sweeper needs, on the store's tables.

Everything goes through the blind indexes (``room_idx``, ``sender_idx``, ``type_idx``) and
the plain ``origin_ts``; events are decrypted only when the sweeper must look inside
(state key, redaction target, sender). Writes go through :meth:`WorkQueue.complete`, so
the sweeper's progress commits together with the actions it enqueued.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, func, or_, select

from bridge.audit import codec
from bridge.audit.kinds import AuditKind
from bridge.store.models import StoreError
from bridge.store.schema import SEALED_PART, records
from bridge.store.store import Store

_EVENT = AuditKind.EVENT  # bound once: compared for every record

log = logging.getLogger(__name__)

__all__ = ["REDACTION", "STATE_TYPES", "ExpiredRecord", "SweepQueries"]

#: The Matrix event type of a redaction (the store imports nothing from the policy layer).
REDACTION = "m.room.redaction"
#: The columns :meth:`SweepQueries._open` reads: seq, origin_ts and the sealed part.
_EVENT_COLS = (records.c.seq, records.c.origin_ts, *SEALED_PART)
# Common state types, left out of the "messages that would be deleted" estimate without
# decrypting anything (state events are never deleted by retention).
STATE_TYPES = (
    "m.room.create",
    "m.room.member",
    "m.room.power_levels",
    "m.room.join_rules",
    "m.room.history_visibility",
    "m.room.guest_access",
    "m.room.name",
    "m.room.topic",
    "m.room.avatar",
    "m.room.canonical_alias",
    "m.room.encryption",
    "m.room.server_acl",
    "m.room.retention",
    "m.room.pinned_events",
    "m.room.tombstone",
    "m.space.child",
    "m.space.parent",
    REDACTION,
)


@dataclass(frozen=True, slots=True)
class ExpiredRecord:
    """One archived event of a room, decrypted (``event`` None when unreadable)."""

    seq: int
    origin_ts: int
    event: dict[str, Any] | None


class SweepQueries:
    """The sweeper's window onto the store: paged rooms, expired events, counts."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.keys = store.keys
        self.db = store.db

    def room_idx(self, room_id: str) -> bytes:
        idx = self.keys.blind("room", room_id)
        assert idx is not None
        return idx

    def _blind_all(self, field_name: str, values: Iterable[str]) -> list[bytes]:
        out = []
        for v in values:
            idx = self.keys.blind(field_name, v)
            if idx is not None:
                out.append(idx)
        return out

    async def joined_rooms(self, after: str, limit: int) -> list[tuple[str, str]]:
        """Joined rooms after ``after`` in :meth:`order_key` order: (room_id, lacking).

        Room IDs are sealed in the store, so pages follow the rooms' blind indexes, not
        their IDs; "" starts from the beginning."""
        return await self.store.rooms.joined_page(after, limit)

    def order_key(self, room_id: str) -> bytes:
        """Sort key of a room in :meth:`joined_rooms` pages ("" sorts first)."""
        return self.store.rooms.order_key(room_id)

    async def get_states(self, keys: Sequence[str]) -> dict[str, str]:
        """Several state-table values at once (missing keys left out), decrypted."""
        return await self.store.state.get_many(keys)

    async def pending_actions(self) -> int:
        """How many executor actions are waiting (the sweeper backs off when many are)."""
        return await self.store.actions.pending_count()

    def _window(self, room_id: str, cutoff: int, after_ts: int, after_seq: int) -> list[Any]:
        return [
            records.c.room_idx == self.room_idx(room_id),
            records.c.kind == AuditKind.EVENT,
            records.c.origin_ts < cutoff,
            or_(
                records.c.origin_ts > after_ts,
                and_(records.c.origin_ts == after_ts, records.c.seq > after_seq),
            ),
        ]

    async def expired_batch(
        self, room_id: str, cutoff: int, after_ts: int, after_seq: int, limit: int
    ) -> list[ExpiredRecord]:
        """Up to ``limit`` events of the room older than ``cutoff``, after the position
        (``after_ts``, ``after_seq``), oldest first, decrypted."""
        query = (
            select(*_EVENT_COLS)
            .where(*self._window(room_id, cutoff, after_ts, after_seq))
            .order_by(records.c.origin_ts, records.c.seq)
            .limit(limit)
        )
        async with self.db.connect() as conn:
            rows = (await conn.execute(query)).all()
            await self.keys.by_ids(conn, {r[3] for r in rows})
        return [ExpiredRecord(r[0], r[1], self._open(r)) for r in rows]

    def _open(self, row: Any) -> dict[str, Any] | None:
        seq, _ts, room_idx, key_id, nonce, ct = row
        try:
            pt = self.keys.decrypt(seq, room_idx, key_id, nonce, ct)
        except StoreError as e:
            log.error("retention sweep: %s (record skipped)", e)
            return None
        if pt is None:
            return None
        try:
            obj = codec.loads(pt)
        except ValueError:
            log.error("retention sweep: audit record seq %d is not JSON (skipped)", seq)
            return None
        return obj if isinstance(obj, dict) else None

    async def redacted_targets(
        self, room_id: str, since_ts: int, until_ts: int, exclude_senders: Iterable[str] = ()
    ) -> set[str]:
        """Event IDs redacted by redactions of the room sent from ``since_ts`` to before
        ``until_ts`` (a redaction comes after its target), except by ``exclude_senders``.

        Reads the room's events in that time range through ``(room_idx, origin_ts)``; only
        the redactions among them are decrypted."""
        conds = [
            records.c.room_idx == self.room_idx(room_id),
            records.c.origin_ts >= since_ts,
            records.c.origin_ts < until_ts,
            records.c.kind == AuditKind.EVENT,
            records.c.type_idx == self.keys.blind("type", REDACTION),
        ]
        excluded = self._blind_all("sender", exclude_senders)
        if excluded:
            conds.append(records.c.sender_idx.not_in(excluded))
        query = select(*_EVENT_COLS).where(*conds)
        out: set[str] = set()
        async with self.db.connect() as conn:
            rows = (await conn.execute(query)).all()
            await self.keys.by_ids(conn, {r[3] for r in rows})
        for row in rows:
            ev = self._open(row)
            if ev is None:
                continue
            content = ev.get("content")
            target = ev.get("redacts") or (
                content.get("redacts") if isinstance(content, dict) else None
            )
            if isinstance(target, str):
                out.add(target)
        return out

    async def senders_before(self, room_id: str, users: Iterable[str], before: int) -> set[str]:
        """Which of ``users`` sent an event in the room before ``before`` (the legal holds
        a purge up to ``before`` would break). One indexed look-up per user (holds are few),
        each stopping at the first event found."""
        room = self.room_idx(room_id)
        found: set[str] = set()
        async with self.db.connect() as conn:
            for user in sorted(set(users)):
                idx = self.keys.blind("sender", user)
                if idx is None:
                    continue
                query = (
                    select(records.c.seq)
                    .where(
                        records.c.room_idx == room,
                        records.c.sender_idx == idx,
                        records.c.kind == AuditKind.EVENT,
                        records.c.origin_ts < before,
                    )
                    .limit(1)
                )
                if (await conn.execute(query)).first() is not None:
                    found.add(user)
        return found

    async def count_expired(self, room_id: str, cutoff: int, after_ts: int, after_seq: int) -> int:
        """Roughly how many messages (not state) of the room are older than ``cutoff`` and
        not yet swept: counted on the indexes, nothing decrypted."""
        state_types = self._blind_all("type", STATE_TYPES)
        query = select(func.count()).where(
            *self._window(room_id, cutoff, after_ts, after_seq),
            or_(records.c.type_idx.is_(None), records.c.type_idx.not_in(state_types)),
        )
        async with self.db.connect() as conn:
            return int((await conn.execute(query)).scalar_one())
