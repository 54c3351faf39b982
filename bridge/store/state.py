"""Small key/value state (``bridge_state``), sealed under the operational key."""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable, Sequence

from sqlalchemy import insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from bridge.audit.crypto import OPERATIONAL_SCOPE, DataKey
from bridge.store.changes import publish
from bridge.store.database import Database
from bridge.store.keys import INDEX_CHECK_KEY, KeyRepository
from bridge.store.models import StoreError
from bridge.store.schema import state

EXPIRY_CURSOR_KEY = "audit_expiry_cursor"
#: ``bridge_state`` keys kept in plaintext: the store reads them before the keys are
#: unlocked, and they name no one. Every other value is sealed (``enc:`` + base64).
PLAIN_STATE_KEYS = frozenset({"schema_version", INDEX_CHECK_KEY, EXPIRY_CURSOR_KEY})
SEALED_PREFIX = "enc:"


class StateRepository:
    """State values by key: sealed unless in :data:`PLAIN_STATE_KEYS`."""

    def __init__(self, db: Database, keys: KeyRepository) -> None:
        self.db = db
        self.keys = keys
        #: Which keys every replica caches: a write of one publishes a change notice
        #: (:mod:`.changes`) in its transaction. Set by the wiring; none by default.
        self.broadcast: Callable[[str], bool] = lambda _key: False

    def _seal(self, key: str, value: str) -> str:
        if key in PLAIN_STATE_KEYS:
            return value
        dk = self.keys.by_scope.get(OPERATIONAL_SCOPE)
        if dk is None:
            raise StoreError(f"cannot seal bridge_state {key!r}: no operational key loaded")
        blob = self.keys.op_seal(
            dk, "bridge_state", key, "value", value.encode("utf-8", "surrogatepass")
        )
        return SEALED_PREFIX + base64.b64encode(blob).decode("ascii")

    def _open(self, dk: DataKey | None, key: str, stored: str) -> str:
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
        pt = self.keys.op_open(dk, "bridge_state", key, "value", blob, f"state {key!r}")
        return pt.decode("utf-8", "surrogatepass")

    @staticmethod
    def needs_key(keys: Sequence[str]) -> bool:
        """Whether writing these keys needs the operational key (:meth:`KeyRepository.op_key`
        before the transaction)."""
        return any(k not in PLAIN_STATE_KEYS for k in keys)

    async def put(self, conn: AsyncConnection, key: str, value: str) -> None:
        """Write a state value in ``conn`` (sealed unless plain; the operational key must be
        loaded)."""
        stored = self._seal(key, value)
        updated = await conn.execute(update(state).where(state.c.key == key).values(value=stored))
        if updated.rowcount == 0:
            await conn.execute(insert(state).values(key=key, value=stored))
        if self.broadcast(key):
            await publish(conn, self.db.backend, key)

    async def merge(self, key: str, combine: Callable[[str | None], Awaitable[str]]) -> str:
        """Read-modify-write ``key`` in one transaction, the row locked (PostgreSQL) so
        replicas writing the same key concurrently do not lose each other's changes:
        ``combine(stored value or None)`` returns the value written (and returned)."""
        if key not in PLAIN_STATE_KEYS:
            await self.keys.op_key()
        async with self.db.transaction() as conn:
            query = select(state.c.value).where(state.c.key == key)
            if not self.db.sqlite:
                # a row to lock even on first use ("" reads as "nothing stored")
                await conn.execute(
                    pg_insert(state)
                    .values(key=key, value=self._seal(key, ""))
                    .on_conflict_do_nothing(index_elements=[state.c.key])
                )
                query = query.with_for_update()
            stored = (await conn.execute(query)).scalar()
            current = None
            if stored is not None:
                dk = None if key in PLAIN_STATE_KEYS else await self.keys.op_key(create=False)
                current = self._open(dk, key, stored) or None
            value = await combine(current)
            await self.put(conn, key, value)
        return value

    async def get(self, key: str) -> str | None:
        """The value of ``key``, or None."""
        async with self.db.connect() as conn:
            stored = (await conn.execute(select(state.c.value).where(state.c.key == key))).scalar()
        if stored is None:
            return None
        dk = None if key in PLAIN_STATE_KEYS else await self.keys.op_key(create=False)
        return self._open(dk, key, stored)

    async def get_many(self, keys: Sequence[str]) -> dict[str, str]:
        """Several state values at once (missing keys left out)."""
        if not keys:
            return {}
        async with self.db.connect() as conn:
            rows = (
                await conn.execute(
                    select(state.c.key, state.c.value).where(state.c.key.in_(list(keys)))
                )
            ).all()
        if not rows:
            return {}
        dk = await self.keys.op_key(create=False)
        return {k: self._open(dk, k, v) for k, v in rows}

    async def set(self, key: str, value: str) -> None:
        """Write one value in its own commit."""
        if key not in PLAIN_STATE_KEYS:
            await self.keys.op_key()
        async with self.db.transaction() as conn:
            await self.put(conn, key, value)

    async def seal_plaintext(self, conn: AsyncConnection) -> None:
        """Seal every value still in plaintext (schemas 1 and 2), in ``conn``."""
        for key, value in (await conn.execute(select(state.c.key, state.c.value))).all():
            if key not in PLAIN_STATE_KEYS and not value.startswith(SEALED_PREFIX):
                await self.put(conn, key, value)
