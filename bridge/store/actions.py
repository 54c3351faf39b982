"""The executor's durable queue of actions, sealed under the operational key."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import Select

from bridge.audit.codec import dumps
from bridge.audit.crypto import OPERATIONAL_SCOPE, DataKey
from bridge.store.database import Database
from bridge.store.keys import KeyRepository
from bridge.store.models import ActionRow, AuditEntry, NewAction, now_ms
from bridge.store.records import RecordLog
from bridge.store.schema import actions


class ActionQueue:
    """Pending, done and failed executor actions; outcomes audited in their commit."""

    def __init__(self, db: Database, keys: KeyRepository, records: RecordLog) -> None:
        self.db = db
        self.keys = keys
        self.records = records

    def values(
        self, dk: DataKey, action_id: str, room_id: str | None, payload: Any
    ) -> dict[str, Any]:
        """The ``id``, ``room_idx`` and sealed ``data`` columns of an action row."""
        data = dumps({"room_id": room_id, "payload": payload})
        return {
            "id": action_id,
            "room_idx": None if room_id is None else self.keys.bidx("room", room_id),
            "data": self.keys.op_seal(dk, "actions", action_id, "data", data),
        }

    def seal_error(self, dk: DataKey, action_id: str, error: str | None) -> bytes | None:
        """The sealed ``last_error`` column (None stays None)."""
        if error is None:
            return None
        pt = error.encode("utf-8", "surrogatepass")
        return self.keys.op_seal(dk, "actions", action_id, "last_error", pt)

    def _row(self, dk: DataKey, row: Any) -> ActionRow:
        aid = row["id"]
        what = f"action {aid}"
        obj = json.loads(self.keys.op_open(dk, "actions", aid, "data", row["data"], what))
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
            else self.keys.op_open(dk, "actions", aid, "last_error", err, what).decode(
                "utf-8", "surrogatepass"
            ),
        )

    async def select(self, query: Select[Any]) -> list[ActionRow]:
        """The actions ``query`` (a ``select(actions)``) finds, opened."""
        async with self.db.connect() as conn:
            rows = (await conn.execute(query)).mappings().all()
        if not rows:
            return []
        dk = await self.keys.op_key_needed("an executor action")
        return [self._row(dk, r) for r in rows]

    async def insert(self, conn: AsyncConnection, new_actions: Sequence[NewAction]) -> None:
        """Insert sealed actions in ``conn``; the operational key must be loaded
        (:meth:`KeyRepository.op_key`, before the transaction)."""
        if not new_actions:
            return
        dk = self.keys.by_scope[OPERATIONAL_SCOPE]
        ts = now_ms()
        await conn.execute(
            insert(actions),
            [
                self.values(dk, a.id, a.room_id, dict(a.payload))
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

    async def enqueue(self, new_actions: Sequence[NewAction]) -> None:
        """Insert actions in their own commit."""
        if not new_actions:
            return
        await self.keys.op_key()
        async with self.db.transaction() as conn:
            await self.insert(conn, new_actions)

    async def due(self, now: float, limit: int = 50) -> list[ActionRow]:
        """Pending actions due at ``now`` (unix time), the earliest first."""
        return await self.select(
            select(actions)
            .where(actions.c.status == "pending", actions.c.next_at <= now)
            .order_by(actions.c.next_at, actions.c.created_ts)
            .limit(limit)
        )

    async def next_time(self) -> float | None:
        """When the next pending action is due (unix time), or None."""
        async with self.db.connect() as conn:
            return (
                await conn.execute(
                    select(func.min(actions.c.next_at)).where(actions.c.status == "pending")
                )
            ).scalar()

    async def pending_count(self) -> int:
        """How many actions are waiting."""
        async with self.db.connect() as conn:
            return int(
                (
                    await conn.execute(select(func.count()).where(actions.c.status == "pending"))
                ).scalar_one()
            )

    async def count(
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
            async with self.db.connect() as conn:
                return int(
                    (
                        await conn.execute(select(func.count()).select_from(query.subquery()))
                    ).scalar_one()
                )
        async with self.db.connect() as conn:
            rows = (await conn.execute(query)).all()
        if not rows:
            return 0
        dk = await self.keys.op_key_needed("an executor action")
        n = 0
        for aid, data in rows:
            obj = json.loads(self.keys.op_open(dk, "actions", aid, "data", data, f"action {aid}"))
            payload = obj.get("payload") or {}
            if all(payload.get(k) == v for k, v in payload_match.items()):
                n += 1
        return n

    async def finish(
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
        dk = await self.keys.op_key() if error is not None else None

        async def run(conn: AsyncConnection) -> None:
            await conn.execute(
                update(actions)
                .where(actions.c.id == action_id)
                .values(
                    status=status,
                    attempts=attempts,
                    next_at=next_at,
                    last_error=None if dk is None else self.seal_error(dk, action_id, error),
                    updated_ts=now_ms(),
                )
            )
            if audit is not None:
                await self.records.append_audit(conn, [audit])

        await self.records.write(run)
