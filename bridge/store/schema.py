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

SCHEMA_VERSION = 1

metadata = MetaData()

# Every record the bridge keeps, in one append-only sequence: events from transactions,
# gate decisions, executor outcomes, admin commands. ``data`` is the raw JSON.
records = Table(
    "records",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("ts", BigInteger, nullable=False),  # ms since epoch, when recorded
    Column("kind", String(16), nullable=False),
    Column("event_id", String(255), nullable=True, unique=True),
    Column("room_id", String(255), nullable=True),
    Column("sender", String(255), nullable=True),
    Column("type", String(255), nullable=True),
    Column("origin_ts", BigInteger, nullable=True),  # the event's origin_server_ts
    Column("data", LargeBinary, nullable=False),
    Index("ix_records_room_ts", "room_id", "origin_ts"),
    Index("ix_records_kind_ts", "kind", "ts"),
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

# The executor's durable queue of Matrix / admin-API actions.
actions = Table(
    "actions",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("kind", String(32), nullable=False),
    Column("room_id", String(255), nullable=True),
    Column("payload", Text, nullable=False),
    Column("status", String(16), nullable=False),  # pending | done | failed
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_at", Float, nullable=False),
    Column("last_error", Text, nullable=True),
    Column("created_ts", BigInteger, nullable=False),
    Column("updated_ts", BigInteger, nullable=False),
    Index("ix_actions_due", "status", "next_at"),
)

# Rooms the bridge knows, and whether it can enforce there.
rooms = Table(
    "rooms",
    metadata,
    Column("room_id", String(255), primary_key=True),
    Column("joined", Boolean, nullable=False, default=False),
    Column("lacking", Text, nullable=False, default=""),  # what power the bot lacks, if any
    Column("updated_ts", BigInteger, nullable=False),
)

# Small key/value state: management room ID, runtime policy overrides, schema version.
state = Table(
    "bridge_state",
    metadata,
    Column("key", String(128), primary_key=True),
    Column("value", Text, nullable=False),
)
