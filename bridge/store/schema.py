"""Database schema (SQLAlchemy Core), shared by SQLite and PostgreSQL."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)

#: 1: plaintext records. 2: encrypted, chained records. 3: the operational tables (rooms,
#: actions, bridge_state values) encrypted too, rooms looked up by blind index. 4: the
#: compliance console's tables (per-day counters, sessions). 5: attachments: the queue of
#: in-room media checks and the extraction cache.
SCHEMA_VERSION = 5

metadata = MetaData()

# Every record the bridge keeps, in one append-only, hash-chained sequence: events from
# transactions, gate decisions, executor outcomes, admin commands, exports. Nothing readable
# is stored: the raw JSON (with sender, room, type, state key) is AES-256-GCM ciphertext
# under the room's data key; what must be queryable is a blind index (keyed HMAC, 16 bytes).
# ``hash`` chains each record to the previous one (bridge.audit.chain); it covers
# ``ct_digest`` (SHA-256 of the ciphertext), so ``ciphertext`` may be dropped by archive
# retention (NULL) while the chain still verifies.
records = Table(
    "records",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("ts", BigInteger, nullable=False),  # ms since epoch, when recorded
    Column("kind", String(16), nullable=False),
    Column("event_id_idx", LargeBinary(16), nullable=True, unique=True),
    Column("room_idx", LargeBinary(16), nullable=True),
    Column("sender_idx", LargeBinary(16), nullable=True),
    Column("type_idx", LargeBinary(16), nullable=True),
    Column("origin_ts", BigInteger, nullable=False),  # the event's origin_server_ts
    Column("key_id", String(64), nullable=True),  # data key (data_keys.key_id)
    Column("nonce", LargeBinary(12), nullable=False),
    Column("ciphertext", LargeBinary, nullable=True),  # NULL once expired by retention
    Column("ct_digest", LargeBinary(32), nullable=False),
    Column("hash", LargeBinary(32), nullable=False),
    Index("ix_records_room_ts", "room_idx", "origin_ts"),
    Index("ix_records_origin_ts", "origin_ts"),
    # the console's newest-first pages (schema 4: the sender and type indexes gained seq,
    # replacing ix_records_sender and ix_records_type, whose lookups they also serve;
    # ix_records_kind_room_seq replaced ix_records_kind_ts, which no query ordered by)
    Index("ix_records_sender_seq", "sender_idx", "seq"),
    Index("ix_records_type_seq", "type_idx", "seq"),
    Index("ix_records_room_seq", "room_idx", "seq"),
    Index("ix_records_kind_seq", "kind", "seq"),
    Index("ix_records_kind_room_seq", "kind", "room_idx", "seq"),
)

#: A record's sealed part, in the order ``_decrypt(seq, *sealed)`` takes it: what opening a
#: record needs besides its seq.
SEALED_PART = (records.c.room_idx, records.c.key_id, records.c.nonce, records.c.ciphertext)

# Per-room data keys (scope = the room's blind index; empty scope = records without a
# room), only ever stored wrapped by a key-encryption key of the keyring (never in the DB).
# Deleting a row crypto-shreds that room's records.
data_keys = Table(
    "data_keys",
    metadata,
    Column("key_id", String(64), primary_key=True),
    Column("scope", LargeBinary(16), nullable=False, unique=True),
    Column("kek_id", String(64), nullable=False),
    Column("blob", LargeBinary, nullable=False),
    Column("created_ts", BigInteger, nullable=False),
)

# Signed checkpoints of the chain head (Ed25519). Also appended to a log file next to the
# signing key, outside the database, so deleting rows here does not hide a truncation.
checkpoints = Table(
    "checkpoints",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("head_hash", LargeBinary(32), nullable=False),
    Column("ts", BigInteger, nullable=False),
    Column("record_count", BigInteger, nullable=False),
    Column("key_id", String(64), nullable=False),
    Column("signature", LargeBinary(64), nullable=False),
)

# Legal holds: rooms and users whose records archive retention must not expire (and whose
# rooms the room-retention purge must leave alone). Nothing readable: the target is a blind
# index (room / sender field, as in ``records``) for lookups, and the target, who set the
# hold and why are AES-256-GCM ciphertext under the data key of records without a room.
# ``source`` is "command" (``!policy hold``) or "config" (``audit.legal_hold``).
legal_holds = Table(
    "legal_holds",
    metadata,
    Column("scope", String(8), primary_key=True),  # room | user
    Column("target_idx", LargeBinary(16), primary_key=True),
    Column("source", String(16), nullable=False),
    Column("set_ts", BigInteger, nullable=False),
    Column("key_id", String(64), nullable=False),
    Column("nonce", LargeBinary(12), nullable=False),
    Column("ciphertext", LargeBinary, nullable=False),
)

# One row per appservice transaction: makes txnIds idempotent and is the work queue
# (rows with processed = false are waiting for the worker).
transactions = Table(
    "transactions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("txn_id", String(255), nullable=False, unique=True),
    Column("received_ts", BigInteger, nullable=False),
    Column("first_seq", BigInteger, nullable=True),
    Column("last_seq", BigInteger, nullable=True),
    Column("event_count", Integer, nullable=False),
    Column("processed", Boolean, nullable=False),
    Index("ix_transactions_pending", "processed", "id"),
)

# The executor's durable queue of Matrix / admin-API actions. Nothing readable: the room
# and payload (notice bodies, event IDs, reasons) are one AES-256-GCM blob under the
# operational data key (``nonce || ciphertext``, AAD = table, id, column), ``last_error``
# another; ``room_idx`` is the room's blind index (as in ``records``). ``id`` is random,
# ``kind`` and ``status`` name no one.
actions = Table(
    "actions",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("kind", String(32), nullable=False),
    Column("room_idx", LargeBinary(16), nullable=True),
    Column("data", LargeBinary, nullable=False),  # sealed {"room_id", "payload"}
    Column("status", String(16), nullable=False),  # pending | done | failed
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_at", Float, nullable=False),
    Column("last_error", LargeBinary, nullable=True),  # sealed text
    Column("created_ts", BigInteger, nullable=False),
    Column("updated_ts", BigInteger, nullable=False),
    Index("ix_actions_due", "status", "next_at"),
)

# Rooms the bridge knows, and whether it can enforce there: keyed by the room's blind
# index; the room ID and what power the bot lacks there are sealed in ``data``.
rooms = Table(
    "rooms",
    metadata,
    Column("room_idx", LargeBinary(16), primary_key=True),
    Column("joined", Boolean, nullable=False, default=False),
    Column("data", LargeBinary, nullable=False),  # sealed {"room_id", "lacking"}
    Column("updated_ts", BigInteger, nullable=False),
    Index("ix_rooms_joined", "joined", "room_idx"),
)

# Small key/value state: management room ID, runtime policy overrides, rollouts, sweeper
# progress. Values are sealed under the operational data key (``enc:`` + base64, AAD =
# table and key) except the few the store needs before the keys are unlocked
# (``store.PLAIN_STATE_KEYS``: schema version, index check, expiry cursor).
state = Table(
    "bridge_state",
    metadata,
    Column("key", String(128), primary_key=True),
    Column("value", Text, nullable=False),
)

# -- the compliance console (bridge/console) ----------------------------------------------
# Per-day counters kept on every append to ``records`` (same transaction), so the console's
# charts never decrypt the archive: ``metric`` is a record kind (label "") or a derived
# series: ``finding`` (label = DLP rule name), ``refusal`` (label = gate callback),
# ``report`` (false-positive reports that went through).
# Rule and callback names are policy configuration, not message content.
console_daily = Table(
    "console_daily",
    metadata,
    Column("day", Integer, primary_key=True, autoincrement=False),  # days since 1970-01-01 UTC
    Column("metric", String(32), primary_key=True),
    Column("label", String(200), primary_key=True),
    Column("n", BigInteger, nullable=False),
)

# Console sessions, shared by replicas: the cookie's random ID is stored only as its SHA-256;
# the user ID is sealed under the operational data key (AAD = table, id_hash, column).
console_sessions = Table(
    "console_sessions",
    metadata,
    Column("id_hash", LargeBinary(32), primary_key=True),
    Column("data", LargeBinary, nullable=False),  # sealed {"user_id"}
    Column("created_ts", BigInteger, nullable=False),
    Column("seen_ts", BigInteger, nullable=False),
    Index("ix_console_sessions_seen", "seen_ts"),
)

# --- attachments (issue 12) ---------------------------------------------------------------
# In-room media checks waiting to run: the room, event, sender and mxc URI are sealed in
# ``data`` (like actions); ``id`` is random.
media_checks = Table(
    "media_checks",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("data", LargeBinary, nullable=False),  # sealed {"room_id", "event_id", ...}
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_at", Float, nullable=False),
    Column("created_ts", BigInteger, nullable=False),
    Index("ix_media_checks_due", "next_at"),
)
# What reading a file gave, keyed by the blind index of its mxc URI or of its SHA-256: the
# digest, sniffed type, why it was not (all) read, size; sealed. Never its text.
media_cache = Table(
    "media_cache",
    metadata,
    Column("key_idx", LargeBinary(16), primary_key=True),
    Column("data", LargeBinary, nullable=False),
    Column("updated_ts", BigInteger, nullable=False),
)
