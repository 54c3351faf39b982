"""Attachments: the durable queue of in-room media checks and the extraction cache.

Both tables are sealed under the operational key: the queue holds room, event, sender and
mxc URI; the cache, keyed by the blind index of ``mxc:<uri>`` or ``sha256:<digest>``, holds
what reading the file gave (digest, type, reason it was not read, size), never its text.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from bridge.audit.codec import dumps
from bridge.audit.crypto import OPERATIONAL_SCOPE
from bridge.store.database import Database
from bridge.store.keys import KeyRepository
from bridge.store.models import now_ms
from bridge.store.schema import media_cache, media_checks


@dataclass(frozen=True, slots=True)
class MediaCheck:
    """One message's media to fetch and judge by its room's rules."""

    room_id: str
    event_id: str
    sender: str
    mxc: str
    id: str = ""
    attempts: int = 0


class MediaRepository:
    """The media check queue and the extraction cache."""

    def __init__(self, db: Database, keys: KeyRepository) -> None:
        self.db = db
        self.keys = keys

    async def insert(self, conn: AsyncConnection, checks: Sequence[MediaCheck]) -> None:
        """Queue ``checks`` in ``conn`` (the operational key must be loaded)."""
        if not checks:
            return
        dk = self.keys.by_scope[OPERATIONAL_SCOPE]
        rows = []
        for c in checks:
            cid = secrets.token_hex(16)
            body = dumps(
                {"room_id": c.room_id, "event_id": c.event_id, "sender": c.sender, "mxc": c.mxc}
            )
            rows.append(
                {
                    "id": cid,
                    "data": self.keys.op_seal(dk, "media_checks", cid, "data", body),
                    "attempts": 0,
                    "next_at": 0.0,
                    "created_ts": now_ms(),
                }
            )
        await conn.execute(insert(media_checks), rows)

    async def due(self, now: float, limit: int = 20) -> list[MediaCheck]:
        """Checks due at ``now`` (unix time), oldest first."""
        query = (
            select(media_checks)
            .where(media_checks.c.next_at <= now)
            .order_by(media_checks.c.next_at, media_checks.c.created_ts)
            .limit(limit)
        )
        async with self.db.connect() as conn:
            rows = (await conn.execute(query)).mappings().all()
        if not rows:
            return []
        dk = await self.keys.op_key_needed("a media check")
        out = []
        for row in rows:
            raw = self.keys.op_open(dk, "media_checks", row["id"], "data", row["data"], "check")
            obj = json.loads(raw)
            out.append(
                MediaCheck(
                    room_id=obj["room_id"],
                    event_id=obj["event_id"],
                    sender=obj["sender"],
                    mxc=obj["mxc"],
                    id=row["id"],
                    attempts=row["attempts"],
                )
            )
        return out

    @staticmethod
    async def finish(conn: AsyncConnection, check_id: str) -> None:
        """Remove a check that ran (in the commit of what it produced)."""
        await conn.execute(delete(media_checks).where(media_checks.c.id == check_id))

    async def retry(self, check_id: str, attempts: int, at: float) -> None:
        """Try ``check_id`` again at ``at`` (unix time)."""
        async with self.db.transaction() as conn:
            await conn.execute(
                update(media_checks)
                .where(media_checks.c.id == check_id)
                .values(attempts=attempts, next_at=at)
            )

    async def pending(self) -> int:
        """Checks waiting."""
        async with self.db.connect() as conn:
            return len((await conn.execute(select(media_checks.c.id))).all())

    # -- the extraction cache --

    async def cached(self, key: str) -> Mapping[str, Any] | None:
        """What the cache holds under ``key`` (``mxc:<uri>`` or ``sha256:<digest>``)."""
        idx = self.keys.bidx("media", key)
        async with self.db.connect() as conn:
            row = (
                await conn.execute(select(media_cache.c.data).where(media_cache.c.key_idx == idx))
            ).first()
        if row is None:
            return None
        dk = await self.keys.op_key_needed("the media cache")
        value = json.loads(self.keys.op_open(dk, "media_cache", idx, "data", row[0], "cache"))
        return value if isinstance(value, dict) else None

    async def remember(self, entries: Mapping[str, Mapping[str, Any]]) -> None:
        """Store ``key -> value`` cache entries (replacing what was there)."""
        dk = await self.keys.op_key()
        assert dk is not None
        async with self.db.transaction() as conn:
            for key, value in entries.items():
                idx = self.keys.bidx("media", key)
                sealed = self.keys.op_seal(dk, "media_cache", idx, "data", dumps(dict(value)))
                await conn.execute(delete(media_cache).where(media_cache.c.key_idx == idx))
                await conn.execute(
                    insert(media_cache),
                    [{"key_idx": idx, "data": sealed, "updated_ts": now_ms()}],
                )
