"""mautrix's crypto store without a database round trip per decrypted event.

mautrix's ``PgCryptoStore`` reads the Megolm session, the sending device and its
cross-signing keys from the database for every event, and commits two writes per event,
each its own fsync'd transaction: the message index (replay protection) and the session's
ratchet bookkeeping. :class:`BridgeCryptoStore` keeps what it read in memory and defers
those two writes, without weakening what they guarantee:

- **Message indexes** (a ``(sender_key, session_id, index)`` seen with another event ID or
  timestamp is refused): checked in memory against every index of the session (read from
  the database once per session, then kept) and against the claims not yet written, so
  two events of one batch claiming one index are told apart. The new claims are written
  in one transaction by :meth:`flush_message_indexes`, which the worker awaits **before**
  it commits the batch's records (``DecryptionStage.before_commit``): a decrypted record
  is never durable without its index. A crash between the two leaves indexes of a batch
  that is processed again with the same events, which match their own claims.
- **Ratchet bookkeeping** (``ratchet_safety``: which indexes were seen, for ratcheting or
  deleting used keys, both turned off in the bridge): kept in memory and written when the
  store closes or the session leaves the cache. Losing it in a crash only makes it
  remember fewer decrypted indexes, i.e. keep keys longer; a new room key (a session
  object the cache did not hand out) is written through at once, as before.
- **What the index rows say**: nothing readable. mautrix kept sender keys, session IDs,
  event IDs and timestamps in ``crypto_message_index`` in plaintext; this store writes
  keyed hashes instead (HMAC-SHA256 under a key derived from the pickle key: of the
  sender key, of the session ID, and of the event ID with its timestamp; timestamp 0),
  and still reads rows mautrix wrote in plaintext before it.
- **Reads** (sessions, devices by key, cross-signing keys, signatures): read-through
  caches, dropped by every write of the same rows through this store (the bridge's
  process is the crypto store's only writer). A session that is withheld or redacted is
  never cached.
"""

from __future__ import annotations

import base64
import hmac
from collections import OrderedDict

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from mautrix.crypto import InboundGroupSession, PgCryptoStore
from mautrix.types import (
    CrossSigner,
    CrossSigningUsage,
    DeviceID,
    DeviceIdentity,
    EventID,
    IdentityKey,
    RoomID,
    SessionID,
    SigningKey,
    TOFUSigningKey,
    UserID,
)
from mautrix.util.async_db import Database
from mautrix.util.async_db.connection import LoggingConnection

#: Sessions (and their message indexes) kept in memory; the least recently used go first.
MAX_CACHED_SESSIONS = 2_000
#: Devices, cross-signing keys and signature answers kept (each cache starts over beyond).
MAX_CACHED_TRUST = 50_000

IndexKey = tuple[IdentityKey, SessionID]
#: ``crypto_message_index.event_id`` of a row written by this store: a keyed hash follows.
BLIND_PREFIX = "h:"
INDEX_KEY_LABEL = b"matrix-policy-bridge/e2ee/message-index/v1"


