"""The management room: finding or creating it at start, and the notices posted there.

At start the room is, in this order: the configured room (an alias is resolved), the room a
previous start stored, or a new room the bot creates and to which it invites the admins of
``bridge.permissions``. Notices go through the executor's queue, so they survive a restart.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar, cast

from mautrix.client import ClientAPI
from mautrix.errors import MatrixRequestError
from mautrix.types import RoomAlias, RoomID, UserID

from bridge.commands import Reply
from bridge.config import BridgeConfig
from bridge.pipeline.actions import ActionKind, notice
from bridge.pipeline.notices import SenderNotices
from bridge.pipeline.worker import notify_text
from bridge.policy.model import Action, Verdict
from bridge.roles import Role
from bridge.scheduler import Scheduler, TaskKind
from bridge.store import ActionRow, NewAction, Store

log = logging.getLogger(__name__)

MANAGEMENT_ROOM_KEY = "management_room"  # the store's state key of the room created at start

#: How long creating or joining the management room is retried while the homeserver's gate
#: module cannot reach a bridge (it answers M_UNKNOWN when it fails closed). This happens at
#: start behind a load balancer that has not yet seen this replica ready (docs/deployment.md).
GATE_PATIENCE_S = 60.0

_T = TypeVar("_T")


async def _patiently(what: str, op: Callable[[], Awaitable[_T]]) -> _T:
    """``op()``, retried with backoff while the homeserver answers that its policy module
    could not check the request (M_UNKNOWN) or a 5xx, for up to :data:`GATE_PATIENCE_S`."""
    deadline = time.monotonic() + GATE_PATIENCE_S
    delay = 0.5
    while True:
        try:
            return await op()
        except MatrixRequestError as e:
            transient = e.errcode == "M_UNKNOWN" or e.http_status >= 500
            if not transient or time.monotonic() + delay > deadline:
                raise
            log.warning("%s: the homeserver's gate cannot answer yet (%s); retrying", what,
                        e.errcode or e.http_status)  # fmt: skip
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


# Action kinds that are not reported as failures: a notice cannot report itself, and a
# reconcile's failure is the room enforcer's to report (batched per rollout, once per room).
UNREPORTED_FAILURES = frozenset({ActionKind.SEND_NOTICE, ActionKind.RECONCILE})


async def known_room(store: Store, configured: str) -> str:
    """The management room as known before the homeserver answers ("" if none yet)."""
    return configured or await store.state.get(MANAGEMENT_ROOM_KEY) or ""


async def bootstrap(client: ClientAPI, store: Store, config: BridgeConfig) -> str:
    """Resolve, reuse or create the management room, join it, and record it as joined.

    Returns its room ID. Raises what the homeserver raises for an alias it cannot resolve
    or a room it cannot create.
    """
    room = config.management_room
    if room.startswith("#"):
        resolved = await client.resolve_room_alias(RoomAlias(room))
        room = str(resolved.room_id)
    if not room:
        room = await store.state.get(MANAGEMENT_ROOM_KEY) or ""
    if room:
        try:
            await _patiently(
                "joining the management room", lambda: client.join_room_by_id(RoomID(room))
            )
        except MatrixRequestError as e:
            log.error("cannot join the management room %s: %s", room, e.message)
    else:
        admins = [u for u, r in config.permissions.items() if r is Role.ADMIN and "*" not in u]
        room = str(
            await _patiently(
                "creating the management room",
                lambda: client.create_room(
                    name="Policy bridge management",
                    topic="Commands and reports of the policy bridge. Type !policy help.",
                    invitees=[UserID(a) for a in admins],
                    is_direct=False,
                    # Room version 12 makes the creator (the bot) all-powerful already;
                    # listing it in users is refused.
                    power_level_override=cast(Any, {"users": dict.fromkeys(admins, 100)}),
                ),
            )
        )
        await store.state.set(MANAGEMENT_ROOM_KEY, room)
        log.info("created the management room %s and invited %d admins", room, len(admins))
    await store.rooms.upsert(room, joined=True)
    return room


class ManagementRoom:
    """Where the management room is, and the notices the bridge posts there.

    ``submit`` queues actions for the executor; ``scheduler`` runs the notices of refused
    events, which the gate reports from synchronous code. Every notice is dropped while no
    management room is known.
    """

    def __init__(
        self,
        submit: Callable[[list[NewAction]], Awaitable[None]],
        scheduler: Scheduler,
        room_id: str = "",
    ) -> None:
        self._submit = submit
        self._scheduler = scheduler
        self.room_id = room_id
        #: Explains refusals to their local senders (set once the audit sink exists).
        self.sender_notices: SenderNotices | None = None

    async def notify(self, reply: Reply) -> None:
        """Post ``reply`` in the management room (through the executor's queue)."""
        if self.room_id:
            await self._submit([notice(self.room_id, reply)])

    async def report_failure(self, action: ActionRow, reason: str) -> None:
        """An executor action failed for good: say so (except notices and reconciles)."""
        if action.kind in UNREPORTED_FAILURES:
            return
        await self.notify(Reply.plain(f"⚠️ {action.kind} failed: {reason}"))

    def gate_blocked(self, subject: Mapping[str, Any], verdict: Verdict) -> None:
        """An event the gate refused: tell its local sender in their notice room, and for
        `notify` rules the management room (in the background; the gate answers at once)."""
        if self.sender_notices is not None:
            self.sender_notices.blocked(subject, verdict)
        wanted = [f for f in verdict.findings if Action.NOTIFY in f.actions]
        if not wanted or not self.room_id:
            return
        lines = [
            notify_text(f, "blocked", subject.get("sender"), subject.get("room_id")) for f in wanted
        ]
        self._scheduler.spawn(
            self.notify(Reply.plain("\n".join(lines))), "gate-notice", TaskKind.ONE_OFF
        )
