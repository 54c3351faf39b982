"""The state every part of the store shares."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from bridge.audit.chain import Checkpoint
from bridge.audit.crypto import BlindIndexer, DataKey
from bridge.audit.keyring import Keyring

#: One logger for every part of the store (its name as before the store was split up).
log = logging.getLogger("bridge.store.store")


class StoreCore:
    """The engine, the keyring and the in-memory chain head and key caches.

    The parts of :class:`bridge.store.Store` are mixins over this class, each in a
    module of its own; see :class:`bridge.store.Store` for the arguments.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        keyring: Keyring | None = None,
        keyring_path: Path | None = None,
        signing_key: Ed25519PrivateKey | None = None,
        checkpoint_every: int = 1000,
        checkpoint_log: Path | None = None,
    ) -> None:
        self.engine = engine
        self.backend = "postgresql" if engine.dialect.name == "postgresql" else "sqlite"
        self._append_lock = asyncio.Lock()
        self._op_lock = asyncio.Lock()
        self._next_seq: int | None = None
        self._head: bytes | None = None
        self._last_cp_seq = 0
        #: When the newest signed checkpoint was made (ms since the epoch), once known.
        self.last_checkpoint_ts: int | None = None
        self.keyring: Keyring | None = keyring
        self.keyring_path = keyring_path
        self.signing_key = signing_key or Ed25519PrivateKey.generate()
        self.checkpoint_every = max(1, checkpoint_every)
        self.checkpoint_log = checkpoint_log
        self._idx: BlindIndexer | None = None
        self._idx_cache: dict[tuple[str, str], bytes] = {}
        self._keys_by_scope: dict[bytes, DataKey] = {}
        self._keys_by_id: dict[str, DataKey] = {}
        self._uncommitted_keys: list[DataKey] = []
        self._tentative: tuple[int, bytes, Checkpoint | None] | None = None
        self._events: int | None = None  # events stored, counted once, then kept up to date
        self._tentative_events = 0
        #: Called (in the event loop, after the commit) with every new signed checkpoint.
        self.on_checkpoint: Callable[[Checkpoint], None] | None = None

    async def reachable(self) -> bool:
        """Whether the database answers a trivial query right now."""
        try:
            async with self.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except (SQLAlchemyError, OSError):
            return False
        return True
