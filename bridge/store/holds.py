"""Legal holds on rooms and users (sealed, audited)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

from sqlalchemy import delete, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

from bridge.audit.codec import dumps
from bridge.audit.crypto import GLOBAL_SCOPE
from bridge.audit.kinds import AuditKind
from bridge.store.database import Database
from bridge.store.keys import KeyRepository
from bridge.store.models import AuditEntry, HoldInfo, Holds, StoreError, now_ms
from bridge.store.records import RecordLog
from bridge.store.schema import legal_holds
from bridge.store.state import EXPIRY_CURSOR_KEY, StateRepository

HOLD_SCOPES = ("room", "user")


def _hold_where(scope: str, tidx: bytes) -> tuple[Any, ...]:
    """The legal_holds row of one target."""
    return (legal_holds.c.scope == scope, legal_holds.c.target_idx == tidx)


class HoldRepository:
    """Legal holds: sealed under the global data key, each change audited in its commit."""

    def __init__(
        self, db: Database, keys: KeyRepository, records: RecordLog, state: StateRepository
    ) -> None:
        self.db = db
        self.keys = keys
        self.records = records
        self.state = state

    def _hold_aad(self, scope: str, target_idx: bytes) -> bytes:
        return b"PBHOLD1" + scope.encode() + b"\x00" + target_idx

    def _hold_idx(self, scope: str, target: str) -> bytes:
        if scope not in HOLD_SCOPES:
            raise ValueError(f"hold scope must be room or user, not {scope!r}")
        return self.keys.bidx("room" if scope == "room" else "sender", target)

    async def read(self, conn: AsyncConnection) -> list[HoldInfo]:
        rows = (
            await conn.execute(
                select(
                    legal_holds.c.scope,
                    legal_holds.c.target_idx,
                    legal_holds.c.source,
                    legal_holds.c.set_ts,
                    legal_holds.c.key_id,
                    legal_holds.c.nonce,
                    legal_holds.c.ciphertext,
                ).order_by(legal_holds.c.set_ts)
            )
        ).all()
        await self.keys.by_ids(conn, {r[4] for r in rows})
        out = []
        for scope, tidx, source, set_ts, key_id, nonce, ct in rows:
            dk = self.keys.by_id.get(key_id)
            if dk is None:
                raise StoreError(f"legal hold on a {scope}: its data key {key_id!r} is missing")
            try:
                obj = json.loads(
                    dk.aead.decrypt(bytes(nonce), bytes(ct), self._hold_aad(scope, bytes(tidx)))
                )
            except Exception:
                raise StoreError(
                    f"legal hold on a {scope} (set at {set_ts}) fails to authenticate: the "
                    f"legal_holds table was altered"
                ) from None
            out.append(
                HoldInfo(
                    scope, str(obj["target"]), source, set_ts, obj.get("by"), obj.get("reason")
                )
            )
        return out

    async def entries(self) -> list[HoldInfo]:
        """Every legal hold (rooms and users), oldest first, decrypted."""
        async with self.db.connect() as conn:
            return await self.read(conn)

    async def current(self) -> Holds:
        """The room IDs and user IDs on legal hold (config and commands alike).

        Archive expiry skips their records; the room-retention purge must skip these rooms
        and should leave held users' messages alone.
        """
        infos = await self.entries()
        return Holds(
            frozenset(h.target for h in infos if h.scope == "room"),
            frozenset(h.target for h in infos if h.scope == "user"),
        )

    async def _put_hold(
        self,
        conn: AsyncConnection,
        scope: str,
        target: str,
        *,
        source: str,
        by: str | None,
        reason: str | None,
        ts: int,
    ) -> None:
        tidx = self._hold_idx(scope, target)
        await self.keys.for_scopes(conn, {GLOBAL_SCOPE})
        dk = self.keys.by_scope[GLOBAL_SCOPE]
        nonce = os.urandom(12)
        ct = dk.aead.encrypt(
            nonce,
            dumps({"target": target, "by": by, "reason": reason}),
            self._hold_aad(scope, tidx),
        )
        await conn.execute(delete(legal_holds).where(*_hold_where(scope, tidx)))
        await conn.execute(
            insert(legal_holds).values(
                scope=scope,
                target_idx=tidx,
                source=source,
                set_ts=ts,
                key_id=dk.key_id,
                nonce=nonce,
                ciphertext=ct,
            )
        )

    async def _lift_hold(self, conn: AsyncConnection, scope: str, tidx: bytes) -> None:
        await conn.execute(delete(legal_holds).where(*_hold_where(scope, tidx)))
        # lifted: the next expiry run looks at the records it skipped again
        await self.state.put(conn, EXPIRY_CURSOR_KEY, "0")

    def _hold_entry(
        self, action: str, scope: str, target: str, by: str | None, reason: str | None, source: str
    ) -> AuditEntry:
        return AuditEntry(
            AuditKind.HOLD,
            {
                "action": action,
                "scope": scope,
                "target": target,
                "by": by,
                "reason": reason,
                "source": source,
            },
            room_id=target if scope == "room" else None,
            sender=by,
            type=f"hold.{action}",
        )

    async def set(
        self,
        scope: str,
        target: str,
        on: bool,
        *,
        by: str | None,
        reason: str | None = None,
    ) -> str:
        """Put a room or user on legal hold, or lift it; audited in the same commit.

        Returns "on", "off", "unchanged" (already in that state) or "config" (an ``off`` of
        a hold that comes from the configuration, which only the config can lift).
        """
        tidx = self._hold_idx(scope, target)

        async def run(conn: AsyncConnection) -> str:
            row = (
                await conn.execute(select(legal_holds.c.source).where(*_hold_where(scope, tidx)))
            ).first()
            ts = now_ms()
            if on:
                if row is not None:
                    return "unchanged"
                await self._put_hold(
                    conn, scope, target, source="command", by=by, reason=reason, ts=ts
                )
            else:
                if row is None:
                    return "unchanged"
                if row[0] == "config":
                    return "config"
                await self._lift_hold(conn, scope, tidx)
            entry = self._hold_entry("on" if on else "off", scope, target, by, reason, "command")
            await self.records.append_audit(conn, [entry], ts)
            return "on" if on else "off"

        return await self.records.write(run)

    async def sync_config(self, rooms: Iterable[str], users: Iterable[str]) -> int:
        """Make the config-sourced holds equal ``audit.legal_hold``; audit each change.

        A target already held by a command becomes config-held; a config hold that left the
        configuration is lifted. Returns the number of changes.
        """
        wanted = {("room", r) for r in rooms} | {("user", u) for u in users}

        async def run(conn: AsyncConnection) -> int:
            current = {(h.scope, h.target): h for h in await self.read(conn)}
            ts = now_ms()
            entries = []
            for scope, target in sorted(wanted):
                have = current.get((scope, target))
                if have is not None and have.source == "config":
                    continue
                await self._put_hold(
                    conn, scope, target, source="config", by="config", reason=None, ts=ts
                )
                entries.append(self._hold_entry("on", scope, target, "config", None, "config"))
            for (scope, target), h in current.items():
                if h.source == "config" and (scope, target) not in wanted:
                    await self._lift_hold(conn, scope, self._hold_idx(scope, target))
                    entries.append(self._hold_entry("off", scope, target, "config", None, "config"))
            if entries:
                await self.records.append_audit(conn, entries, ts)
            return len(entries)

        return await self.records.write(run)
