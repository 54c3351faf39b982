"""The store's value types and errors."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class StoreUnavailable(Exception):
    """The database could not be reached or refused the write; the caller should retry."""


class StoreError(Exception):
    """The store is in a state the code cannot work with (e.g. a newer schema)."""


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True, slots=True)
class IngestResult:
    """Outcome of one transaction: ``duplicate`` if its txnId was already committed."""

    duplicate: bool
    stored: int
    skipped: int


@dataclass(frozen=True, slots=True)
class StoredEvent:
    seq: int
    event: dict[str, Any]


@dataclass(frozen=True, slots=True)
class WorkItem:
    """One committed transaction waiting to be processed."""

    queue_id: int
    txn_id: str
    received_ts: int
    events: list[StoredEvent]


@dataclass(frozen=True, slots=True)
class NewAction:
    """An action for the executor. ``id`` doubles as the Matrix transaction ID."""

    kind: str
    payload: Mapping[str, Any]
    room_id: str | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    not_before: float = 0.0  # unix time; spreads bulk work (policy rollouts) over time


@dataclass(frozen=True, slots=True)
class RoomUpdate:
    """A change to a room's row (None: keep what is stored), written with a batch."""

    room_id: str
    joined: bool | None = None
    lacking: str | None = None


@dataclass(frozen=True, slots=True)
class ActionRow:
    id: str
    kind: str
    room_id: str | None
    payload: dict[str, Any]
    status: str
    attempts: int
    next_at: float
    last_error: str | None


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """A non-event record: a gate decision, an executor outcome, a command."""

    kind: str
    data: Mapping[str, Any]
    room_id: str | None = None
    sender: str | None = None
    type: str | None = None


@dataclass(frozen=True, slots=True)
class Holds:
    """Room IDs and user IDs on legal hold."""

    rooms: frozenset[str] = frozenset()
    users: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class HoldInfo:
    """One legal hold: ``scope`` room or user, ``source`` command or config."""

    scope: str
    target: str
    source: str
    set_ts: int
    by: str | None
    reason: str | None


@dataclass(frozen=True, slots=True)
class RecordMeta:
    """What a summary may show of a record: never its content."""

    seq: int
    ts: int
    kind: str
    origin_ts: int
    event_id: str | None
    room_id: str | None
    sender: str | None
    type: str | None
    readable: bool


@dataclass(frozen=True, slots=True)
class SearchGroup:
    kind: str
    room_id: str | None
    type: str | None
    count: int
    latest_ts: int
    readable: bool


@dataclass(frozen=True, slots=True)
class SearchSummary:
    total: int
    groups: list[SearchGroup]
    more_groups: bool
    latest: list[RecordMeta]


@dataclass(frozen=True, slots=True)
class ExpiryReport:
    """One archive-expiry run."""

    cutoff_ts: int
    expired: int
    skipped_on_hold: int
    rooms_shredded: int
    through_seq: int


@dataclass(frozen=True, slots=True)
class StoreStats:
    events: int
    records: int
    queue_depth: int
    queue_lag_s: float
    actions_pending: int
    actions_failed: int
    rooms_known: int


@dataclass(frozen=True, slots=True)
class Plain:
    """One record before encryption."""

    kind: str
    event_id_idx: bytes | None
    room_id: str | None
    sender: str | None
    type: str | None
    origin_ts: int
    plaintext: bytes
    ts: int | None = None  # when recorded, if not now (records migrated from schema 1)
