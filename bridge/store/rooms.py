"""Rooms the bridge knows (joined, what power it lacks, fields set by rollouts), sealed."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from bridge.audit.codec import dumps
from bridge.audit.crypto import DataKey
from bridge.store.database import Database
from bridge.store.keys import KeyRepository
from bridge.store.models import RoomUpdate, now_ms
from bridge.store.schema import rooms


class RoomRepository:
    """The ``rooms`` table: keyed by the room's blind index, the rest sealed."""

    def __init__(self, db: Database, keys: KeyRepository) -> None:
        self.db = db
        self.keys = keys
        #: Serialises read-modify-writes of rooms' sealed data within this process (SQLite
        #: reads outside the write transaction; PostgreSQL also locks the rows).
        self._rmw_lock = asyncio.Lock()

    def values(
        self,
        dk: DataKey,
        room_id: str,
        lacking: str,
        extra: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The ``room_idx`` and sealed ``data`` columns of a room row."""
        idx = self.keys.bidx("room", room_id)
        data = dumps({**(extra or {}), "room_id": room_id, "lacking": lacking})
        return {"room_idx": idx, "data": self.keys.op_seal(dk, "rooms", idx, "data", data)}

    async def _objs(
        self, conn: AsyncConnection, dk: DataKey, idxs: Sequence[bytes]
    ) -> dict[bytes, dict[str, Any]]:
        """The opened sealed data of existing rooms (locked for update on PostgreSQL)."""
        out: dict[bytes, dict[str, Any]] = {}
        for i in range(0, len(idxs), 500):
            chunk = list(idxs[i : i + 500])
            query = select(rooms.c.room_idx, rooms.c.data).where(rooms.c.room_idx.in_(chunk))
            for idx, blob in (await conn.execute(query.with_for_update())).all():
                key = bytes(idx)
                out[key] = json.loads(
                    self.keys.op_open(dk, "rooms", key, "data", blob, "a known room")
                )
        return out

    async def upsert(
        self, room_id: str, *, joined: bool | None = None, lacking: str | None = None
    ) -> None:
        """Create or update one room (its own commit); other sealed fields are kept."""
        dk = await self.keys.op_key_created()
        async with self._rmw_lock, self.db.transaction() as conn:
            await self.upsert_in(conn, dk, RoomUpdate(room_id, joined, lacking))

    @property
    def rmw_lock(self) -> asyncio.Lock:
        """Hold it around :meth:`upsert_in` in a transaction opened elsewhere."""
        return self._rmw_lock

    async def upsert_in(self, conn: AsyncConnection, dk: DataKey, room: RoomUpdate) -> None:
        """:meth:`upsert` inside ``conn``'s transaction (hold :attr:`rmw_lock`)."""
        idx = self.keys.bidx("room", room.room_id)
        values: dict[str, Any] = {"updated_ts": now_ms()}
        if room.joined is not None:
            values["joined"] = room.joined
        if room.lacking is not None:
            # Keep the other sealed fields (see update_data).
            old = (await self._objs(conn, dk, [idx])).get(idx, {})
            values["data"] = self.values(dk, room.room_id, room.lacking, old)["data"]
        result = await conn.execute(update(rooms).where(rooms.c.room_idx == idx).values(**values))
        if result.rowcount == 0:
            values.setdefault("joined", False)
            values.setdefault("data", self.values(dk, room.room_id, "")["data"])
            await conn.execute(insert(rooms).values(room_idx=idx, **values))

    async def update_data(self, updates: Mapping[str, Mapping[str, Any]]) -> int:
        """Merge fields into known rooms' sealed data, in one commit: ``{room_id: {field:
        value}}`` (``room_id`` and ``lacking`` are not fields of this kind). Rooms the
        store does not know are skipped; returns how many rooms were updated.
        :meth:`data` reads the fields back; :meth:`upsert` keeps them."""
        if not updates:
            return 0
        dk = await self.keys.op_key_created()
        by_idx = {self.keys.bidx("room", r): r for r in updates}
        async with self._rmw_lock, self.db.transaction() as conn:
            old = await self._objs(conn, dk, list(by_idx))
            for idx, obj in old.items():
                room = by_idx[idx]
                fields = {k: v for k, v in updates[room].items() if k not in ("room_id", "lacking")}
                data = self.values(dk, room, obj.get("lacking") or "", {**obj, **fields})
                await conn.execute(
                    update(rooms).where(rooms.c.room_idx == idx).values(data=data["data"])
                )
        return len(old)

    async def data(self) -> dict[str, dict[str, Any]]:
        """Every known room's sealed data by room ID: ``joined``, ``lacking`` and the fields
        written by :meth:`update_data`."""
        async with self.db.connect() as conn:
            rows = (
                await conn.execute(select(rooms.c.room_idx, rooms.c.joined, rooms.c.data))
            ).all()
        if not rows:
            return {}
        dk = await self.keys.op_key_needed("a known room")
        out: dict[str, dict[str, Any]] = {}
        for idx, joined, blob in rows:
            key = bytes(idx)
            obj = json.loads(self.keys.op_open(dk, "rooms", key, "data", blob, "a known room"))
            room = obj.pop("room_id")
            obj["lacking"] = obj.get("lacking") or ""
            obj["joined"] = bool(joined)
            out[room] = obj
        return out

    async def upsert_many(self, room_ids: Iterable[str], *, joined: bool) -> None:
        """Mark many rooms joined (or not) in one commit; new ones lack nothing."""
        await self.keys.op_key()
        async with self.db.transaction() as conn:
            await self.put_many(conn, room_ids, joined=joined)

    async def put_many(self, conn: AsyncConnection, ids: Iterable[str], *, joined: bool) -> None:
        """:meth:`upsert_many` in ``conn``."""
        dk = await self.keys.op_key_in(conn)
        by_idx = {self.keys.bidx("room", r): r for r in ids}
        ts = now_ms()
        have: set[bytes] = set()
        idxs = list(by_idx)
        for i in range(0, len(idxs), 500):
            chunk = idxs[i : i + 500]
            have.update(
                bytes(r[0])
                for r in await conn.execute(
                    select(rooms.c.room_idx).where(rooms.c.room_idx.in_(chunk))
                )
            )
            await conn.execute(
                update(rooms)
                .where(rooms.c.room_idx.in_(chunk))
                .values(joined=joined, updated_ts=ts)
            )
        new = [
            self.values(dk, room, "") | {"joined": joined, "updated_ts": ts}
            for idx, room in by_idx.items()
            if idx not in have
        ]
        if new:
            await conn.execute(insert(rooms), new)

    def _row(self, dk: DataKey, row: Any) -> dict[str, Any]:
        idx = bytes(row["room_idx"])
        obj = json.loads(self.keys.op_open(dk, "rooms", idx, "data", row["data"], "a known room"))
        return {
            "room_id": obj["room_id"],
            "joined": bool(row["joined"]),
            "lacking": obj.get("lacking") or "",
            "updated_ts": row["updated_ts"],
        }

    async def known(self) -> list[dict[str, Any]]:
        """Every known room (room_id, joined, lacking, updated_ts), by room ID."""
        async with self.db.connect() as conn:
            rows = (await conn.execute(select(rooms))).mappings().all()
        if not rows:
            return []
        dk = await self.keys.op_key_needed("a known room")
        return sorted((self._row(dk, r) for r in rows), key=lambda r: r["room_id"])

    def order_key(self, room_id: str) -> bytes:
        """Where ``room_id`` sorts in :meth:`joined_page` ("" sorts first)."""
        return b"" if not room_id else self.keys.bidx("room", room_id)

    async def joined_page(self, after: str, limit: int) -> list[tuple[str, str]]:
        """Joined rooms after ``after`` in :meth:`order_key` order (blind-index order,
        not ID order: the IDs are sealed): ``(room_id, lacking)``."""
        query = select(rooms.c.room_idx, rooms.c.joined, rooms.c.data, rooms.c.updated_ts).where(
            rooms.c.joined.is_(True)
        )
        if after:
            query = query.where(rooms.c.room_idx > self.order_key(after))
        query = query.order_by(rooms.c.room_idx).limit(limit)
        async with self.db.connect() as conn:
            rows = (await conn.execute(query)).mappings().all()
        if not rows:
            return []
        dk = await self.keys.op_key_needed("a known room")
        out = []
        for r in rows:
            room = self._row(dk, r)
            out.append((room["room_id"], room["lacking"]))
        return out
