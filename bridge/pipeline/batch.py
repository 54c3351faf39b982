"""The unit of the worker's work: everything the transactions of one batch produce (one or
more, in order), committed together.

The worker's stages (room tracking, commands, policy enforcement) never write to the store
or change what they remember while they judge a transaction: they stage writes in the
:class:`Batch`, and changes to their in-memory state in ``after_commit``. The worker
commits the batch in the same commit that marks the transaction processed, then runs
``after_commit``. A failed commit leaves nothing changed; the transaction is processed
again from scratch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypedDict

from bridge.policy.spaces import SpaceLinks
from bridge.store import AuditEntry, NewAction, RoomUpdate
from bridge.store.media import MediaCheck


class PendingConfirmation(TypedDict):
    """A command waiting for its sender's ✅ reaction (stored as JSON)."""

    sender: str
    event: dict[str, Any]
    at: float


@dataclass
class Batch:
    """What processing a batch of transactions produced, committed together.

    ``rooms``: the room rows to write, by room. ``spaces`` and ``confirmations``: the
    space links and pending confirmations as this batch leaves them, when it changed them
    (later events of the same transaction must see earlier ones' changes, which reach
    the in-memory copies only after the commit).
    """

    actions: list[NewAction] = field(default_factory=list)
    audit: list[AuditEntry] = field(default_factory=list)
    state: dict[str, str] = field(default_factory=dict)
    rooms: dict[str, RoomUpdate] = field(default_factory=dict)
    spaces: SpaceLinks | None = None
    confirmations: dict[str, PendingConfirmation] | None = None
    after_commit: list[Callable[[], None]] = field(default_factory=list)
    #: attachments: in-room media checks to queue (issue 12)
    media: list[MediaCheck] = field(default_factory=list)

    def stage_room(
        self, room_id: str, *, joined: bool | None = None, lacking: str | None = None
    ) -> None:
        """Write the room's row with this batch (None: keep what is stored)."""
        old = self.rooms.get(room_id)
        if old is not None:
            joined = old.joined if joined is None else joined
            lacking = old.lacking if lacking is None else lacking
        self.rooms[room_id] = RoomUpdate(room_id, joined=joined, lacking=lacking)

    def staged_joined(self, room_id: str) -> bool | None:
        """Whether this batch marks the bot joined to ``room_id`` (None: it does not say)."""
        staged = self.rooms.get(room_id)
        return None if staged is None else staged.joined


def as_str(value: object) -> str | None:
    """``value`` if it is a string (event fields are untrusted JSON), else None."""
    return value if isinstance(value, str) else None
