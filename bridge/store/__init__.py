"""Durable storage: a database and repositories (events, audit records, the work queue,
executor actions, rooms, state, legal holds, keys). See :mod:`bridge.store.store`."""

from bridge.store.archive_expiry import load_removals
from bridge.store.chain import iter_chain, iter_chain_batches, load_checkpoints
from bridge.store.database import Backend, Database
from bridge.store.holds import HOLD_SCOPES
from bridge.store.keys import INDEX_CHECK_KEY
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
from bridge.store.queue import UnreadableEvent
from bridge.store.records import AUDIT_KINDS
from bridge.store.state import EXPIRY_CURSOR_KEY, PLAIN_STATE_KEYS
from bridge.store.store import Store, StoreSettings

__all__ = [
    "AUDIT_KINDS",
    "EXPIRY_CURSOR_KEY",
    "HOLD_SCOPES",
    "INDEX_CHECK_KEY",
    "PLAIN_STATE_KEYS",
    "ActionRow",
    "AuditEntry",
    "Backend",
    "Database",
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
    "StoreSettings",
    "StoreStats",
    "StoreUnavailable",
    "StoredEvent",
    "UnreadableEvent",
    "WorkItem",
    "iter_chain",
    "iter_chain_batches",
    "load_checkpoints",
    "load_removals",
    "now_ms",
]