class BridgeCryptoStore(PgCryptoStore):
    """:class:`PgCryptoStore` with caches and deferred per-event writes (module docstring)."""

    def __init__(self, account_id: str, pickle_key: str, db: Database) -> None:
        super().__init__(account_id, pickle_key, db)
        self._sessions: OrderedDict[tuple[RoomID, SessionID], InboundGroupSession] = OrderedDict()
        self._ratchet_dirty: set[tuple[RoomID, SessionID]] = set()
        self._index_key = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=INDEX_KEY_LABEL
        ).derive(pickle_key.encode())
        self._indexes: OrderedDict[IndexKey, dict[int, str]] = OrderedDict()
        self._unwritten: dict[tuple[IdentityKey, SessionID, int], str] = {}
        self._by_key: dict[tuple[UserID, IdentityKey], DeviceIdentity] = {}
        self._cs_keys: dict[UserID, dict[CrossSigningUsage, TOFUSigningKey]] = {}
        self._signed: dict[tuple[CrossSigner, CrossSigner], bool] = {}

    # -- Megolm sessions ----------------------------------------------------------------

    async def get_group_session(
        self, room_id: RoomID, session_id: SessionID
    ) -> InboundGroupSession | None:
        """The session, from memory after the first read (withheld ones raise, uncached)."""
        key = (room_id, session_id)
        cached = self._sessions.get(key)
        if cached is not None:
            self._sessions.move_to_end(key)
            return cached
        session = await super().get_group_session(room_id, session_id)
        if session is not None:
            self._sessions[key] = session
            await self._trim_sessions()
        return session

    async def put_group_session(
        self,
        room_id: RoomID,
        sender_key: IdentityKey,
        session_id: SessionID,
        session: InboundGroupSession,
    ) -> None:
        """Write a session; the ratchet bookkeeping of the cached one (the object
        :meth:`get_group_session` handed out, updated after a decryption) is deferred."""
        key = (room_id, session_id)
        if self._sessions.get(key) is session:
            self._ratchet_dirty.add(key)
            return
        await super().put_group_session(room_id, sender_key, session_id, session)
        self._ratchet_dirty.discard(key)
        self._sessions[key] = session
        await self._trim_sessions()

    async def redact_group_session(
        self, room_id: RoomID, session_id: SessionID, reason: str
    ) -> None:
        """Redact a session (and forget it in memory)."""
        self._forget_session(room_id, session_id)
        await super().redact_group_session(room_id, session_id, reason)

    async def redact_group_sessions(
        self, room_id: RoomID | None, sender_key: IdentityKey | None, reason: str
    ) -> list[SessionID]:
        """Redact sessions (and forget them in memory)."""
        redacted = await super().redact_group_sessions(
            room_id,  # type: ignore[arg-type]  # PgCryptoStore narrows; "" and None both mean any
            sender_key,  # type: ignore[arg-type]
            reason,
        )
        self._forget_sessions(redacted)
        return redacted

    async def redact_expired_group_sessions(self) -> list[SessionID]:
        """Redact expired sessions (and forget them in memory)."""
        redacted = await super().redact_expired_group_sessions()
        self._forget_sessions(redacted)
        return redacted

    async def redact_outdated_group_sessions(self) -> list[SessionID]:
        """Redact outdated sessions (and forget them in memory)."""
        redacted = await super().redact_outdated_group_sessions()
        self._forget_sessions(redacted)
        return redacted

    def _forget_session(self, room_id: RoomID, session_id: SessionID) -> None:
        self._sessions.pop((room_id, session_id), None)
        self._ratchet_dirty.discard((room_id, session_id))

    def _forget_sessions(self, session_ids: list[SessionID]) -> None:
        gone = set(session_ids)
        for key in [k for k in self._sessions if k[1] in gone]:
            self._forget_session(*key)

    async def _trim_sessions(self) -> None:
        while len(self._sessions) > MAX_CACHED_SESSIONS:
            key, session = self._sessions.popitem(last=False)
            if key in self._ratchet_dirty:
                self._ratchet_dirty.discard(key)
                await super().put_group_session(key[0], session.sender_key, key[1], session)

    async def flush_ratchets(self) -> None:
        """Write the deferred ratchet bookkeeping of cached sessions."""
        for key in list(self._ratchet_dirty):
            session = self._sessions.get(key)
            self._ratchet_dirty.discard(key)
            if session is not None:
                await super().put_group_session(key[0], session.sender_key, key[1], session)

    # -- message indexes (replay protection) --------------------------------------------

    def _blind(self, kind: str, value: str) -> str:
        """A keyed hash (HMAC-SHA256, 43 characters of unpadded base64) of ``value``."""
        mac = hmac.new(self._index_key, kind.encode() + b"\0" + value.encode(), "sha256")
        return base64.b64encode(mac.digest()).decode("ascii").rstrip("=")

    def _claim(self, event_id: str, timestamp: int) -> str:
        return self._blind("claim", f"{event_id}\0{timestamp}")

    async def validate_message_index(
        self,
        sender_key: IdentityKey,
        session_id: SessionID,
        event_id: EventID,
        index: int,
        timestamp: int,
    ) -> bool:
        """Whether ``index`` of the session is unclaimed or claimed by this very event
        (same event ID and timestamp); a new claim is kept for
        :meth:`flush_message_indexes`."""
        seen = await self._session_indexes(sender_key, session_id)
        claim = self._claim(event_id, timestamp)
        known = seen.get(index)
        if known is not None:
            return hmac.compare_digest(known, claim)
        seen[index] = claim
        self._unwritten[(sender_key, session_id, index)] = claim
        return True

    async def _session_indexes(
        self, sender_key: IdentityKey, session_id: SessionID
    ) -> dict[int, str]:
        key = (sender_key, session_id)
        seen = self._indexes.get(key)
        if seen is not None:
            self._indexes.move_to_end(key)
            return seen
        rows = await self.db.fetch(
            'SELECT "index", event_id, timestamp FROM crypto_message_index '
            "WHERE (sender_key=$1 AND session_id=$2) OR (sender_key=$3 AND session_id=$4)",
            self._blind("sender_key", sender_key),
            self._blind("session_id", session_id),
            sender_key,  # rows mautrix wrote itself, in plaintext (before this store)
            session_id,
        )
        seen = {}
        for r in rows:
            stored = str(r["event_id"])
            seen[int(r["index"])] = (
                stored[len(BLIND_PREFIX) :]
                if stored.startswith(BLIND_PREFIX)
                else self._claim(stored, int(r["timestamp"]))
            )
        for (sk, sid, index), claim in self._unwritten.items():
            if (sk, sid) == key:
                seen[index] = claim
        self._indexes[key] = seen
        while len(self._indexes) > MAX_CACHED_SESSIONS:
            self._indexes.popitem(last=False)  # unwritten claims stay in _unwritten
        return seen

    async def flush_message_indexes(self) -> int:
        """Write the message indexes claimed since the last flush, in one transaction;
        returns how many. Await it before committing the records of the decrypted events.
        The rows hold keyed hashes only: of the sender key, the session ID, and of the
        event ID with its timestamp (the ``timestamp`` column is 0)."""
        if not self._unwritten:
            return 0
        claims = dict(self._unwritten)
        blinded: dict[IndexKey, tuple[str, str]] = {}
        for sender_key, session_id, _ in claims:
            if (sender_key, session_id) not in blinded:
                blinded[(sender_key, session_id)] = (
                    self._blind("sender_key", sender_key),
                    self._blind("session_id", session_id),
                )
        rows = [
            (
                *blinded[(sender_key, session_id)],
                index,
                BLIND_PREFIX + claim,
                0,
            )
            for (sender_key, session_id, index), claim in claims.items()
        ]
        conn: LoggingConnection
        async with self.db.acquire() as conn, conn.transaction():
            await conn.executemany(
                "INSERT INTO crypto_message_index "
                '(sender_key, session_id, "index", event_id, timestamp) '
                "VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                rows,
            )
        for key, claim in claims.items():
            if self._unwritten.get(key) == claim:
                del self._unwritten[key]
        return len(rows)

    # -- devices and cross-signing (trust of the sender) --------------------------------

    async def find_device_by_key(
        self, user_id: UserID, identity_key: IdentityKey
    ) -> DeviceIdentity | None:
        """The device of ``user_id`` with this identity key (cached once found)."""
        key = (user_id, identity_key)
        cached = self._by_key.get(key)
        if cached is not None:
            return cached
        device = await super().find_device_by_key(user_id, identity_key)
        if device is not None:
            if len(self._by_key) >= MAX_CACHED_TRUST:
                self._by_key.clear()
            self._by_key[key] = device
        return device

    async def put_devices(self, user_id: UserID, devices: dict[DeviceID, DeviceIdentity]) -> None:
        """Replace the devices of ``user_id`` (and forget the cached ones)."""
        self._forget_devices(user_id)
        await super().put_devices(user_id, devices)
        self._forget_devices(user_id)

    def _forget_devices(self, user_id: UserID) -> None:
        for key in [k for k in self._by_key if k[0] == user_id]:
            del self._by_key[key]

    async def get_cross_signing_keys(
        self, user_id: UserID
    ) -> dict[CrossSigningUsage, TOFUSigningKey]:
        """The user's cross-signing keys (cached, none too; dropped by key writes)."""
        cached = self._cs_keys.get(user_id)
        if cached is not None:
            return dict(cached)
        keys = await super().get_cross_signing_keys(user_id)
        if len(self._cs_keys) >= MAX_CACHED_TRUST:
            self._cs_keys.clear()
        self._cs_keys[user_id] = dict(keys)
        return keys

    async def put_cross_signing_key(
        self, user_id: UserID, usage: CrossSigningUsage, key: SigningKey
    ) -> None:
        """Store a cross-signing key (and forget the user's cached ones)."""
        self._cs_keys.pop(user_id, None)
        await super().put_cross_signing_key(user_id, usage, key)
        self._cs_keys.pop(user_id, None)

    async def is_key_signed_by(self, target: CrossSigner, signer: CrossSigner) -> bool:
        """Whether ``signer`` signed ``target`` (cached; dropped by signature writes)."""
        key = (target, signer)
        cached = self._signed.get(key)
        if cached is not None:
            return cached
        signed = bool(await super().is_key_signed_by(target, signer))
        if len(self._signed) >= MAX_CACHED_TRUST:
            self._signed.clear()
        self._signed[key] = signed
        return signed

    async def put_signature(self, target: CrossSigner, signer: CrossSigner, signature: str) -> None:
        """Store a signature (and forget cached answers)."""
        self._signed.clear()
        await super().put_signature(target, signer, signature)
        self._signed.clear()

    async def drop_signatures_by_key(self, signer: CrossSigner) -> int:
        """Drop a signer's signatures (and forget cached answers)."""
        self._signed.clear()
        dropped = await super().drop_signatures_by_key(signer)
        self._signed.clear()
        return dropped

    # -- closing ------------------------------------------------------------------------

    async def flush(self) -> None:
        """Write everything deferred (message indexes, ratchet bookkeeping)."""
        await self.flush_message_indexes()
        await self.flush_ratchets()
