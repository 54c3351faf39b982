"""The durable store: the encrypted audit records, the work queue, executor actions, state.

All writes that must be atomic go through one method each (``ingest_transaction``,
``complete_work``), so callers cannot split what belongs in one commit. Appends to the
record sequence are serialised by an in-process lock: one bridge process owns a store
(another process appending, e.g. ``audit export`` recording itself, makes a concurrent
append fail on the seq primary key; the store then reloads the chain head and retries once).

Records are the audit store of issue 3 (see :mod:`bridge.audit.crypto` and
:mod:`bridge.audit.chain`): each record's JSON is AES-256-GCM ciphertext under its room's
data key (wrapped by the keyring's current KEK), queryable fields are blind indexes, and
every record is hash-chained to the previous one. The chain head is kept in memory (read
from the last row at open, never recomputed); a signed checkpoint is written every
``checkpoint_every`` records, after every removal record and at :meth:`Store.close`, into
the ``checkpoints`` table and appended to the checkpoint log file (outside the database).
A store opened with ``sign_checkpoints=False`` (the audit CLI) signs none: it may append
(an export records itself), and the bridge's next checkpoint covers that.

:class:`Store` is put together from mixins, one module each, over :class:`.core.StoreCore`
(the shared state): :mod:`.keys` (data keys, blind indexes), :mod:`.records` (appends,
chain, checkpoints, ingest), :mod:`.reading` (iteration, search), :mod:`.operational`
(sealed rooms, actions, state), :mod:`.workqueue`, :mod:`.holds`, :mod:`.expiry`,
:mod:`.migrations` (schema and unlock) and :mod:`.stats`; :mod:`.engine` makes the engine,
:mod:`.chain` reads the chain for verification, :mod:`.models` holds the value types.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy.exc import SQLAlchemyError

from bridge.audit.keyring import Keyring
from bridge.store.archive_expiry import ExpiryMixin, load_removals
from bridge.store.chain import iter_chain, iter_chain_batches, load_checkpoints
from bridge.store.core import log
from bridge.store.engine import connect
from bridge.store.holds import HOLD_SCOPES
from bridge.store.migrations import MigrationsMixin
from bridge.store.models import (
    ActionRow,
    AuditEntry,
    ExpiryReport,
    HoldInfo,
    Holds,
    IngestResult,
    NewAction,
    RecordMeta,
    RoomUpdate,
    SearchGroup,
    SearchSummary,
    StoredEvent,
    StoreError,
    StoreStats,
    StoreUnavailable,
    WorkItem,
    now_ms,
)
from bridge.store.operational import EXPIRY_CURSOR_KEY, INDEX_CHECK_KEY, PLAIN_STATE_KEYS
from bridge.store.reading import ReadingMixin
from bridge.store.records import AUDIT_KINDS
from bridge.store.stats import StatsMixin
from bridge.store.workqueue import WorkQueueMixin

__all__ = [
    "AUDIT_KINDS",
    "EXPIRY_CURSOR_KEY",
    "HOLD_SCOPES",
    "INDEX_CHECK_KEY",
    "PLAIN_STATE_KEYS",
    "ActionRow",
    "AuditEntry",
    "ExpiryReport",
    "HoldInfo",
    "Holds",
    "IngestResult",
    "NewAction",
    "RecordMeta",
    "RoomUpdate",
    "SearchGroup",
    "SearchSummary",
    "Store",
    "StoreError",
    "StoreStats",
    "StoreUnavailable",
    "StoredEvent",
    "WorkItem",
    "iter_chain",
    "iter_chain_batches",
    "load_checkpoints",
    "load_removals",
    "now_ms",
]


class Store(MigrationsMixin, ExpiryMixin, WorkQueueMixin, ReadingMixin, StatsMixin):
    """Async facade over the database. Create with :meth:`open`.

    ``keyring`` unlocks the data keys; without one, a fresh in-memory keyring is generated
    for an empty database (saved to ``keyring_path`` when given, else ephemeral: tests and
    benchmarks) and a non-empty database is refused. ``signing_key`` signs checkpoints
    (ephemeral when omitted); ``checkpoint_log`` is the file checkpoints are appended to;
    with ``sign_checkpoints=False`` no checkpoint is signed at all.
    """

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        pool_size: int = 10,
        create: bool = True,
        keyring: Keyring | None = None,
        keyring_path: Path | None = None,
        signing_key: Ed25519PrivateKey | None = None,
        checkpoint_every: int = 1000,
        checkpoint_log: Path | None = None,
        rewrap_keys: bool = False,
        sign_checkpoints: bool = True,
    ) -> Store:
        """Connect, create or migrate the schema, unlock the audit keys.

        With ``rewrap_keys``, data keys still wrapped by an older KEK of the keyring are
        re-wrapped under the current one (finishing a ``rotate-key`` done while a bridge
        with the old keyring kept creating data keys).

        Raises StoreUnavailable if unreachable, StoreError if the keyring does not fit the
        stored data keys, KeyringMissingError if the database holds records but no keyring
        was given.
        """
        engine, parsed = connect(url, pool_size=pool_size)
        store = cls(
            engine,
            keyring=keyring,
            keyring_path=keyring_path,
            signing_key=signing_key,
            checkpoint_every=checkpoint_every,
            checkpoint_log=checkpoint_log,
        )
        store.sign_checkpoints = sign_checkpoints
        try:
            await store.migrate(create=create)
            if rewrap_keys:
                await store._rewrap_stale_keys()
        except (SQLAlchemyError, OSError) as e:
            await engine.dispose()
            raise StoreUnavailable(f"cannot open database {parsed.render_as_string()}: {e}") from e
        except BaseException:
            await engine.dispose()
            raise
        return store

    async def close(self) -> None:
        """Write a final signed checkpoint of the chain head (unless this store signs
        none), then disconnect."""
        try:
            await self.checkpoint()
        except Exception as e:  # never block shutdown on it; the next start continues
            log.warning("could not write the shutdown checkpoint: %s", e)
        await self.engine.dispose()
