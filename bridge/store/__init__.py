"""Durable storage: events, audit records, the work queue and executor actions."""

from bridge.store.store import (
    ActionRow,
    AuditEntry,
    ExpiryReport,
    HoldInfo,
    Holds,
    IngestResult,
    NewAction,
    RoomUpdate,
    SearchSummary,
    Store,
    StoredEvent,
    StoreError,
    StoreStats,
    StoreUnavailable,
    WorkItem,
    now_ms,
)

__all__ = [
    "ActionRow",
    "AuditEntry",
    "ExpiryReport",
    "HoldInfo",
    "Holds",
    "IngestResult",
    "NewAction",
    "RoomUpdate",
    "SearchSummary",
    "Store",
    "StoreError",
    "StoreStats",
    "StoreUnavailable",
    "StoredEvent",
    "WorkItem",
    "now_ms",
]
