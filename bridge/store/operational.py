"""The sealed operational tables: rooms, executor actions and state values."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from bridge.audit.crypto import OPERATIONAL_SCOPE, CryptoError, DataKey, field_aad, seal, unseal
from bridge.store.codec import dumps
from bridge.store.models import ActionRow, AuditEntry, NewAction, RoomUpdate, StoreError, now_ms
from bridge.store.records import RecordsMixin
from bridge.store.schema import actions, data_keys, rooms, state

INDEX_CHECK_KEY = "audit_index_check"
EXPIRY_CURSOR_KEY = "audit_expiry_cursor"
#: ``bridge_state`` keys kept in plaintext: the store reads them before the keys are
#: unlocked, and they name no one. Every other value is sealed (``enc:`` + base64).
PLAIN_STATE_KEYS = frozenset({"schema_version", INDEX_CHECK_KEY, EXPIRY_CURSOR_KEY})
SEALED_PREFIX = "enc:"


class OperationalMixin(RecordsMixin):
    """Rooms, executor actions and state values, sealed under the operational key."""

    async def _op_key_in(self, conn: AsyncConnection) -> DataKey:
        """The operational data key, loaded or created inside ``conn``'s transaction.

        The caller must drop the store (or call :meth:`_reset`) if that transaction fails.
        """
        dk = self._keys_by_scope.get(OPERATIONAL_SCOPE)
        if dk is None:
            await self._load_keys(conn, data_keys.c.scope == OPERATIONAL_SCOPE)
            dk = self._keys_by_scope.get(OPERATIONAL_SCOPE)
        if dk is None:
            dk, row = self._new_key(OPERATIONAL_SCOPE, now_ms())
            await conn.execute(insert(data_keys).values(**row))
            self._cache_key(dk)
        return dk

    async def _op_key(self, *, create: bool = True) -> DataKey | None:
        """The operational data key; created (own commit) on first need unless ``create``
        is False (readers: None means nothing sealed can exist yet).

        Call it BEFORE opening a write transaction: on SQLite a second writer would wait.
        """
        dk = self._keys_by_scope.get(OPERATIONAL_SCOPE)
        if dk is not None:
            return dk
        async with self._op_lock:
            dk = self._keys_by_scope.get(OPERATIONAL_SCOPE)
            if dk is not None:
                return dk
            dk = await self._load_op_key()
            if dk is not None or not create:
                return dk
            try:
                async with self.engine.begin() as conn:
                    dk = await self._op_key_in(conn)
            except IntegrityError:  # another process created it first
                self._keys_by_scope.pop(OPERATIONAL_SCOPE, None)
                dk = await self._load_op_key()
                if dk is None:
                    raise StoreError("the operational data key could not be created") from None
            except BaseException:
                self._forget_key(OPERATIONAL_SCOPE)
                raise
            return dk

    async def _load_op_key(self) -> DataKey | None:
        """Read the operational data key into the cache, if it exists."""
        async with self.engine.connect() as conn:
            await self._load_keys(conn, data_keys.c.scope == OPERATIONAL_SCOPE)
        return self._keys_by_scope.get(OPERATIONAL_SCOPE)

    async def _op_key_needed(self, what: str) -> DataKey:
        """The operational key for reading sealed data that exists (``what`` names it)."""
        dk = await self._op_key(create=False)
        if dk is None:
            raise StoreError(
                f"{what} is sealed but the operational data key is missing from data_keys "
                f"(the table was altered)"
            )
        return dk

    def _op_seal(self, dk: DataKey, table: str, key: str | bytes, column: str, pt: bytes) -> bytes:
        return seal(dk, field_aad(table, key, column), pt)

    def _op_open(
        self, dk: DataKey, table: str, key: str | bytes, column: str, blob: bytes, what: str
    ) -> bytes:
        try:
            return unseal(dk, field_aad(table, key, column), bytes(blob))
        except CryptoError as e:
            raise StoreError(f"{what} ({table}.{column}): {e}") from None

    def _seal_state(self, dk: DataKey | None, key: str, value: str) -> str:
        if key in PLAIN_STATE_KEYS:
            return value
        if dk is None:
            dk = self._keys_by_scope.get(OPERATIONAL_SCOPE)
        if dk is None:
            raise StoreError(f"cannot seal bridge_state {key!r}: no operational key loaded")
        blob = self._op_seal(
            dk, "bridge_state", key, "value", value.encode("utf-8", "surrogatepass")
        )
        return SEALED_PREFIX + base64.b64encode(blob).decode("ascii")

    def _open_state(self, dk: DataKey | None, key: str, stored: str) -> str:
        if key in PLAIN_STATE_KEYS:
            return stored
        if not stored.startswith(SEALED_PREFIX):
            raise StoreError(f"bridge_state {key!r} holds a plaintext value (not sealed)")
        if dk is None:
            raise StoreError(f"bridge_state {key!r} is sealed but the operational key is missing")
        try:
            blob = base64.b64decode(stored[len(SEALED_PREFIX) :], validate=True)
        except ValueError:
            raise StoreError(f"bridge_state {key!r}: not valid base64") from None
        pt = self._op_open(dk, "bridge_state", key, "value", blob, f"state {key!r}")
        return pt.decode("utf-8", "surrogatepass")

    def _room_values(
        self,
        dk: DataKey,
        room_id: str,
        lacking: str,
        extra: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        idx = self._bidx("room", room_id)
        data = dumps({**(extra or {}), "room_id": room_id, "lacking": lacking})
        return {"room_idx": idx, "data": self._op_seal(dk, "rooms", idx, "data", data)}

    def _room_data_lock(self) -> asyncio.Lock:
        """Serialises read-modify-writes of rooms' sealed data within this process (SQLite
        reads outside the write transaction; PostgreSQL also locks the rows)."""
        lock: asyncio.Lock | None = getattr(self, "_room_rmw_lock", None)
        if lock is None:
            lock = self._room_rmw_lock = asyncio.Lock()
        return lock

    async def _room_objs(
        self, conn: AsyncConnection, dk: DataKey, idxs: Sequence[bytes]
    ) -> dict[bytes, dict[str, Any]]:
        """The opened sealed data of existing rooms (locked for update on PostgreSQL)."""
        out: dict[bytes, dict[str, Any]] = {}
        for i in range(0, len(idxs), 500):
            chunk = list(idxs[i : i + 500])
            query = select(rooms.c.room_idx, rooms.c.data).where(rooms.c.room_idx.in_(chunk))
            for idx, blob in (await conn.execute(query.with_for_update())).all():
                key = bytes(idx)
                out[key] = json.loads(self._op_open(dk, "rooms", key, "data", blob, "a known room"))
        return out

    def _action_values(
        self, dk: DataKey, action_id: str, room_id: str | None, payload: Any
    ) -> dict[str, Any]:
        data = dumps({"room_id": room_id, "payload": payload})
        return {
            "id": action_id,
            "room_idx": None if room_id is None else self._bidx("room", room_id),
            "data": self._op_seal(dk, "actions", action_id, "data", data),
        }

    def _seal_error(self, dk: DataKey, action_id: str, error: str | None) -> bytes | None:
        if error is None:
            return None
        pt = error.encode("utf-8", "surrogatepass")
        return self._op_seal(dk, "actions", action_id, "last_error", pt)

    def _action_row(self, dk: DataKey, row: Any) -> ActionRow:
        aid = row["id"]
        what = f"action {aid}"
        obj = json.loads(self._op_open(dk, "actions", aid, "data", row["data"], what))
        err = row["last_error"]
        return ActionRow(
            id=aid,
            kind=row["kind"],
            room_id=obj.get("room_id"),
            payload=obj.get("payload") or {},
            status=row["status"],
            attempts=row["attempts"],
            next_at=row["next_at"],
            last_error=None
            if err is None
            else self._op_open(dk, "actions", aid, "last_error", err, what).decode(
                "utf-8", "surrogatepass"
            ),
        )

    async def _action_rows(self, rows: Sequence[Any]) -> list[ActionRow]:
        if not rows:
            return []
        dk = await self._op_key_needed("an executor action")
        return [self._action_row(dk, r) for r in rows]

    # -- executor actions ---------------------------------------------------------------

    async def _insert_actions(
        self, conn: AsyncConnection, new_actions: Sequence[NewAction]
    ) -> None:
        """Insert sealed actions; the operational key must be loaded (:meth:`_op_key`)."""
        if not new_actions:
            return
        dk = self._keys_by_scope[OPERATIONAL_SCOPE]
        ts = now_ms()
        await conn.execute(
            insert(actions),
            [
                self._action_values(dk, a.id, a.room_id, dict(a.payload))
                | {
                    "kind": a.kind,
                    "status": "pending",
                    "attempts": 0,
                    "next_at": a.not_before,
                    "last_error": None,
                    "created_ts": ts,
                    "updated_ts": ts,
                }
                for a in new_actions
            ],
        )

    async def enqueue_actions(self, new_actions: Sequence[NewAction]) -> None:
        if not new_actions:
            return
        await self._op_key()
        async with self.engine.begin() as conn:
            await self._insert_actions(conn, new_actions)

    async def due_actions(self, now: float, limit: int = 50) -> list[ActionRow]:
        async with self.engine.connect() as conn:
            result = await conn.execute(
                select(actions)
                .where(actions.c.status == "pending", actions.c.next_at <= now)
                .order_by(actions.c.next_at, actions.c.created_ts)
                .limit(limit)
            )
            rows = result.mappings().all()
        return await self._action_rows(rows)

    async def next_action_time(self) -> float | None:
        async with self.engine.connect() as conn:
            return (
                await conn.execute(
                    select(func.min(actions.c.next_at)).where(actions.c.status == "pending")
                )
            ).scalar()

    async def get_action(self, action_id: str) -> ActionRow | None:
        async with self.engine.connect() as conn:
            row = (
                (await conn.execute(select(actions).where(actions.c.id == action_id)))
                .mappings()
                .first()
            )
        if row is None:
            return None
        return (await self._action_rows([row]))[0]

    async def count_actions(
        self, kind: str, status: str, payload_match: Mapping[str, Any] | None = None
    ) -> int:
        """How many actions of ``kind`` have ``status`` (and a payload with these items).

        Payloads are sealed, so matching on them decrypts each candidate (used at start,
        e.g. for a rollout's remaining actions).
        """
        query = select(actions.c.id, actions.c.data).where(
            actions.c.status == status, actions.c.kind == kind
        )
        if not payload_match:
            async with self.engine.connect() as conn:
                return int(
                    (
                        await conn.execute(select(func.count()).select_from(query.subquery()))
                    ).scalar_one()
                )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        if not rows:
            return 0
        dk = await self._op_key_needed("an executor action")
        n = 0
        for aid, data in rows:
            obj = json.loads(self._op_open(dk, "actions", aid, "data", data, f"action {aid}"))
            payload = obj.get("payload") or {}
            if all(payload.get(k) == v for k, v in payload_match.items()):
                n += 1
        return n

    async def finish_action(
        self,
        action_id: str,
        *,
        status: str,
        attempts: int,
        next_at: float = 0.0,
        error: str | None = None,
        audit: AuditEntry | None = None,
    ) -> None:
        """Record an attempt's outcome (and its audit record) in one commit."""
        dk = await self._op_key() if error is not None else None

        async def run(conn: AsyncConnection) -> None:
            await conn.execute(
                update(actions)
                .where(actions.c.id == action_id)
                .values(
                    status=status,
                    attempts=attempts,
                    next_at=next_at,
                    last_error=None if dk is None else self._seal_error(dk, action_id, error),
                    updated_ts=now_ms(),
                )
            )
            if audit is not None:
                await self._append_audit(conn, [audit])

        await self._write(run)

    async def actions_by_status(self, status: str, limit: int = 100) -> list[ActionRow]:
        async with self.engine.connect() as conn:
            result = await conn.execute(
                select(actions)
                .where(actions.c.status == status)
                .order_by(actions.c.updated_ts.desc())
                .limit(limit)
            )
            rows = result.mappings().all()
        return await self._action_rows(rows)

    # -- state and rooms ----------------------------------------------------------------

    async def _put_state(self, conn: AsyncConnection, key: str, value: str) -> None:
        """Write a state value (sealed unless plain; the operational key must be loaded)."""
        stored = self._seal_state(None, key, value)
        updated = await conn.execute(update(state).where(state.c.key == key).values(value=stored))
        if updated.rowcount == 0:
            await conn.execute(insert(state).values(key=key, value=stored))

    async def get_state(self, key: str) -> str | None:
        async with self.engine.connect() as conn:
            stored = (await conn.execute(select(state.c.value).where(state.c.key == key))).scalar()
        if stored is None:
            return None
        dk = None if key in PLAIN_STATE_KEYS else await self._op_key(create=False)
        return self._open_state(dk, key, stored)

    async def get_states(self, keys: Sequence[str]) -> dict[str, str]:
        """Several state values at once (missing keys left out)."""
        if not keys:
            return {}
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(state.c.key, state.c.value).where(state.c.key.in_(list(keys)))
                )
            ).all()
        if not rows:
            return {}
        dk = await self._op_key(create=False)
        return {k: self._open_state(dk, k, v) for k, v in rows}

    async def set_state(self, key: str, value: str) -> None:
        if key not in PLAIN_STATE_KEYS:
            await self._op_key()
        async with self.engine.begin() as conn:
            await self._put_state(conn, key, value)

    async def upsert_room(
        self, room_id: str, *, joined: bool | None = None, lacking: str | None = None
    ) -> None:
        dk = await self._op_key()
        assert dk is not None
        async with self._room_data_lock(), self.engine.begin() as conn:
            await self._upsert_room_in(conn, dk, RoomUpdate(room_id, joined, lacking))

    async def _upsert_room_in(self, conn: AsyncConnection, dk: DataKey, room: RoomUpdate) -> None:
        """:meth:`upsert_room` inside ``conn``'s transaction (hold :meth:`_room_data_lock`)."""
        idx = self._bidx("room", room.room_id)
        values: dict[str, Any] = {"updated_ts": now_ms()}
        if room.joined is not None:
            values["joined"] = room.joined
        if room.lacking is not None:
            # Keep the other sealed fields (see update_rooms_data).
            old = (await self._room_objs(conn, dk, [idx])).get(idx, {})
            values["data"] = self._room_values(dk, room.room_id, room.lacking, old)["data"]
        result = await conn.execute(update(rooms).where(rooms.c.room_idx == idx).values(**values))
        if result.rowcount == 0:
            values.setdefault("joined", False)
            values.setdefault("data", self._room_values(dk, room.room_id, "")["data"])
            await conn.execute(insert(rooms).values(room_idx=idx, **values))

    async def update_rooms_data(self, updates: Mapping[str, Mapping[str, Any]]) -> int:
        """Merge fields into known rooms' sealed data, in one commit: ``{room_id: {field:
        value}}`` (``room_id`` and ``lacking`` are not fields of this kind). Rooms the
        store does not know are skipped; returns how many rooms were updated.
        :meth:`room_data` reads the fields back; :meth:`upsert_room` keeps them."""
        if not updates:
            return 0
        dk = await self._op_key()
        assert dk is not None
        by_idx = {self._bidx("room", r): r for r in updates}
        async with self._room_data_lock(), self.engine.begin() as conn:
            old = await self._room_objs(conn, dk, list(by_idx))
            for idx, obj in old.items():
                room = by_idx[idx]
                fields = {k: v for k, v in updates[room].items() if k not in ("room_id", "lacking")}
                data = self._room_values(dk, room, obj.get("lacking") or "", {**obj, **fields})
                await conn.execute(
                    update(rooms).where(rooms.c.room_idx == idx).values(data=data["data"])
                )
        return len(old)

    async def room_data(self) -> dict[str, dict[str, Any]]:
        """Every known room's sealed data by room ID: ``joined``, ``lacking`` and the fields
        written by :meth:`update_rooms_data`."""
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(select(rooms.c.room_idx, rooms.c.joined, rooms.c.data))
            ).all()
        if not rows:
            return {}
        dk = await self._op_key_needed("a known room")
        out: dict[str, dict[str, Any]] = {}
        for idx, joined, blob in rows:
            key = bytes(idx)
            obj = json.loads(self._op_open(dk, "rooms", key, "data", blob, "a known room"))
            room = obj.pop("room_id")
            obj["lacking"] = obj.get("lacking") or ""
            obj["joined"] = bool(joined)
            out[room] = obj
        return out

    async def upsert_rooms(self, room_ids: Iterable[str], *, joined: bool) -> None:
        """Mark many rooms joined (or not) in one commit; new ones lack nothing."""
        dk = await self._op_key()
        assert dk is not None
        by_idx = {self._bidx("room", r): r for r in room_ids}
        ts = now_ms()
        async with self.engine.begin() as conn:
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
                self._room_values(dk, room, "") | {"joined": joined, "updated_ts": ts}
                for idx, room in by_idx.items()
                if idx not in have
            ]
            if new:
                await conn.execute(insert(rooms), new)

    def _room_row(self, dk: DataKey, row: Any) -> dict[str, Any]:
        idx = bytes(row["room_idx"])
        obj = json.loads(self._op_open(dk, "rooms", idx, "data", row["data"], "a known room"))
        return {
            "room_id": obj["room_id"],
            "joined": bool(row["joined"]),
            "lacking": obj.get("lacking") or "",
            "updated_ts": row["updated_ts"],
        }

    async def list_rooms(self) -> list[dict[str, Any]]:
        """Every known room (room_id, joined, lacking, updated_ts), by room ID."""
        async with self.engine.connect() as conn:
            rows = (await conn.execute(select(rooms))).mappings().all()
        if not rows:
            return []
        dk = await self._op_key_needed("a known room")
        return sorted((self._room_row(dk, r) for r in rows), key=lambda r: r["room_id"])

    def room_order_key(self, room_id: str) -> bytes:
        """Where ``room_id`` sorts in :meth:`joined_rooms_page` ("" sorts first)."""
        return b"" if not room_id else self._bidx("room", room_id)

    async def joined_rooms_page(self, after: str, limit: int) -> list[tuple[str, str]]:
        """Joined rooms after ``after`` in :meth:`room_order_key` order (blind-index order,
        not ID order: the IDs are sealed): ``(room_id, lacking)``."""
        query = select(rooms.c.room_idx, rooms.c.joined, rooms.c.data, rooms.c.updated_ts).where(
            rooms.c.joined.is_(True)
        )
        if after:
            query = query.where(rooms.c.room_idx > self.room_order_key(after))
        query = query.order_by(rooms.c.room_idx).limit(limit)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).mappings().all()
        if not rows:
            return []
        dk = await self._op_key_needed("a known room")
        out = []
        for r in rows:
            room = self._room_row(dk, r)
            out.append((room["room_id"], room["lacking"]))
        return out
