"""The store: a database and its repositories, put together once.

Records are the audit store of issue 3 (see :mod:`bridge.audit.crypto` and
:mod:`bridge.audit.chain`): each record's JSON is AES-256-GCM ciphertext under its room's
data key (wrapped by the keyring's current KEK), queryable fields are blind indexes, and
every record is hash-chained to the previous one. Appends to the record sequence are
serialised by an in-process lock and, on PostgreSQL, by a transaction-scoped advisory lock
under which the head is re-read, so several replicas append to one chain
(:meth:`RecordLog.write`). On SQLite one bridge process owns a store (another process
appending, e.g. ``audit export`` recording itself, makes a concurrent append fail on the
seq primary key; the store then reloads the chain head and retries once).

:class:`Store` only opens, holds and closes; the work is done by its repositories, one
module each, all taking the one :class:`~bridge.store.database.Database`:
``keys`` (:mod:`.keys`), ``records`` (:mod:`.records`), ``queue`` (:mod:`.queue`),
``actions`` (:mod:`.actions`), ``rooms`` (:mod:`.rooms`), ``state`` (:mod:`.state`),
``holds`` (:mod:`.holds`), ``expiry`` (:mod:`.archive_expiry`), ``reader``
(:mod:`.reading`), ``stats`` (:mod:`.stats`) and ``console`` (:mod:`.console`);
:mod:`.migrations` creates and upgrades the schema, :mod:`.chain` reads the chain for
verification, :mod:`.models` holds the value types.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy.exc import SQLAlchemyError

from bridge.audit.keyring import Keyring
from bridge.store.actions import ActionQueue
from bridge.store.archive_expiry import ArchiveExpiry
from bridge.store.console import ConsoleRepository
from bridge.store.database import Database, log
from bridge.store.holds import HoldRepository
from bridge.store.keys import KeyRepository
from bridge.store.media import MediaRepository
from bridge.store.migrations import MigrationContext, migrate
from bridge.store.models import StoreUnavailable
from bridge.store.queue import WorkQueue
from bridge.store.reading import RecordReader
from bridge.store.records import RecordLog
from bridge.store.rooms import RoomRepository
from bridge.store.state import StateRepository
from bridge.store.stats import StatsQueries


@dataclass(frozen=True, slots=True)
class StoreSettings:
    """How to open a store (everything but the database URL).

    ``keyring`` unlocks the data keys; without one, a fresh in-memory keyring is generated
    for an empty database (saved to ``keyring_path`` when given, else ephemeral: tests and
    benchmarks) and a non-empty database is refused. ``signing_key`` signs checkpoints
    (ephemeral when omitted); ``checkpoint_log`` is the file checkpoints are appended to;
    with ``sign_checkpoints=False`` no checkpoint is signed at all. ``create=False`` (the
    audit CLI) never creates or migrates the schema. With ``rewrap_keys``, data keys still
    wrapped by an older KEK of the keyring are re-wrapped under the current one (finishing
    a ``rotate-key`` done while a bridge with the old keyring kept creating data keys).
    """

    pool_size: int = 10
    create: bool = True
    keyring: Keyring | None = None
    keyring_path: Path | None = None
    signing_key: Ed25519PrivateKey | None = None
    checkpoint_every: int = 1000
    checkpoint_log: Path | None = None
    rewrap_keys: bool = False
    sign_checkpoints: bool = True


class Store:
    """The database, the crypto context and the repositories. Create with :meth:`open`."""

    def __init__(self, db: Database, keys: KeyRepository, records: RecordLog) -> None:
        self.db = db
        self.keys = keys
        self.records = records
        self.state = StateRepository(db, keys)
        self.rooms = RoomRepository(db, keys)
        self.actions = ActionQueue(db, keys, records)
        self.media = MediaRepository(db, keys)  # attachments: in-room checks, cache
        self.queue = WorkQueue(db, keys, records, self.actions, self.state, self.rooms)
        self.queue.media = self.media
        self.holds = HoldRepository(db, keys, records, self.state)
        self.expiry = ArchiveExpiry(db, keys, records, self.state, self.holds)
        self.reader = RecordReader(db, keys)
        self.stats = StatsQueries(db, records)
        self.console = ConsoleRepository(db, keys)  # the compliance console's tables

    @property
    def keyring(self) -> Keyring:
        """The keyring the store unlocked with (generated for a new store without one)."""
        assert self.keys.keyring is not None
        return self.keys.keyring

    @property
    def signing_key(self) -> Ed25519PrivateKey:
        """The key checkpoints are signed with."""
        return self.records.signing_key

    @classmethod
    async def open(cls, url: str, settings: StoreSettings = StoreSettings()) -> Store:
        """Connect, create or migrate the schema, unlock the audit keys.

        Raises StoreUnavailable if unreachable, StoreError if the keyring does not fit the
        stored data keys, KeyringMissingError if the database holds records but no keyring
        was given.
        """
        return await cls.open_on(Database.create(url, pool_size=settings.pool_size), settings)

    @classmethod
    async def open_on(cls, db: Database, settings: StoreSettings = StoreSettings()) -> Store:
        """:meth:`open` on a database whose engine the caller made (``pool_size`` unused);
        the store closes it."""
        keys = KeyRepository(db, settings.keyring, settings.keyring_path)
        records = RecordLog(
            db,
            keys,
            signing_key=settings.signing_key or Ed25519PrivateKey.generate(),
            checkpoint_every=settings.checkpoint_every,
            checkpoint_log=settings.checkpoint_log,
            sign_checkpoints=settings.sign_checkpoints,
        )
        store = cls(db, keys, records)
        try:
            await migrate(store.migration_context(), create=settings.create)
            if settings.rewrap_keys:
                await keys.rewrap_stale()
        except (SQLAlchemyError, OSError) as e:
            await db.close()
            raise StoreUnavailable(f"cannot open database {db.url.render_as_string()}: {e}") from e
        except BaseException:
            await db.close()
            raise
        return store

    def migration_context(self) -> MigrationContext:
        """What the schema steps work with."""
        return MigrationContext(
            self.db, self.keys, self.records, self.state, self.rooms, self.actions
        )

    async def close(self) -> None:
        """Write a final signed checkpoint of the chain head (unless this store signs
        none), then disconnect."""
        try:
            await self.records.checkpoint()
        except Exception as e:  # never block shutdown on it; the next start continues
            log.warning("could not write the shutdown checkpoint: %s", e)
        await self.db.close()
