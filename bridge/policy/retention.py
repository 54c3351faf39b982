"""Message retention policy and legal holds: pure logic, no I/O.

A :class:`RetentionPolicy` becomes the room's ``m.room.retention`` state
(``max_lifetime`` / ``min_lifetime`` in milliseconds). Synapse purges expired events
itself only when its own ``retention:`` config is enabled (and it clamps lifetimes to
that config's ``allowed_lifetime_min``/``max``); the bridge can also purge through the
admin API ``purge_history`` with ``purge_up_to_ts`` = :func:`expiry_cutoff`.

The sweeper (``bridge.pipeline.sweeper``) decides with the pure core below: what becomes of
each expired event (:func:`sweep_fate`) and whether a room's history is purged
(:func:`plan_purge`). A legal hold suspends deletion: a held room is never swept, a held
user's messages are never redacted, and since ``purge_history`` cannot spare single
senders, a room where a held user has spoken before the cutoff is not purged either. The
executor asks the same questions (:func:`event_hold`, :func:`purge_hold`) again just before
a queued removal runs.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from bridge.policy.durations import MAX_DURATION_MS, format_duration, parse_duration

__all__ = [
    "REDACTION",
    "ROOM_HELD",
    "SENDER_HELD",
    "USER_HELD",
    "Fate",
    "Purge",
    "RetentionPolicy",
    "RetentionPolicyError",
    "SkippedPurge",
    "already_redacted",
    "event_hold",
    "expiry_cutoff",
    "is_expired",
    "plan_purge",
    "purge_due",
    "purge_hold",
    "retention_content",
    "retention_matches",
    "sweep_fate",
]

REDACTION = "m.room.redaction"
ROOM_HELD = "room on legal hold"
USER_HELD = "user on legal hold"
SENDER_HELD = "a user on legal hold sent messages in this room"


class RetentionPolicyError(ValueError):
    """A retention policy that cannot be used as written (the message says why)."""


def _check_lifetime(name: str, value: object) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise RetentionPolicyError(
            f"{name} must be a whole number of milliseconds or empty, got {value!r}"
        )
    if value <= 0:
        raise RetentionPolicyError(f"{name} must be longer than zero, got {value} ms")
    if value > MAX_DURATION_MS:
        raise RetentionPolicyError(
            f"{name} is too long: {format_duration(value)}, at most "
            f"{format_duration(MAX_DURATION_MS)}"
        )


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """How long messages live: at most ``max_lifetime_ms``, at least ``min_lifetime_ms``.

    ``None`` means no bound. Both bounds, when set, are positive and ``min <= max``.
    """

    max_lifetime_ms: int | None = None
    min_lifetime_ms: int | None = None

    def __post_init__(self) -> None:
        _check_lifetime("max_lifetime", self.max_lifetime_ms)
        _check_lifetime("min_lifetime", self.min_lifetime_ms)
        if (
            self.max_lifetime_ms is not None
            and self.min_lifetime_ms is not None
            and self.min_lifetime_ms > self.max_lifetime_ms
        ):
            raise RetentionPolicyError(
                f"min_lifetime ({format_duration(self.min_lifetime_ms)}) is longer than "
                f"max_lifetime ({format_duration(self.max_lifetime_ms)}); "
                "messages cannot be kept longer than they may live"
            )

    @classmethod
    def from_text(
        cls, max_lifetime: str | None, min_lifetime: str | None = None
    ) -> RetentionPolicy:
        """Build a policy from durations like ``"90d"`` (``None`` or ``""`` = no bound).

        Raises :class:`~bridge.policy.durations.DurationError` for a bad duration and
        :class:`RetentionPolicyError` for bounds that do not fit together.
        """
        max_ms = parse_duration(max_lifetime) if max_lifetime else None
        min_ms = parse_duration(min_lifetime) if min_lifetime else None
        return cls(max_lifetime_ms=max_ms, min_lifetime_ms=min_ms)

    @property
    def empty(self) -> bool:
        """Whether the policy sets no bound at all."""
        return self.max_lifetime_ms is None and self.min_lifetime_ms is None

    def describe(self) -> str:
        """A short human description, e.g. ``messages are deleted after 90d``."""
        if self.empty:
            return "no retention limits"
        parts = []
        if self.max_lifetime_ms is not None:
            parts.append(f"messages are deleted after {format_duration(self.max_lifetime_ms)}")
        if self.min_lifetime_ms is not None:
            parts.append(f"kept at least {format_duration(self.min_lifetime_ms)}")
        return ", ".join(parts)


def retention_content(policy: RetentionPolicy | None) -> dict[str, int] | None:
    """The ``m.room.retention`` content for ``policy``; ``None`` only when there is no
    policy at all (``None``: retention is not managed).

    A policy without bounds (retention lifted with ``retention off``) gives ``{}``: a room
    that still shows an old ``max_lifetime`` must drop it, or clients would show a limit
    that no longer applies and Synapse's purge jobs (where enabled) would keep deleting by
    it. Synapse reads an empty content as "no room policy" (its own default applies).
    """
    if policy is None:
        return None
    content: dict[str, int] = {}
    if policy.max_lifetime_ms is not None:
        content["max_lifetime"] = policy.max_lifetime_ms
    if policy.min_lifetime_ms is not None:
        content["min_lifetime"] = policy.min_lifetime_ms
    return content


def _lifetime(content: Mapping[str, Any], key: str) -> int | None:
    value = content.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


def retention_matches(current: Mapping[str, Any] | None, desired: Mapping[str, Any] | None) -> bool:
    """Whether a room's ``m.room.retention`` content already is the desired one.

    Only ``max_lifetime`` and ``min_lifetime`` count; a missing or non-integer value
    means "no bound" (as Synapse reads it), so a room without retention state matches
    ``{}``. ``desired`` ``None`` means the policy does not manage retention: always a match.
    """
    if desired is None:
        return True
    current = current or {}
    return all(
        _lifetime(current, key) == _lifetime(desired, key)
        for key in ("max_lifetime", "min_lifetime")
    )


def expiry_cutoff(policy: RetentionPolicy | None, now_ms: int) -> int | None:
    """The timestamp before which events are expired, or ``None`` if nothing expires.

    An event with ``origin_server_ts < cutoff`` has outlived ``max_lifetime``. Suitable
    as ``purge_up_to_ts``. Never negative.
    """
    if policy is None or policy.max_lifetime_ms is None:
        return None
    return max(now_ms - policy.max_lifetime_ms, 0)


def is_expired(policy: RetentionPolicy | None, origin_server_ts: int, now_ms: int) -> bool:
    """Whether an event sent at ``origin_server_ts`` has outlived the policy at ``now_ms``."""
    cutoff = expiry_cutoff(policy, now_ms)
    return cutoff is not None and origin_server_ts < cutoff


def event_hold(
    room_id: str | None,
    sender: str | None,
    held_rooms: Collection[str],
    held_users: Collection[str],
) -> str | None:
    """Why an event (its room and sender) must not be removed: the legal hold covering it
    (``"room on legal hold"`` / ``"user on legal hold"``), or ``None``."""
    if room_id is not None and room_id in held_rooms:
        return ROOM_HELD
    if sender is not None and sender in held_users:
        return USER_HELD
    return None


def purge_hold(
    room_id: str | None, held_rooms: Collection[str], held_senders: Collection[str]
) -> str | None:
    """Why a room's history must not be purged, or ``None``.

    ``held_senders``: the users on hold who sent events in the room before the purge's
    cutoff. ``purge_history`` removes every sender's events, so one of them is enough.
    """
    if room_id is not None and room_id in held_rooms:
        return ROOM_HELD
    if held_senders:
        return SENDER_HELD
    return None


def already_redacted(event: Mapping[str, Any]) -> bool:
    """Whether an archived event was redacted before it reached us (or since, by Synapse)."""
    unsigned = event.get("unsigned")
    if isinstance(unsigned, dict) and unsigned.get("redacted_because"):
        return True
    content = event.get("content")
    # an event that reached us already redacted has lost its content
    return isinstance(content, dict) and not content and event.get("type") != REDACTION


class Fate(Enum):
    """What the sweeper does with one expired event."""

    REDACT = "redact"
    STATE = "state"  # state events and redactions: retention never removes them
    REDACTED = "redacted"  # gone already (or no event ID to redact)
    HELD = "held"  # its sender is on legal hold
    UNREADABLE = "unreadable"  # the archive cannot open it (expired, shredded, damaged)


def sweep_fate(
    event: Mapping[str, Any] | None,
    redacted: Collection[str],
    held_users: Collection[str],
) -> Fate:
    """The fate of an expired event (``None`` when unreadable); ``redacted``: event IDs
    known to be redacted already; ``held_users``: users on legal hold."""
    if event is None:
        return Fate.UNREADABLE
    if "state_key" in event or event.get("type") == REDACTION:
        return Fate.STATE
    event_id = event.get("event_id")
    if not isinstance(event_id, str) or event_id in redacted or already_redacted(event):
        return Fate.REDACTED
    sender = event.get("sender")
    if event_hold(None, sender if isinstance(sender, str) else None, (), held_users):
        return Fate.HELD
    return Fate.REDACT


@dataclass(frozen=True, slots=True)
class Purge:
    """Purge the room's history up to (excluding) ``purge_up_to_ts``."""

    room_id: str
    purge_up_to_ts: int


@dataclass(frozen=True, slots=True)
class SkippedPurge:
    """A room whose purge is due but must not run, and why (a legal hold)."""

    room_id: str
    reason: str


def purge_due(cutoff: int, purged_to: int, pending: int) -> bool:
    """Whether a purge up to ``cutoff`` has work: messages were swept since the last purge
    (``pending``) and the cutoff moved past the last purge's (``purged_to``)."""
    return pending > 0 and cutoff > purged_to


def plan_purge(
    room_id: str,
    cutoff: int,
    *,
    purged_to: int,
    pending: int,
    held_rooms: Collection[str],
    held_senders: Collection[str],
) -> Purge | SkippedPurge | None:
    """Whether to purge a caught-up room's history up to ``cutoff``: ``None`` when nothing
    is due (:func:`purge_due`), a :class:`SkippedPurge` naming the hold that forbids it
    (:func:`purge_hold`), else the :class:`Purge`."""
    if not purge_due(cutoff, purged_to, pending):
        return None
    reason = purge_hold(room_id, held_rooms, held_senders)
    if reason is not None:
        return SkippedPurge(room_id, reason)
    return Purge(room_id, cutoff)
