"""Data keys and blind indexes: unlocking, unwrapping, creating, caching, re-wrapping.

The crypto context of a store: the keyring, the blind indexer and the cache of unwrapped
data keys, shared by every repository. A data key missing from ``data_keys`` is either
shredded (a chained ``shred`` record names it: its records read as "data key destroyed")
or unknown (deleted outside the bridge): a read of a record under an unknown key raises
StoreError naming the record.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from bridge.audit import decode
from bridge.audit.chain import SHRED_KIND
from bridge.audit.crypto import (
    OPERATIONAL_SCOPE,
    BlindIndexer,
    CryptoError,
    DataKey,
    KeyUnwrapError,
    WrappedKey,
    field_aad,
    rewrap,
    seal,
    unseal,
    unwrap_with_keyring,
    wrap,
)
from bridge.audit.keyring import Keyring, KeyringMissingError
from bridge.store.database import Database, log
from bridge.store.models import StoreError, now_ms
from bridge.store.schema import data_keys, records, state

#: A data key row as wrapped: ``WrappedKey(key_id, scope, kek_id, blob)``.
_WRAPPED = (data_keys.c.key_id, data_keys.c.scope, data_keys.c.kek_id, data_keys.c.blob)
INDEX_CHECK_KEY = "audit_index_check"


def _wrapped(row: Any) -> WrappedKey:
    key_id, scope, kek_id, blob = row
    return WrappedKey(key_id, bytes(scope), kek_id, bytes(blob))


class KeyRepository:
    """Blind indexes, the data-key cache, the operational key; key maintenance."""

    def __init__(
        self, db: Database, keyring: Keyring | None, keyring_path: Path | None = None
    ) -> None:
        self.db = db
        self.keyring = keyring
        self.keyring_path = keyring_path
        self._idx: BlindIndexer | None = None
        self._idx_cache: dict[tuple[str, str], bytes] = {}
        self.by_scope: dict[bytes, DataKey] = {}
        self.by_id: dict[str, DataKey] = {}
        #: Keys created in the open transaction (dropped from the cache if it fails).
        self._uncommitted: list[DataKey] = []
        #: Ids of data keys that shred records say were destroyed (filled as reads meet them).
        self.shredded: set[str] = set()
        self._op_lock = asyncio.Lock()

    # -- blind indexes -------------------------------------------------------------------

    def bidx(self, field_name: str, value: str) -> bytes:
        """The blind index of ``value`` in ``field_name`` (cached)."""
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
        return None if value is None else self.bidx(field_name, value)

    # -- the cache -----------------------------------------------------------------------

    def _unwrap(self, wk: WrappedKey) -> DataKey:
        assert self.keyring is not None
        try:
            dk = unwrap_with_keyring(self.keyring, wk)
        except KeyUnwrapError as e:
            raise StoreError(f"audit data key {wk.key_id!r}: {e}") from None
        self.cache(dk)
        return dk

    async def load(self, conn: AsyncConnection, where: Any) -> None:
        """Unwrap the data keys matching ``where`` into the cache."""
        for row in await conn.execute(select(*_WRAPPED).where(where)):
            self._unwrap(_wrapped(row))

    def new_key(self, scope: bytes, ts: int) -> tuple[DataKey, dict[str, Any]]:
        """A new data key for ``scope`` and its ``data_keys`` row (wrapped by the current
        KEK). Neither inserted nor cached yet: see :meth:`cache`."""
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

    def cache(self, dk: DataKey) -> None:
        """Keep ``dk`` in the cache (by scope and by id)."""
        self.by_scope[dk.scope] = dk
        self.by_id[dk.key_id] = dk

    def forget(self, scope: bytes) -> None:
        """Drop the cached data key of ``scope`` (deleted, or never committed)."""
        dk = self.by_scope.pop(scope, None)
        if dk is not None:
            self.by_id.pop(dk.key_id, None)

    def shredded_now(self, scope: bytes, key_id: str) -> None:
        """The data key ``key_id`` of ``scope`` was destroyed (committed)."""
        self.forget(scope)
        self.shredded.add(key_id)

    def committed(self) -> None:
        """The transaction that created keys committed: they stay cached."""
        self._uncommitted.clear()

    def rolled_back(self) -> None:
        """The transaction that created keys failed: forget them."""
        for dk in self._uncommitted:
            self.by_scope.pop(dk.scope, None)
            self.by_id.pop(dk.key_id, None)
        self._uncommitted.clear()

    async def for_scopes(self, conn: AsyncConnection, scopes: set[bytes]) -> None:
        """Make sure every scope has a data key in the cache, creating new ones in ``conn``."""
        missing = [s for s in scopes if s not in self.by_scope]
        if not missing:
            return
        await self.load(conn, data_keys.c.scope.in_(missing))
        new = [s for s in missing if s not in self.by_scope]
        if not new:
            return
        rows = []
        ts = now_ms()
        for scope in new:
            dk, row = self.new_key(scope, ts)
            rows.append(row)
            self.cache(dk)
            self._uncommitted.append(dk)
        await conn.execute(insert(data_keys), rows)

    async def by_ids(self, conn: AsyncConnection, key_ids: Iterable[str | None]) -> None:
        """Cache the data keys ``key_ids``; note which missing ones were shredded."""
        shredded = self.shredded
        missing = {
            k for k in key_ids if k is not None and k not in self.by_id and k not in shredded
        }
        if not missing:
            return
        await self.load(conn, data_keys.c.key_id.in_(missing))
        missing.difference_update(self.by_id)
        if missing:
            rows = await conn.execute(
                select(records.c.key_id).where(
                    records.c.kind == SHRED_KIND, records.c.key_id.in_(missing)
                )
            )
            shredded.update(r[0] for r in rows)

    def decrypt(
        self, seq: int, room: bytes | None, key_id: str | None, nonce: bytes, ct: bytes | None
    ) -> bytes | None:
        """Plaintext of a record; None if its ciphertext expired or its room key was shredded.

        Raises StoreError naming the record if it fails to authenticate, or if its data key
        is neither in the store nor named by a shred record (call :meth:`by_ids` first).
        See :func:`bridge.audit.decode.open_sealed`.
        """
        try:
            return decode.open_sealed(self.by_id, self.shredded, seq, room, key_id, nonce, ct)
        except decode.RecordError as e:
            raise StoreError(str(e)) from None

    def key_material(
        self, key_ids: Iterable[str | None]
    ) -> tuple[tuple[tuple[str, bytes, bytes], ...], frozenset[str]]:
        """What another process needs to open records under ``key_ids`` as this store would.

        ``((key_id, scope, key), …)`` for the ids whose data key is loaded (raw key material:
        hand it to a worker process through a pipe; never write or log it), and the ids
        among the others that shred records say were destroyed. Any other id is unknown:
        :func:`bridge.audit.decode.open_sealed` raises for its records. Call :meth:`by_ids`
        first (:meth:`RecordReader.iter_sealed_batches` does).
        """
        by_id, shredded = self.by_id, self.shredded
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

    # -- the operational key (rooms, actions, state values) -------------------------------

    async def op_key_in(self, conn: AsyncConnection) -> DataKey:
        """The operational data key, loaded or created inside ``conn``'s transaction.

        The caller must call :meth:`rolled_back` (or drop the store) if that transaction fails.
        """
        dk = self.by_scope.get(OPERATIONAL_SCOPE)
        if dk is None:
            await self.load(conn, data_keys.c.scope == OPERATIONAL_SCOPE)
            dk = self.by_scope.get(OPERATIONAL_SCOPE)
        if dk is None:
            dk, row = self.new_key(OPERATIONAL_SCOPE, now_ms())
            await conn.execute(insert(data_keys).values(**row))
            self.cache(dk)
        return dk

    async def op_key(self, *, create: bool = True) -> DataKey | None:
        """The operational data key; created (own commit) on first need unless ``create``
        is False (readers: None means nothing sealed can exist yet).

        Call it BEFORE opening a write transaction: on SQLite a second writer would wait.
        """
        dk = self.by_scope.get(OPERATIONAL_SCOPE)
        if dk is not None:
            return dk
        async with self._op_lock:
            dk = self.by_scope.get(OPERATIONAL_SCOPE)
            if dk is not None:
                return dk
            dk = await self._load_op_key()
            if dk is not None or not create:
                return dk
            try:
                async with self.db.transaction() as conn:
                    dk = await self.op_key_in(conn)
            except IntegrityError:  # another process created it first
                self.by_scope.pop(OPERATIONAL_SCOPE, None)
                dk = await self._load_op_key()
                if dk is None:
                    raise StoreError("the operational data key could not be created") from None
            except BaseException:
                self.forget(OPERATIONAL_SCOPE)
                raise
            return dk

    async def op_key_created(self) -> DataKey:
        """The operational data key, created on first need (see :meth:`op_key`)."""
        dk = await self.op_key()
        assert dk is not None
        return dk

    async def _load_op_key(self) -> DataKey | None:
        """Read the operational data key into the cache, if it exists."""
        async with self.db.connect() as conn:
            await self.load(conn, data_keys.c.scope == OPERATIONAL_SCOPE)
        return self.by_scope.get(OPERATIONAL_SCOPE)

    async def op_key_needed(self, what: str) -> DataKey:
        """The operational key for reading sealed data that exists (``what`` names it)."""
        dk = await self.op_key(create=False)
        if dk is None:
            raise StoreError(
                f"{what} is sealed but the operational data key is missing from data_keys "
                f"(the table was altered)"
            )
        return dk

    @staticmethod
    def op_seal(dk: DataKey, table: str, key: str | bytes, column: str, pt: bytes) -> bytes:
        """Seal one operational field (AAD: table, row key, column)."""
        return seal(dk, field_aad(table, key, column), pt)

    @staticmethod
    def op_open(
        dk: DataKey, table: str, key: str | bytes, column: str, blob: bytes, what: str
    ) -> bytes:
        """Open one operational field; StoreError naming ``what`` if it fails."""
        try:
            return unseal(dk, field_aad(table, key, column), bytes(blob))
        except CryptoError as e:
            raise StoreError(f"{what} ({table}.{column}): {e}") from None

    # -- unlocking and maintenance -------------------------------------------------------

    async def unlock(self, conn: AsyncConnection, *, empty: bool) -> bool:
        """Check the keyring against the stored data keys (generating one for an ``empty``
        store without any); True if the index check value must still be written."""
        if self.keyring is None:
            if not empty:
                where = f" ({self.keyring_path} does not exist)" if self.keyring_path else ""
                raise KeyringMissingError(
                    f"no audit keyring{where}, but the database already holds encrypted "
                    f"audit records: restore the keyring from your backup (file, or the "
                    f"environment variable BRIDGE_AUDIT_KEYRING); without it the archive "
                    f"cannot be read"
                )
            self.keyring = Keyring.generate()
            if self.keyring_path is not None:
                self.keyring_path.parent.mkdir(parents=True, exist_ok=True)
                self.keyring.save(self.keyring_path)
                log.warning(
                    "GENERATED A NEW AUDIT KEYRING at %s (KEK %s). BACK IT UP NOW and keep "
                    "it apart from the database backups: without it the audit archive "
                    "cannot be decrypted, with it anyone holding the database can read it",
                    self.keyring_path,
                    self.keyring.current.id,
                )
            else:
                log.info("audit store uses an ephemeral in-memory keyring (no keyring given)")
        keyring = self.keyring
        self._idx = BlindIndexer(keyring.index_key)
        self._idx_cache.clear()
        # One data key per KEK proves the KEK's material; missing KEKs are named.
        by_kek = (
            await conn.execute(
                select(data_keys.c.kek_id, func.count(), func.min(data_keys.c.key_id)).group_by(
                    data_keys.c.kek_id
                )
            )
        ).all()
        missing = [(kek, n) for kek, n, _ in by_kek if kek not in keyring]
        if missing:
            needed = ", ".join(f"{kek!r} ({n} data keys)" for kek, n in missing)
            raise StoreError(
                f"{keyring.source} cannot unwrap the stored data keys: missing KEK {needed}; "
                f"the keyring has: {', '.join(keyring.kek_ids)}. Restore the keyring that "
                f"contains them"
            )
        for _kek, _n, key_id in by_kek:
            await self.load(conn, data_keys.c.key_id.in_([key_id]))
        check = self._idx("keycheck", "bridge-audit-index-v1")
        assert check is not None
        stored = (
            await conn.execute(select(state.c.value).where(state.c.key == INDEX_CHECK_KEY))
        ).scalar()
        if stored is None:
            return True
        if stored != check.hex():
            raise StoreError(
                f"{keyring.source}: its index_key is not the one this database was written "
                f"with (blind indexes would not match); restore the original keyring"
            )
        return False

    def index_check(self) -> str:
        """The value stored under ``audit_index_check`` for this keyring's index key."""
        assert self._idx is not None
        check = self._idx("keycheck", "bridge-audit-index-v1")
        assert check is not None
        return check.hex()

    @property
    def index(self) -> BlindIndexer:
        """The blind indexer (the keys must be unlocked)."""
        assert self._idx is not None
        return self._idx

    async def rewrap(self, batch: int = 500) -> int:
        """Re-wrap every data key under the keyring's current KEK; returns how many changed.

        Records are not touched. Run after ``keyring.add_kek()``; afterwards the old KEK
        can be removed from the keyring. Takes the write lock (no append meanwhile).
        """
        assert self.keyring is not None
        keyring = self.keyring
        changed = 0
        last = ""
        while True:
            async with self.db.write_lock, self.db.transaction() as conn:
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

    async def rewrap_stale(self) -> None:
        """Re-wrap the data keys left under an older KEK (logged); see :meth:`rewrap`."""
        assert self.keyring is not None
        current = self.keyring.current.id
        stale = {k: n for k, n in (await self.kek_usage()).items() if k != current}
        if not stale:
            return
        changed = await self.rewrap()
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
        async with self.db.connect() as conn:
            rows = await conn.execute(
                select(data_keys.c.kek_id, func.count()).group_by(data_keys.c.kek_id)
            )
            return {k: n for k, n in rows}
