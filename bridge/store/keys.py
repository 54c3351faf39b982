"""Data keys and blind indexes: unwrapping, creating, caching, re-wrapping.

A data key missing from ``data_keys`` is either shredded (a chained ``shred`` record names
it: its records read as "data key destroyed") or unknown (deleted outside the bridge): a
read of a record under an unknown key raises StoreError naming the record.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from bridge.audit import decode  # a module, not its names: it imports this package's codec
from bridge.audit.chain import SHRED_KIND
from bridge.audit.crypto import (
    DataKey,
    KeyUnwrapError,
    WrappedKey,
    rewrap,
    unwrap_with_keyring,
    wrap,
)
from bridge.store.core import StoreCore, log
from bridge.store.models import StoreError, now_ms
from bridge.store.schema import data_keys, records

#: A data key row as wrapped: ``WrappedKey(key_id, scope, kek_id, blob)``.
_WRAPPED = (data_keys.c.key_id, data_keys.c.scope, data_keys.c.kek_id, data_keys.c.blob)


def _wrapped(row: Any) -> WrappedKey:
    key_id, scope, kek_id, blob = row
    return WrappedKey(key_id, bytes(scope), kek_id, bytes(blob))


class KeysMixin(StoreCore):
    """Blind indexes and the data-key cache; key maintenance (re-wrap)."""

    #: Ids of data keys that shred records say were destroyed (filled as reads meet them).
    _shredded_cache: set[str] | None = None

    @property
    def _shredded(self) -> set[str]:
        if self._shredded_cache is None:
            self._shredded_cache = set()
        return self._shredded_cache

    def _bidx(self, field_name: str, value: str) -> bytes:
        key = (field_name, value)
        out = self._idx_cache.get(key)
        if out is None:
            if len(self._idx_cache) > 200_000:
                self._idx_cache.clear()
            assert self._idx is not None
            out = self._idx(field_name, value)
            assert out is not None
            self._idx_cache[key] = out
        return out

    def blind(self, field_name: str, value: str | None) -> bytes | None:
        """The blind index of ``value`` in ``field_name`` (event_id, room, sender, type)."""
        return None if value is None else self._bidx(field_name, value)

    def _unwrap(self, wk: WrappedKey) -> DataKey:
        assert self.keyring is not None
        try:
            dk = unwrap_with_keyring(self.keyring, wk)
        except KeyUnwrapError as e:
            raise StoreError(f"audit data key {wk.key_id!r}: {e}") from None
        self._cache_key(dk)
        return dk

    async def _load_keys(self, conn: AsyncConnection, where: Any) -> None:
        for row in await conn.execute(select(*_WRAPPED).where(where)):
            self._unwrap(_wrapped(row))

    def _new_key(self, scope: bytes, ts: int) -> tuple[DataKey, dict[str, Any]]:
        """A new data key for ``scope`` and its ``data_keys`` row (wrapped by the current
        KEK). Neither inserted nor cached yet: see :meth:`_cache_key`."""
        assert self.keyring is not None
        dk = DataKey.generate(scope)
        wk = wrap(self.keyring.current, dk)
        row = {
            "key_id": wk.key_id,
            "scope": wk.scope,
            "kek_id": wk.kek_id,
            "blob": wk.blob,
            "created_ts": ts,
        }
        return dk, row

    def _cache_key(self, dk: DataKey) -> None:
        self._keys_by_scope[dk.scope] = dk
        self._keys_by_id[dk.key_id] = dk

    def _forget_key(self, scope: bytes) -> None:
        """Drop the cached data key of ``scope`` (deleted, or never committed)."""
        dk = self._keys_by_scope.pop(scope, None)
        if dk is not None:
            self._keys_by_id.pop(dk.key_id, None)

    async def _keys_for_scopes(self, conn: AsyncConnection, scopes: set[bytes]) -> None:
        """Make sure every scope has a data key in the cache, creating new ones."""
        missing = [s for s in scopes if s not in self._keys_by_scope]
        if not missing:
            return
        await self._load_keys(conn, data_keys.c.scope.in_(missing))
        new = [s for s in missing if s not in self._keys_by_scope]
        if not new:
            return
        rows = []
        ts = now_ms()
        for scope in new:
            dk, row = self._new_key(scope, ts)
            rows.append(row)
            self._cache_key(dk)
            self._uncommitted_keys.append(dk)
        await conn.execute(insert(data_keys), rows)

    async def _keys_by_ids(self, conn: AsyncConnection, key_ids: Iterable[str | None]) -> None:
        """Cache the data keys ``key_ids``; note which missing ones were shredded."""
        shredded = self._shredded
        missing = {
            k for k in key_ids if k is not None and k not in self._keys_by_id and k not in shredded
        }
        if not missing:
            return
        await self._load_keys(conn, data_keys.c.key_id.in_(missing))
        missing.difference_update(self._keys_by_id)
        if missing:
            rows = await conn.execute(
                select(records.c.key_id).where(
                    records.c.kind == SHRED_KIND, records.c.key_id.in_(missing)
                )
            )
            shredded.update(r[0] for r in rows)

    def _decrypt(
        self, seq: int, room: bytes | None, key_id: str | None, nonce: bytes, ct: bytes | None
    ) -> bytes | None:
        """Plaintext of a record; None if its ciphertext expired or its room key was shredded.

        Raises StoreError naming the record if it fails to authenticate, or if its data key
        is neither in the store nor named by a shred record (call :meth:`_keys_by_ids`
        first). See :func:`bridge.audit.decode.open_sealed`.
        """
        return decode.open_sealed(self._keys_by_id, self._shredded, seq, room, key_id, nonce, ct)

    def key_material(
        self, key_ids: Iterable[str | None]
    ) -> tuple[tuple[tuple[str, bytes, bytes], ...], frozenset[str]]:
        """What another process needs to open records under ``key_ids`` as this store would.

        ``((key_id, scope, key), …)`` for the ids whose data key is loaded (raw key material:
        hand it to a worker process through a pipe; never write or log it), and the ids
        among the others that shred records say were destroyed. Any other id is unknown:
        :func:`bridge.audit.decode.open_sealed` raises for its records. Call
        :meth:`_keys_by_ids` first (:meth:`iter_sealed_batches` does).
        """
        by_id, shredded = self._keys_by_id, self._shredded
        keys = []
        gone = []
        for k in set(key_ids):
            if k is None:
                continue
            dk = by_id.get(k)
            if dk is not None:
                keys.append((k, dk.scope, dk.key))
            elif k in shredded:
                gone.append(k)
        return tuple(keys), frozenset(gone)

    async def rewrap_data_keys(self, batch: int = 500) -> int:
        """Re-wrap every data key under the keyring's current KEK; returns how many changed.

        Records are not touched. Run after ``keyring.add_kek()``; afterwards the old KEK
        can be removed from the keyring.
        """
        assert self.keyring is not None
        keyring = self.keyring
        changed = 0
        last = ""
        while True:
            async with self._append_lock, self.engine.begin() as conn:
                rows = (
                    await conn.execute(
                        select(*_WRAPPED)
                        .where(data_keys.c.key_id > last)
                        .order_by(data_keys.c.key_id)
                        .limit(batch)
                    )
                ).all()
                for row in rows:
                    wk = _wrapped(row)
                    try:
                        new = rewrap(keyring, wk)
                    except KeyUnwrapError as e:
                        raise StoreError(f"audit data key {wk.key_id!r}: {e}") from None
                    if new is not wk:
                        await conn.execute(
                            update(data_keys)
                            .where(data_keys.c.key_id == wk.key_id)
                            .values(kek_id=new.kek_id, blob=new.blob)
                        )
                        changed += 1
            if not rows:
                return changed
            last = rows[-1][0]

    async def _rewrap_stale_keys(self) -> None:
        assert self.keyring is not None
        current = self.keyring.current.id
        stale = {k: n for k, n in (await self.kek_usage()).items() if k != current}
        if not stale:
            return
        changed = await self.rewrap_data_keys()
        log.warning(
            "re-wrapped %d audit data keys under the current KEK %s (they used %s); once "
            "the keyring file is backed up, the old KEKs can be removed with "
            "`audit rotate-key --remove-old`",
            changed,
            current,
            ", ".join(sorted(stale)),
        )

    async def kek_usage(self) -> dict[str, int]:
        """How many data keys each KEK wraps."""
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(data_keys.c.kek_id, func.count()).group_by(data_keys.c.kek_id)
            )
            return {k: n for k, n in rows}
