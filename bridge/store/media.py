"""Attachments: the durable queue of in-room media checks and the extraction cache.

Both tables are sealed under the operational key: the queue holds room, event, sender,
mxc URI and, for an end-to-end encrypted attachment, its key material (:class:`FileKey`,
only inside the sealed JSON, and only until the check ran); the cache, keyed by the blind
index of ``mxc:<uri>``, ``e2ee:<uri>:<digest of the key material>`` or ``sha256:<digest>``,
holds what reading the file gave (digest, type, reason it was not read, size), never its
text and never a key.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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
class FileKey:
    """The key material of an end-to-end encrypted attachment (``content.file``): the JWK
    key ``k`` (base64url), the ``iv`` and the ciphertext's ``sha256`` (unpadded base64), as
    the message gave them, with its ``alg`` and version ``v``. Kept out of ``repr`` so that
    it never reaches a log by accident."""

    k: str = field(repr=False)
    iv: str = field(repr=False)
    sha256: str = field(repr=False)
    alg: str = "A256CTR"
    v: str = "v2"

    def cache_key(self, mxc: str) -> str:
        """The extraction cache's key for ``mxc`` read with this key: the same mxc posted
        with another key (say a wrong one first, which decrypts to noise) is another entry.
        Only a digest of the key material is in it (and the cache stores a blind index of
        that)."""
        material = "\0".join((self.alg, self.v, self.k, self.iv, self.sha256))
        return f"e2ee:{mxc}:{hashlib.sha256(material.encode()).hexdigest()}"

    def to_json(self) -> dict[str, str]:
        """For the sealed JSON of a queued check."""
        return {"k": self.k, "iv": self.iv, "sha256": self.sha256, "alg": self.alg, "v": self.v}

    @classmethod
    def from_json(cls, obj: object) -> FileKey | None:
        """Back from :meth:`to_json`; None for a check queued without a key."""
        if not isinstance(obj, dict):
            return None
        return cls(**{name: str(obj.get(name, "")) for name in ("k", "iv", "sha256", "alg", "v")})


@dataclass(frozen=True, slots=True)
class MediaCheck:
    """One message's media to fetch and judge by its room's rules; ``key`` when the file
    is end-to-end encrypted."""

    room_id: str
    event_id: str
    sender: str
    mxc: str
    id: str = ""
    attempts: int = 0
    key: FileKey | None = None


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
            obj: dict[str, Any] = {
                "room_id": c.room_id,
                "event_id": c.event_id,
                "sender": c.sender,
                "mxc": c.mxc,
            }
            if c.key is not None:
                obj["key"] = c.key.to_json()  # sealed, like the rest; gone when it ran
            body = dumps(obj)
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
                    key=FileKey.from_json(obj.get("key")),
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
        """What the cache holds under ``key`` (``mxc:``, ``e2ee:`` or ``sha256:`` entries)."""
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
