"""Archive expiry: dropping old ciphertext and shredding rooms whose records all expired.

Every removal is stated in the chain first, in plain hashed columns a verifier without keys
can read (:mod:`bridge.audit.chain`, "Removals"):

* a run appends an ``expiry`` record (``origin_ts`` = the cutoff) and signs a checkpoint
  over it *before* it drops any ciphertext, and only drops the ciphertext of records
  archived before the cutoff with a lower seq than that record;
* a room's data key is deleted in the same commit that appends a ``shred`` record naming
  the key (and signs a checkpoint over it).

A crash between the two steps leaves a claim without removals, never removals without a
claim. Stores whose expiry ran before these records existed get them once, at the bridge's
start, from the retention records of those runs (:meth:`ArchiveExpiry.record_earlier_removals`).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from bridge.audit import codec
from bridge.audit.chain import EXPIRY_KIND, SHRED_KIND, Removals
from bridge.audit.crypto import GLOBAL_SCOPE, OPERATIONAL_SCOPE
from bridge.audit.kinds import AuditKind
from bridge.store.database import Database, log
from bridge.store.holds import HoldRepository
from bridge.store.keys import KeyRepository
from bridge.store.models import AuditEntry, ExpiryReport, Plain, now_ms
from bridge.store.records import RecordLog
from bridge.store.schema import SEALED_PART, data_keys, records
from bridge.store.state import EXPIRY_CURSOR_KEY, StateRepository

#: ``type`` of the retention record that ends an archive-expiry run.
RUN_TYPE = "archive_expiry"


async def load_removals(engine: AsyncEngine) -> Removals:
    """The removal records and the data key ids of a store, read without any key.

    Uses the ``kind`` index: a few rows per expiry run and shredded room, not a scan.
    """
    async with engine.connect() as conn:
        key_ids = frozenset(r[0] for r in await conn.execute(select(data_keys.c.key_id)))
        rows = (
            await conn.execute(
                select(records.c.seq, records.c.kind, records.c.origin_ts, records.c.key_id)
                .where(records.c.kind.in_((EXPIRY_KIND, SHRED_KIND)))
                .order_by(records.c.seq)
            )
        ).all()
    return Removals(
        key_ids,
        tuple((seq, origin) for seq, kind, origin, _ in rows if kind == EXPIRY_KIND),
        tuple((seq, key_id) for seq, kind, _, key_id in rows if kind == SHRED_KIND),
    )


class ArchiveExpiry:
    """Archive expiry (skips what is on legal hold) and crypto-shredding, both audited."""

    def __init__(
        self,
        db: Database,
        keys: KeyRepository,
        records: RecordLog,
        state: StateRepository,
        holds: HoldRepository,
    ) -> None:
        self.db = db
        self.keys = keys
        self.records = records
        self.state = state
        self.holds = holds

    async def expire(
        self, retention_ms: int, *, now: int | None = None, batch: int = 2000
    ) -> ExpiryReport:
        """Drop the ciphertext of records older than ``retention_ms`` (by archive time).

        Records of rooms and senders on legal hold are skipped; the holds are read again
        for every batch, so a hold placed during a long run applies from the next batch
        (a batch and a hold change never interleave: both take the append lock). Rooms
        whose records are all expired lose their data key too (crypto-shredding).
        ``ct_digest`` stays, so the chain still verifies. Works in batches of ``batch``
        records, one commit each, and resumes where it stopped (a cursor in
        ``bridge_state``); lifting a hold resets the cursor.

        First an ``expiry`` record (the cutoff, the seq range) is appended and signed into a
        checkpoint; only records before it lose their ciphertext. The run ends with a
        ``retention`` record (counts, the expiry record's seq, the destroyed key ids).
        """
        cutoff = (now_ms() if now is None else now) - retention_ms
        expired = skipped = 0
        sqlite = self.db.sqlite
        cursor = int(await self.state.get(EXPIRY_CURSOR_KEY) or 0)
        claim = await self._expiry_claim(cutoff, retention_ms, cursor)
        held_rooms: set[bytes] = set()
        done = claim is None
        while not done:
            assert claim is not None
            async with self.db.write_lock:
                held = await self.holds.current()  # per batch: a hold placed meanwhile counts
                held_rooms = {self.keys.bidx("room", r) for r in held.rooms}
                held_users = {self.keys.bidx("sender", u) for u in held.users}
                async with self.db.transaction() as conn:
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
                            .where(records.c.seq > cursor, records.c.seq < claim)
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
                        await self.state.put(conn, EXPIRY_CURSOR_KEY, str(cursor))
        if claim is None:
            held_rooms = {self.keys.bidx("room", r) for r in (await self.holds.current()).rooms}
        shredded = await self._shred_expired_rooms(cutoff, held_rooms)
        if sqlite and (expired or shredded):
            await self.db.truncate_wal()
        report = ExpiryReport(cutoff, expired, skipped, len(shredded), cursor)
        held = await self.holds.current()
        await self.records.append(
            [
                AuditEntry(
                    AuditKind.RETENTION,
                    {
                        "job": RUN_TYPE,
                        "retention_ms": retention_ms,
                        "cutoff_ts": cutoff,
                        "expired": expired,
                        "skipped_on_hold": skipped,
                        "rooms_shredded": len(shredded),
                        "shredded_key_ids": shredded,
                        "expiry_record_seq": claim,
                        "through_seq": cursor,
                        "held_rooms": len(held.rooms),
                        "held_users": len(held.users),
                    },
                    type=RUN_TYPE,
                )
            ]
        )
        return report

    async def _expiry_claim(self, cutoff: int, retention_ms: int, cursor: int) -> int | None:
        """Append the signed ``expiry`` record of a run; its seq, or None if nothing after
        ``cursor`` is old enough to expire."""
        async with self.db.connect() as conn:
            first = (
                await conn.execute(
                    select(records.c.ts)
                    .where(records.c.seq > cursor, records.c.ciphertext.is_not(None))
                    .order_by(records.c.seq)
                    .limit(1)
                )
            ).first()
        if first is None or first[0] >= cutoff:
            return None

        async def run(conn: AsyncConnection) -> int:
            ts = now_ms()
            seq, _ = await self.records.chain_start(conn)
            data = {
                "job": RUN_TYPE,
                "retention_ms": retention_ms,
                "cutoff_ts": cutoff,
                "from_seq": cursor + 1,
                "before_seq": seq,
            }
            return await self._append_claim(conn, cutoff, data, ts)

        return await self.records.write(run)

    async def _append_claim(
        self, conn: AsyncConnection, cutoff: int, data: dict[str, Any], ts: int
    ) -> int:
        """Append an ``expiry`` record (``origin_ts`` = ``cutoff``) and sign; its seq."""
        item = Plain(
            EXPIRY_KIND,
            None,
            None,
            None,
            RUN_TYPE,
            cutoff,
            codec.dumps({"room_id": None, "sender": None, "type": RUN_TYPE, "data": data}),
            ts,
        )
        seq, _ = await self.records.append_records(conn, [item], ts, sign=True)
        return seq

    async def shred_in(self, conn: AsyncConnection, scope: bytes, ts: int) -> str | None:
        """In ``conn``'s transaction: chain a shred record for the data key of ``scope``
        and delete the key; its id, or None if the scope has no key."""
        key_id = (
            await conn.execute(select(data_keys.c.key_id).where(data_keys.c.scope == scope))
        ).scalar()
        if key_id is None:
            return None
        await self.records.append_shreds(conn, [(key_id, scope)], ts)
        await conn.execute(delete(data_keys).where(data_keys.c.key_id == key_id))
        return str(key_id)

    async def _shred_expired_rooms(self, cutoff: int, held_rooms: set[bytes]) -> list[str]:
        """Destroy the data key of every room whose records have all expired; their ids."""
        async with self.db.connect() as conn:
            scopes = [
                bytes(r[0])
                for r in await conn.execute(
                    select(data_keys.c.scope).where(
                        data_keys.c.scope.not_in((GLOBAL_SCOPE, OPERATIONAL_SCOPE))
                    )
                )
            ]
        shredded: list[str] = []
        for scope in scopes:
            if scope in held_rooms:
                continue
            async with self.db.connect() as conn:
                newest = (
                    await conn.execute(
                        select(records.c.origin_ts)
                        .where(records.c.room_idx == scope, records.c.kind != SHRED_KIND)
                        .order_by(records.c.origin_ts.desc())
                        .limit(1)
                    )
                ).scalar()
            if newest is not None and newest >= cutoff:
                continue  # cheap (index) test first: the room has recent events

            async def run(conn: AsyncConnection, scope: bytes = scope) -> str | None:
                alive = (
                    await conn.execute(
                        select(records.c.seq)
                        .where(
                            records.c.room_idx == scope,
                            records.c.kind != SHRED_KIND,
                            (records.c.ts >= cutoff) | records.c.ciphertext.is_not(None),
                        )
                        .limit(1)
                    )
                ).first()
                if alive is not None:
                    return None
                return await self.shred_in(conn, scope, now_ms())

            key_id = await self.records.write(run)
            if key_id is not None:
                self.keys.shredded_now(scope, key_id)
                shredded.append(key_id)
        return shredded

    async def record_earlier_removals(self) -> int:
        """Record, once, the removals of archive-expiry runs from before removal records.

        Such runs left only their ``retention`` record (encrypted and chained: it can only
        have been written with the keyring). For them, append one ``expiry`` record with the
        latest cutoff they recorded and, when they shredded rooms, a ``shred`` record for
        each data key that records use but the store no longer has, provided all of that
        key's records had lost their ciphertext and there are no more such keys than the
        runs said they shredded; otherwise nothing is recorded for the keys and the reason
        is logged (``audit verify`` then names the records). Returns the records appended.
        Cheap once done: an ``expiry`` record exists from then on.
        """
        async with self.db.connect() as conn:
            if (
                await conn.execute(select(records.c.seq).where(records.c.kind == EXPIRY_KIND))
            ).first() is not None:
                return 0
            rows = (
                await conn.execute(
                    select(records.c.seq, *SEALED_PART)
                    .where(
                        records.c.kind == AuditKind.RETENTION,
                        records.c.type_idx == self.keys.bidx("type", RUN_TYPE),
                    )
                    .order_by(records.c.seq)
                )
            ).all()
            if not rows:
                return 0
            await self.keys.by_ids(conn, {r[2] for r in rows})
        runs = []
        for seq, room_idx, key_id, nonce, ct in rows:
            pt = self.keys.decrypt(seq, room_idx, key_id, nonce, ct)
            data = codec.loads(pt).get("data") if pt is not None else None
            if isinstance(data, dict) and isinstance(data.get("cutoff_ts"), int):
                runs.append((seq, data["cutoff_ts"], int(data.get("rooms_shredded") or 0)))
        if not runs:
            return 0
        cutoff = max(c for _, c, _ in runs)
        said_shredded = sum(n for _, _, n in runs)
        orphans: list[tuple[str, bytes]] = []
        if said_shredded:
            orphans = await self._orphan_keys(cutoff, said_shredded)

        async def run(conn: AsyncConnection) -> int:
            ts = now_ms()
            n = 0
            if orphans:  # signed below, with the expiry record
                await self.records.append_shreds(conn, orphans, ts, sign=False)
                n += len(orphans)
            data = {
                "job": RUN_TYPE,
                "recorded_later": True,
                "runs_at_seqs": [s for s, _, _ in runs],
                "cutoff_ts": cutoff,
                "shredded_key_ids": [k for k, _ in orphans],
            }
            await self._append_claim(conn, cutoff, data, ts)
            return n + 1

        appended = await self.records.write(run)
        self.keys.shredded.update(k for k, _ in orphans)
        log.warning(
            "recorded the removals of %d archive-expiry runs from before expiry records "
            "(cutoff %d, %d shredded data keys) so that `audit verify` can check them",
            len(runs),
            cutoff,
            len(orphans),
        )
        return appended

    async def _orphan_keys(self, cutoff: int, said: int) -> list[tuple[str, bytes]]:
        """Data keys records use that the store lacks, if earlier runs can have shredded
        them all: every such record expired before ``cutoff``, no more keys than ``said``.
        A full scan of the records: done once, for stores whose expiry shredded rooms."""
        gone = ~records.c.key_id.in_(select(data_keys.c.key_id))
        async with self.db.connect() as conn:
            rows = (
                await conn.execute(
                    select(
                        records.c.key_id,
                        records.c.room_idx,
                        func.count(records.c.ciphertext),
                        func.max(records.c.ts),
                    )
                    .where(records.c.key_id.is_not(None), gone)
                    .group_by(records.c.key_id, records.c.room_idx)
                )
            ).all()
        bad = [k for k, _, kept, newest in rows if kept or newest >= cutoff]
        if bad or len(rows) > said:
            log.error(
                "%d data keys are missing from the store, earlier expiry runs recorded %d "
                "shredded rooms%s: not recording them as shredded; `audit verify` will name "
                "their records",
                len(rows),
                said,
                f", and records under {', '.join(map(repr, bad[:5]))} were not expired"
                if bad
                else "",
            )
            return []
        return [(str(k), bytes(scope) if scope is not None else b"") for k, scope, _, _ in rows]
