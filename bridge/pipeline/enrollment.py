"""Auto-enrolment (``bridge.auto_enroll``): bring every room of the homeserver under the
bridge through Synapse's admin API, and obtain power where a reconcile found it lacking.

Enrolling a room queues ``make_room_admin`` for the bot, then a ``join``. The whole run is
retried while the homeserver or the database fails, and given up (and reported in the
management room) when the admin API refuses the token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from aiohttp import ClientError
from mautrix.errors import MatrixRequestError

from bridge.commands import Reply
from bridge.matrix import AdminAPI
from bridge.pipeline import actions
from bridge.pipeline.enforcement import RoomEnforcer
from bridge.store import NewAction, Store, StoreUnavailable

log = logging.getLogger(__name__)

AUTO_ENROLL_RETRY = (5, 15, 60, 300)  # seconds between attempts while Synapse or the DB fails

Submit = Callable[[list[NewAction]], Awaitable[None]]


class AutoEnroller:
    """Enrols every room the homeserver has and the bot has not joined yet."""

    def __init__(
        self,
        admin: AdminAPI,
        store: Store,
        submit: Submit,
        notify: Callable[[Reply], Awaitable[None]],
        bot_mxid: str,
        *,
        retry: Sequence[float] = AUTO_ENROLL_RETRY,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.admin = admin
        self.store = store
        self.submit = submit
        self.notify = notify
        self.bot_mxid = bot_mxid
        self.retry = tuple(retry)
        self.sleep = sleep

    async def run(self) -> None:
        """Enrol, retried with :data:`AUTO_ENROLL_RETRY` while the homeserver or the
        database fails; given up (and reported) when the admin API refuses the token."""
        for delay in (*self.retry, None):
            try:
                await self.enroll_once()
                return
            except MatrixRequestError as e:
                if 400 <= e.http_status < 500:
                    await self._refused(e)
                    return
                failure: Exception = e
            except (StoreUnavailable, ClientError, TimeoutError) as e:
                failure = e
            if delay is None:
                log.error("auto-enrolment gave up: %r", failure)
                return
            log.warning("auto-enrolment failed (%r); retrying in %ds", failure, delay)
            await self.sleep(delay)

    async def _refused(self, e: MatrixRequestError) -> None:
        log.error(
            "auto-enrolment impossible: the admin API refused homeserver.admin_token (%s %s)",
            e.http_status,
            e.errcode,
        )
        with contextlib.suppress(StoreUnavailable):
            await self.notify(
                Reply.plain(
                    "⚠️ auto-enrolment failed: Synapse's admin API refused the "
                    f"bridge's admin token ({e.errcode}). Rooms are not enrolled "
                    "until it is fixed and the bridge restarted."
                )
            )

    async def enroll_once(self) -> int:
        """Queue make_room_admin + join for every room not joined yet; returns how many."""
        rooms = await self.admin.list_rooms()
        known = {r["room_id"] for r in await self.store.rooms.known() if r["joined"]}
        todo = [r for r in rooms if r not in known]
        queued: list[NewAction] = []
        for room in todo:
            queued.append(actions.make_room_admin(room, self.bot_mxid))
            # Due at once, but ordered after every make_room_admin (the queue runs by
            # not_before, then creation time, which ties within a batch): joining a
            # private room before make_room_admin's invite would be refused.
            queued.append(actions.join(room, not_before=1.0))
        if queued:
            await self.submit(queued)
        log.info("auto-enrolment: %d of %d rooms queued", len(todo), len(rooms))
        return len(todo)


class PowerObtainer:
    """After a reconcile: record its result, and where the bot lacked power, obtain it
    through ``make_room_admin`` and reconcile again (``bridge.obtain_power``, admin token).

    ``allowed`` is read at each result, so a reload that changes ``obtain_power`` counts.
    """

    def __init__(
        self,
        rooms: RoomEnforcer,
        submit: Submit,
        bot_mxid: str,
        allowed: Callable[[], bool],
    ) -> None:
        self.rooms = rooms
        self.submit = submit
        self.bot_mxid = bot_mxid
        self.allowed = allowed

    async def on_result(self, room_id: str, result: Mapping[str, Any]) -> None:
        """The executor's callback for a finished reconcile of ``room_id``."""
        lacking = result.get("lacking") or []
        payload = result.get("payload") or {}
        obtaining = bool(lacking and not payload.get("after_admin") and self.allowed())
        # While obtaining, the second reconcile (same rollout) gives the room's outcome.
        await self.rooms.on_result(room_id, result, obtaining=obtaining)
        if obtaining:
            log.info("obtaining power in %s through make_room_admin", room_id)
            rollout = payload.get("rollout")
            await self.submit(
                [
                    actions.make_room_admin(room_id, self.bot_mxid),
                    actions.reconcile(
                        room_id,
                        "after make_room_admin",
                        rollout=rollout if isinstance(rollout, str) else None,
                        after_admin=True,
                    ),
                ]
            )
