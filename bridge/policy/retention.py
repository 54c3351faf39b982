"""Message retention policy and legal holds: pure logic, no I/O.

A :class:`RetentionPolicy` becomes the room's ``m.room.retention`` state
(``max_lifetime`` / ``min_lifetime`` in milliseconds). Synapse purges expired events
itself only when its own ``retention:`` config is enabled (and it clamps lifetimes to
that config's ``allowed_lifetime_min``/``max``); the bridge can also purge through the
admin API ``purge_history`` with ``purge_up_to_ts`` = :func:`expiry_cutoff`.

A legal hold suspends deletion: a held room is never purged, and since
``purge_history`` cannot spare single senders, a room where a held user has spoken is
not purged either (:func:`plan_sweep`).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bridge.policy.durations import MAX_DURATION_MS, format_duration, parse_duration

__all__ = [
    "Purge",
    "RetentionPolicy",
    "RetentionPolicyError",
    "RoomRetention",
    "SkippedPurge",
    "SweepPlan",
    "expiry_cutoff",
    "is_expired",
    "is_on_hold",
    "plan_sweep",
    "retention_content",
    "retention_matches",
]


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
    """The ``m.room.retention`` content for ``policy``; ``None`` when it sets no bound
    (the bridge then leaves the room's retention state alone)."""
    if policy is None or policy.empty:
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
    means "no bound" (as Synapse reads it). ``desired`` ``None`` means the policy does
    not manage retention: always a match.
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


def is_on_hold(
    room_id: str | None,
    sender: str | None,
    held_rooms: Collection[str],
    held_users: Collection[str],
) -> bool:
    """Whether an event (its room and sender) is under legal hold and must not be deleted."""
    return (room_id is not None and room_id in held_rooms) or (
        sender is not None and sender in held_users
    )


@dataclass(frozen=True, slots=True)
class RoomRetention:
    """What a sweep needs to know about one room.

    ``senders`` are the users known to have sent events in the room (or its members,
    when senders are not tracked): used to honour holds on users.
    """

    room_id: str
    policy: RetentionPolicy | None
    senders: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True, slots=True)
class Purge:
    """Purge the room's history up to (excluding) ``purge_up_to_ts``."""

    room_id: str
    purge_up_to_ts: int


@dataclass(frozen=True, slots=True)
class SkippedPurge:
    """A room that would expire events but must not be purged, and why."""

    room_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class SweepPlan:
    """The outcome of :func:`plan_sweep`: purges to run and rooms held back."""

    purges: tuple[Purge, ...] = ()
    skipped: tuple[SkippedPurge, ...] = ()


def plan_sweep(
    rooms: Iterable[RoomRetention],
    now_ms: int,
    held_rooms: Collection[str] = frozenset(),
    held_users: Collection[str] = frozenset(),
    last_purged: Mapping[str, int] | None = None,
) -> SweepPlan:
    """Plan one retention sweep over ``rooms`` at ``now_ms``.

    A room with a ``max_lifetime`` gets a :class:`Purge` up to its cutoff, unless it
    is on hold or one of its ``senders`` is (then a :class:`SkippedPurge` names the
    hold), or ``last_purged`` shows it was already purged up to that cutoff or later.
    Rooms without ``max_lifetime`` are left out. Order follows ``rooms``.
    """
    last_purged = last_purged or {}
    purges: list[Purge] = []
    skipped: list[SkippedPurge] = []
    for room in rooms:
        cutoff = expiry_cutoff(room.policy, now_ms)
        if cutoff is None or cutoff == 0:
            continue
        if room.room_id in held_rooms:
            skipped.append(SkippedPurge(room.room_id, f"room {room.room_id} is on legal hold"))
            continue
        held = sorted(u for u in room.senders if u in held_users)
        if held:
            who = ", ".join(held)
            reason = f"legal hold on {who}, who sent messages in {room.room_id}"
            skipped.append(SkippedPurge(room.room_id, reason))
            continue
        previous = last_purged.get(room.room_id)
        if previous is not None and previous >= cutoff:
            continue
        purges.append(Purge(room.room_id, cutoff))
    return SweepPlan(tuple(purges), tuple(skipped))
