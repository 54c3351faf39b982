"""Archive expiry: dropping old ciphertext and shredding rooms whose records all expired."""

from __future__ import annotations

from sqlalchemy import delete, func, select, update

from ..audit.crypto import GLOBAL_SCOPE, OPERATIONAL_SCOPE
from .engine import truncate_wal
from .holds import HoldsMixin
from .models import AuditEntry, ExpiryReport, now_ms
from .operational import EXPIRY_CURSOR_KEY
from .schema import data_keys, records


class ExpiryMixin(HoldsMixin):
    """Archive expiry (skips what is on legal hold)."""

    async def expire_archive(
        self, retention_ms: int, *, now: int | None = None, batch: int = 2000
    ) -> ExpiryReport:
        """Drop the ciphertext of records older than ``retention_ms`` (by archive time).

        Records of rooms and senders on legal hold are skipped. Rooms whose records are
        all expired lose their data key too (crypto-shredding). ``ct_digest`` stays, so
        the chain still verifies. Works in batches of ``batch`` records, one commit each,
        and resumes where it stopped (a cursor in ``bridge_state``); lifting a hold resets
        the cursor. The run itself is appended as an audit record (kind ``retention``).
        """
        cutoff = (now_ms() if now is None else now) - retention_ms
        held = await self.holds()
        held_rooms = {self._bidx("room", r) for r in held.rooms}
        held_users = {self._bidx("sender", u) for u in held.users}
        expired = skipped = 0
        sqlite = self.backend == "sqlite"
        cursor = int(await self.get_state(EXPIRY_CURSOR_KEY) or 0)
        done = False
        while not done:
            async with self.engine.begin() as conn:
                if sqlite:  # freed bytes are overwritten, not left in free pages
                    await conn.exec_driver_sql("PRAGMA secure_delete=ON")
                rows = (
                    await conn.execute(
                        select(
                            records.c.seq,
                            records.c.ts,
                            records.c.room_idx,
                            records.c.sender_idx,
                            records.c.ciphertext.is_(None),
                        )
                        .where(records.c.seq > cursor)
                        .order_by(records.c.seq)
                        .limit(batch)
                    )
                ).all()
                if len(rows) < batch:
                    done = True
                todo = []
                last = cursor
                for seq, ts, room_idx, sender_idx, gone in rows:
                    if ts >= cutoff:
                        done = True
                        break
                    last = seq
                    if gone:
                        continue
                    if (room_idx is not None and bytes(room_idx) in held_rooms) or (
                        sender_idx is not None and bytes(sender_idx) in held_users
                    ):
                        skipped += 1
                        continue
                    todo.append(seq)
                for i in range(0, len(todo), 500):
                    await conn.execute(
                        update(records)
                        .where(records.c.seq.in_(todo[i : i + 500]))
                        .values(ciphertext=None)
                    )
                expired += len(todo)
                if last != cursor:
                    cursor = last
                    await self._put_state(conn, EXPIRY_CURSOR_KEY, str(cursor))
        shredded = await self._shred_expired_rooms(cutoff, held_rooms)
        if sqlite and (expired or shredded):
            await truncate_wal(self.engine)
        report = ExpiryReport(cutoff, expired, skipped, shredded, cursor)
        await self.append(
            [
                AuditEntry(
                    "retention",
                    {
                        "job": "archive_expiry",
                        "retention_ms": retention_ms,
                        "cutoff_ts": cutoff,
                        "expired": expired,
                        "skipped_on_hold": skipped,
                        "rooms_shredded": shredded,
                        "through_seq": cursor,
                        "held_rooms": len(held.rooms),
                        "held_users": len(held.users),
                    },
                    type="archive_expiry",
                )
            ]
        )
        return report

    async def _shred_expired_rooms(self, cutoff: int, held_rooms: set[bytes]) -> int:
        """Destroy the data key of every room whose records have all expired."""
        async with self.engine.connect() as conn:
            scopes = [
                bytes(r[0])
                for r in await conn.execute(
                    select(data_keys.c.scope).where(
                        data_keys.c.scope.not_in((GLOBAL_SCOPE, OPERATIONAL_SCOPE))
                    )
                )
            ]
        shredded = 0
        for scope in scopes:
            if scope in held_rooms:
                continue
            async with self.engine.connect() as conn:
                newest = (
                    await conn.execute(
                        select(func.max(records.c.origin_ts)).where(records.c.room_idx == scope)
                    )
                ).scalar()
            if newest is not None and newest >= cutoff:
                continue  # cheap (index) test first: the room has recent events
            async with self._append_lock, self.engine.begin() as conn:
                alive = (
                    await conn.execute(
                        select(records.c.seq)
                        .where(
                            records.c.room_idx == scope,
                            (records.c.ts >= cutoff) | records.c.ciphertext.is_not(None),
                        )
                        .limit(1)
                    )
                ).first()
                if alive is not None:
                    continue
                result = await conn.execute(delete(data_keys).where(data_keys.c.scope == scope))
            self._forget_key(scope)
            shredded += bool(result.rowcount)
        return shredded
