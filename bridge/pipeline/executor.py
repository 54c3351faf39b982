"""The enforcement executor: the only place that acts on Matrix and the admin API.

Actions are rows in the store (written in the same commit as the decision that produced
them), so they survive restarts. Each attempt's outcome is recorded; transient failures
retry with exponential backoff, ``M_LIMIT_EXCEEDED`` waits ``retry_after_ms``, and
permanent failures are kept with a reason an admin can read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

from mautrix.api import Method, Path
from mautrix.client import ClientAPI
from mautrix.errors import MatrixConnectionError, MatrixRequestError
from mautrix.types import EventType, RoomCreatePreset, RoomID, UserID

from bridge import metrics
from bridge.audit.kinds import AuditKind
from bridge.config import ExecutorConfig
from bridge.e2ee.seam import RoomCrypto
from bridge.matrix import AdminAPI
from bridge.pipeline.actions import ActionKind, kind_of, purge_status
from bridge.pipeline.enforcement import RoomEnforcement
from bridge.policy.notices import WarnPlace, warn_place
from bridge.policy.retention import event_hold, purge_hold
from bridge.store import ActionRow, AuditEntry, NewAction, Store
from bridge.store.notice_rooms import (
    NOTICE_ROOM_NAME,
    NOTICE_ROOM_TOPIC,
    notice_room,
    remember_notice_room,
)
from bridge.store.sweep_queries import SweepQueries

log = logging.getLogger(__name__)

# What each action needs the bot to be allowed to do, for messages to admins.
_NEEDS: dict[str, str] = {
    ActionKind.SEND_NOTICE: "send messages",
    ActionKind.SEND_STATE: "send state events",
    ActionKind.REDACT: "redact events",
    ActionKind.KICK: "kick users",
    ActionKind.INVITE: "invite users",
    ActionKind.JOIN: "join",
    ActionKind.LEAVE: "leave",
    ActionKind.MAKE_ROOM_ADMIN: "use the admin API make_room_admin",
    ActionKind.RECONCILE: "read the room state",
    ActionKind.PURGE_HISTORY: "purge history with the admin API",
    ActionKind.PURGE_STATUS: "read a purge's status with the admin API",
    ActionKind.POLICY_NOTICE: "create or write to a policy-notice room",
    ActionKind.WARN_SENDER: "warn a sender",
}
#: Failures that mean the bot lacks power in the room (recorded on the room's row).
_LACKS_POWER = frozenset(
    {ActionKind.SEND_STATE, ActionKind.REDACT, ActionKind.KICK, ActionKind.INVITE}
)

#: Payload keys holding message texts: not copied into the action's audit record.
_TEXTS = frozenset({"body", "html", "dm_body", "dm_html"})

# A purge still running after this long is given up on (and reported).
PURGE_GIVE_UP_S = 24 * 3600.0
_END = 1 << 62  # a timestamp after every real one


class PermanentFailure(Exception):
    """The action cannot succeed by retrying (forbidden, unknown room, bad request)."""


class Deferred(Exception):
    """Not finished yet (e.g. a purge still running): look again in ``delay`` seconds.

    Does not use up an attempt.
    """

    def __init__(self, why: str, delay: float) -> None:
        super().__init__(why)
        self.delay = delay


class RateLimiter:
    """A token bucket: at most ``rate`` acquisitions per second, bursts up to ``burst``."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate)
        self._tokens = self.burst
        self._last = time.monotonic()

    async def acquire(self) -> None:
        while True:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            if self._tokens >= 1:
                self._tokens -= 1
                return
            await asyncio.sleep((1 - self._tokens) / self.rate)


def describe_failure(
    action: ActionRow, err: MatrixRequestError, step: ActionKind | None = None
) -> str:
    """An admin-readable reason for a failed action (``step``: the kind of the failed part)."""
    kind = step or action.kind
    what = _NEEDS.get(kind, kind)
    where = f" in {action.room_id}" if action.room_id else ""
    detail = err.message or getattr(err, "text", "") or ""
    if err.http_status == 403 and "not in room" in detail and kind != ActionKind.RECONCILE:
        # Synapse: "User @bot is not in room !r": no power would help; the bot must join.
        # (A reconcile's refusal keeps its words: the room enforcer reads them as "not
        # joined".)
        return (
            f"the bot is not a member of {action.room_id or 'the room'}, so it cannot {what}"
            f" (invite it, or enrol the room: see docs/deployment.md)"
        )
    if err.http_status == 403:
        return f"the bot is not allowed to {what}{where} ({err.errcode}: {detail})"
    if err.http_status == 404:
        return f"not found while trying to {what}{where} ({err.errcode}: {detail})"
    return f"homeserver refused to {what}{where}: HTTP {err.http_status} {err.errcode}: {detail}"


async def _step(action: ActionRow, step: ActionKind, request: Awaitable[Any]) -> Any:
    """One request of a multi-step action; a refusal names the step that was refused.

    Rate limits and 5xx pass through unchanged so the action is retried as a whole.
    """
    try:
        return await request
    except MatrixRequestError as e:
        if e.errcode == "M_LIMIT_EXCEEDED" or e.http_status == 429 or e.http_status >= 500:
            raise
        raise PermanentFailure(describe_failure(action, e, step)) from e


class Executor:
    """Runs pending actions from the store."""

    def __init__(
        self,
        store: Store,
        client: ClientAPI,
        config: ExecutorConfig,
        admin: AdminAPI | None = None,
        on_permanent_failure: Callable[[ActionRow, str], Awaitable[None]] | None = None,
        rooms: RoomEnforcement | None = None,
    ) -> None:
        self.store = store
        self.client = client
        self.config = config
        self.admin = admin
        self.on_permanent_failure = on_permanent_failure
        self.rooms = rooms
        self.crypto: RoomCrypto | None = None  # the bot's E2EE device, once opened (app)
        self.limiter = RateLimiter(config.rate_per_second)
        self._wake = asyncio.Event()
        self._handlers: dict[ActionKind, Callable[[ActionRow], Awaitable[dict[str, Any]]]] = {
            ActionKind.SEND_NOTICE: self._send_notice,
            ActionKind.SEND_STATE: self._send_state,
            ActionKind.REDACT: self._redact,
            ActionKind.KICK: self._kick,
            ActionKind.INVITE: self._invite,
            ActionKind.JOIN: self._join,
            ActionKind.LEAVE: self._leave,
            ActionKind.MAKE_ROOM_ADMIN: self._make_room_admin,
            ActionKind.RECONCILE: self._reconcile,
            ActionKind.PURGE_HISTORY: self._purge_history,
            ActionKind.PURGE_STATUS: self._purge_status,
            ActionKind.POLICY_NOTICE: self._policy_notice,
            ActionKind.WARN_SENDER: self._warn_sender,
        }

    def wake(self) -> None:
        """New actions were committed: look at the queue now."""
        self._wake.set()

    async def submit(self, actions: list[NewAction]) -> None:
        """Persist actions and wake the loop (for callers outside the worker's commit)."""
        await self.store.actions.enqueue(actions)
        self.wake()

    async def run(self) -> None:
        """Process due actions forever; sleeps until woken or the next retry is due."""
        while True:
            try:
                ran = await self.run_due()
                # (inside the try: a database outage must not end the loop)
                nxt = None if ran else await self.store.actions.next_time()
            except Exception:
                log.exception("executor loop error; retrying in 5s")
                await asyncio.sleep(5)
                continue
            if ran:
                continue
            timeout = 30.0 if nxt is None else max(0.05, min(30.0, nxt - time.time()))
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass

    async def run_due(self, limit: int = 50) -> int:
        """Attempt every action that is due now; returns how many were attempted."""
        due = await self.store.actions.due(time.time(), limit)
        for action in due:
            await self.limiter.acquire()
            await self.attempt(action)
        return len(due)

    async def attempt(self, action: ActionRow) -> None:
        """One attempt at one action, with its outcome recorded."""
        kind = kind_of(action.kind)
        handler = None if kind is None else self._handlers[kind]
        attempts = action.attempts + 1
        hold = await self._held(action)
        if hold is not None:
            # A hold placed after the sweep queued this: the hold wins, nothing is removed.
            metrics.EXECUTOR_ACTIONS.labels(action.kind, "held").inc()
            await self.store.actions.finish(
                action.id,
                status="cancelled",
                attempts=action.attempts,
                error=f"legal hold: {hold}",
                audit=self._audit(action, "cancelled: legal hold", action.attempts, hold=hold),
            )
            return
        try:
            if handler is None:
                raise PermanentFailure(f"unknown action kind {action.kind!r}")
            result = await handler(action)
        except MatrixRequestError as e:
            if e.errcode == "M_LIMIT_EXCEEDED" or e.http_status == 429:
                retry_ms = getattr(e, "retry_after_ms", None) or 1000
                metrics.RATE_LIMIT_WAITS.inc()
                log.info("rate limited on %s %s; waiting %dms", action.kind, action.id, retry_ms)
                # Rate limiting is not the action's fault: it does not use up an attempt.
                await self._retry(action, action.attempts, retry_ms / 1000, "rate limited")
                return
            if e.http_status >= 500:
                await self._transient(action, attempts, f"HTTP {e.http_status} {e.errcode}")
                return
            await self._fail(action, attempts, describe_failure(action, e))
            return
        except (MatrixConnectionError, OSError, TimeoutError) as e:
            await self._transient(action, attempts, f"homeserver unreachable: {e}")
            return
        except PermanentFailure as e:
            await self._fail(action, attempts, str(e))
            return
        except Deferred as e:
            await self._retry(action, action.attempts, e.delay, str(e))
            return
        except Exception as e:
            # A bug must not wedge the queue behind this action: record it and move on.
            log.exception("action %s (%s) raised unexpectedly", action.id, action.kind)
            await self._fail(action, attempts, f"internal error: {e.__class__.__name__}")
            return
        metrics.EXECUTOR_ACTIONS.labels(action.kind, "done").inc()
        await self.store.actions.finish(
            action.id,
            status="done",
            attempts=attempts,
            audit=self._audit(action, "done", attempts, result=result),
        )
        if kind is ActionKind.JOIN and action.room_id:
            await self.store.rooms.upsert(action.room_id, joined=True)
        if kind is ActionKind.RECONCILE and self.rooms and self.rooms.on_result:
            await self.rooms.on_result(action.room_id or "", {**result, "payload": action.payload})

    async def _held(self, action: ActionRow) -> str | None:
        """The legal hold a retention removal must not break (its reason), or None.

        The same rules as the sweeper's (:mod:`bridge.policy.retention`), with the holds
        as they are now: a redaction is held by its room's or its sender's hold; a purge by
        its room's hold or by a hold on any user who sent messages in the room before
        ``purge_up_to_ts`` (``purge_history`` cannot spare one sender).
        """
        kind = kind_of(action.kind)
        retention = kind in (ActionKind.PURGE_HISTORY, ActionKind.PURGE_STATUS) or (
            kind is ActionKind.REDACT and action.payload.get("retention")
        )
        if not retention:
            return None
        held = await self.store.holds.current()
        room = action.room_id
        if kind is ActionKind.REDACT:
            sender = action.payload.get("sender")
            return event_hold(
                room, sender if isinstance(sender, str) else None, held.rooms, held.users
            )
        senders: set[str] = set()
        if kind is ActionKind.PURGE_HISTORY and room and held.users:
            up_to = action.payload.get("purge_up_to_ts")
            before = up_to if isinstance(up_to, int) and not isinstance(up_to, bool) else _END
            senders = await SweepQueries(self.store).senders_before(room, held.users, before)
        # (a purge_status polls a purge Synapse already runs: only a room hold stops it)
        return purge_hold(room, held.rooms, senders)

    async def _retry(self, action: ActionRow, attempts: int, delay: float, why: str) -> None:
        await self.store.actions.finish(
            action.id, status="pending", attempts=attempts, next_at=time.time() + delay, error=why
        )

    async def _transient(self, action: ActionRow, attempts: int, why: str) -> None:
        if attempts >= self.config.max_attempts:
            await self._fail(action, attempts, f"gave up after {attempts} attempts: {why}")
            return
        metrics.EXECUTOR_ACTIONS.labels(action.kind, "retry").inc()
        delay = min(self.config.max_backoff, self.config.initial_backoff * 2 ** (attempts - 1))
        log.warning(
            "action %s (%s) failed (%s); retry %d in %.1fs",
            action.id,
            action.kind,
            why,
            attempts,
            delay,
        )
        await self._retry(action, attempts, delay, why)

    async def _fail(self, action: ActionRow, attempts: int, reason: str) -> None:
        metrics.EXECUTOR_ACTIONS.labels(action.kind, "failed").inc()
        log.warning("action %s (%s) failed permanently: %s", action.id, action.kind, reason)
        await self.store.actions.finish(
            action.id,
            status="failed",
            attempts=attempts,
            error=reason,
            audit=self._audit(action, "failed", attempts, error=reason),
        )
        kind = kind_of(action.kind)
        if action.room_id and kind in _LACKS_POWER:
            await self.store.rooms.upsert(action.room_id, lacking=f"cannot {_NEEDS[action.kind]}")
        if kind is ActionKind.RECONCILE and self.rooms and self.rooms.on_result:
            await self.rooms.on_result(
                action.room_id or "", {"error": reason, "payload": action.payload}
            )
        if self.on_permanent_failure is not None:
            try:
                await self.on_permanent_failure(action, reason)
            except Exception:
                log.exception("reporting the failure of action %s failed", action.id)

    @staticmethod
    def _audit(action: ActionRow, outcome: str, attempts: int, **extra: Any) -> AuditEntry:
        payload = {k: v for k, v in action.payload.items() if k not in _TEXTS}
        return AuditEntry(
            kind=AuditKind.ACTION,
            room_id=action.room_id,
            type=action.kind,
            data={
                "action_id": action.id,
                "kind": action.kind,
                "outcome": outcome,
                "attempts": attempts,
                "payload": payload,
                **extra,
            },
        )

    # -- handlers -----------------------------------------------------------------------

    def _room(self, action: ActionRow) -> Any:
        if not action.room_id:
            raise PermanentFailure(f"{action.kind} needs a room")
        return action.room_id

    async def _send_notice(self, action: ActionRow) -> dict[str, Any]:
        p = action.payload
        content: dict[str, Any] = {"msgtype": p.get("msgtype", "m.notice"), "body": p["body"]}
        if p.get("html"):
            content["format"] = "org.matrix.custom.html"
            content["formatted_body"] = p["html"]
        if p.get("thread_root"):
            content["m.relates_to"] = {
                "rel_type": "m.thread",
                "event_id": p["thread_root"],
                "is_falling_back": True,
                "m.in_reply_to": {"event_id": p["thread_root"]},
            }
        elif p.get("reply_to"):
            content["m.relates_to"] = {"m.in_reply_to": {"event_id": p["reply_to"]}}
        if p.get("mentions") is not None:
            content["m.mentions"] = {"user_ids": list(p["mentions"])}
        event_id = await self._send_message(self._room(action), content, action.id)
        return {"event_id": str(event_id)}

    async def _send_message(self, room: str, content: dict[str, Any], txn_id: str) -> str:
        """Send an ``m.room.message`` of the bot; encrypted in an encrypted room when the
        bot has its E2EE device (``crypto``)."""
        if self.crypto is not None and await self.crypto.is_encrypted(room):
            encrypted = await self.crypto.encrypt(room, "m.room.message", content)
            event_id = await self.client.send_message_event(
                RoomID(room), EventType.ROOM_ENCRYPTED, cast(Any, encrypted), txn_id=txn_id
            )
        else:
            event_id = await self.client.send_message_event(
                RoomID(room), EventType.ROOM_MESSAGE, cast(Any, content), txn_id=txn_id
            )
        return str(event_id)

    async def _policy_notice(self, action: ActionRow) -> dict[str, Any]:
        """Write to the user's policy-notice room (see :meth:`_to_notice_room`)."""
        p = action.payload
        return await self._to_notice_room(action, str(p["user_id"]), p["body"], p["html"])

    async def _encrypted(self, room_id: str) -> bool:
        """Whether ``room_id`` has end-to-end encryption on (its m.room.encryption state)."""
        try:
            await self.client.get_state_event(RoomID(room_id), EventType.ROOM_ENCRYPTION)
        except MatrixRequestError as e:
            if e.http_status == 404:
                return False
            raise
        return True

    async def _warn_sender(self, action: ActionRow) -> dict[str, Any]:
        """A ``warn``: in a thread where readable, else in the sender's notice room."""
        p = action.payload
        room = self._room(action)
        joined = bool(p.get("joined"))
        encrypted = joined and await self._encrypted(room)
        # With its own E2EE device the bot answers in the thread, encrypted (bridge.e2ee).
        place = warn_place(joined, encrypted and self.crypto is None, bool(p.get("local")))
        if place is WarnPlace.THREAD:
            return {"place": str(place), **(await self._send_notice(action))}
        if place is WarnPlace.NOWHERE:
            return {"place": str(place), "encrypted": encrypted}
        sent = await self._to_notice_room(action, str(p["user_id"]), p["dm_body"], p["dm_html"])
        return {"place": str(place), "encrypted": encrypted, **sent}

    async def _to_notice_room(
        self, action: ActionRow, user: str, body: str, html: str
    ) -> dict[str, Any]:
        """Write to ``user``'s policy-notice room, creating it first if there is none.

        The executor runs one action at a time, so two notices never create two rooms.
        """
        p = {"body": body, "html": html}
        room = await notice_room(self.store, user)
        created = False
        if room is None:
            room = str(
                await self.client.create_room(
                    preset=RoomCreatePreset.PRIVATE,
                    name=NOTICE_ROOM_NAME,
                    topic=NOTICE_ROOM_TOPIC,
                    invitees=[UserID(user)],
                    is_direct=True,
                )
            )
            await remember_notice_room(self.store, user, room)
            await self.store.rooms.upsert(room, joined=True)
            created = True
        content: dict[str, Any] = {
            "msgtype": "m.notice",
            "body": p["body"],
            "format": "org.matrix.custom.html",
            "formatted_body": p["html"],
            "m.mentions": {"user_ids": [user]},
        }
        event_id = await self._send_message(room, content, action.id)
        return {"notice_room": room, "created": created, "event_id": str(event_id)}

    async def _send_state(self, action: ActionRow) -> dict[str, Any]:
        p = action.payload
        etype = EventType.find(p["type"], t_class=EventType.Class.STATE)
        event_id = await self.client.send_state_event(
            self._room(action), etype, p["content"], state_key=p.get("state_key", "")
        )
        return {"event_id": str(event_id)}

    async def _redact(self, action: ActionRow) -> dict[str, Any]:
        p = action.payload
        event_id = await self.client.redact(
            self._room(action), p["event_id"], reason=p.get("reason")
        )
        return {"redaction_id": str(event_id)}

    async def _kick(self, action: ActionRow) -> dict[str, Any]:
        p = action.payload
        await self.client.kick_user(self._room(action), p["user_id"], reason=p.get("reason", ""))
        return {}

    async def _invite(self, action: ActionRow) -> dict[str, Any]:
        p = action.payload
        try:
            await self.client.invite_user(self._room(action), p["user_id"])
        except MatrixRequestError as e:
            # Already invited or joined: the goal is reached.
            if e.http_status == 403 and "already" in (e.message or "").lower():
                return {"already": True}
            raise
        return {}

    async def _join(self, action: ActionRow) -> dict[str, Any]:
        room_id = await self.client.join_room_by_id(self._room(action))
        return {"room_id": str(room_id)}

    async def _leave(self, action: ActionRow) -> dict[str, Any]:
        await self.client.leave_room(self._room(action))
        return {}

    async def _reconcile(self, action: ActionRow) -> dict[str, Any]:
        """Bring one room in line with policy: read its state, plan, send, kick."""
        if self.rooms is None:
            raise PermanentFailure("room enforcement is not configured")
        room = self._room(action)
        state = await _step(
            action,
            ActionKind.RECONCILE,
            self.client.api.request(Method.GET, Path.v3.rooms[room].state),
        )
        if not isinstance(state, list):
            raise PermanentFailure("the homeserver returned no state list")
        self.rooms.on_state(room, state)
        plan = self.rooms.plan(room, state)
        sent, kicked = [], []
        for etype, key, content in plan.set_state:
            etype_obj = EventType.find(etype, t_class=EventType.Class.STATE)
            await _step(
                action,
                ActionKind.SEND_STATE,
                self.client.send_state_event(room, etype_obj, cast(Any, content), state_key=key),
            )
            sent.append(etype)
        for user, reason in plan.kicks:
            await _step(
                action, ActionKind.KICK, self.client.kick_user(room, UserID(user), reason=reason)
            )
            kicked.append(user)
        return {
            "sent": sent,
            "kicked": kicked,
            "lacking": list(plan.lacking),
            "unkickable": [f"{u}: {why}" for u, why in plan.unkickable],
        }

    async def _make_room_admin(self, action: ActionRow) -> dict[str, Any]:
        if self.admin is None:
            raise PermanentFailure("no Synapse admin token configured (homeserver.admin_token)")
        await self.admin.make_room_admin(self._room(action), action.payload["user_id"])
        return {}

    async def _purge_history(self, action: ActionRow) -> dict[str, Any]:
        """Start a purge (admin API) and queue the polling of its status."""
        if self.admin is None:
            raise PermanentFailure("no Synapse admin token configured (homeserver.admin_token)")
        p = action.payload
        try:
            purge_id = await self.admin.purge_history(
                self._room(action),
                int(p["purge_up_to_ts"]),
                bool(p.get("delete_local_events", True)),
            )
        except MatrixRequestError as e:
            if e.http_status == 404 and "no event to be purged" in (e.message or ""):
                return {"purged": False, "why": "nothing older than the cutoff"}
            raise
        poll = purge_status(action.room_id, p, purge_id, time.time(), not_before=time.time() + 1)
        await self.store.actions.enqueue([poll])
        self.wake()
        return {"purge_id": purge_id}

    async def _purge_status(self, action: ActionRow) -> dict[str, Any]:
        """Poll a purge until Synapse reports it complete or failed."""
        if self.admin is None:
            raise PermanentFailure("no Synapse admin token configured (homeserver.admin_token)")
        p = action.payload
        status = await self.admin.purge_status(str(p["purge_id"]))
        if status == "complete":
            return {"status": status, "purge_id": p["purge_id"]}
        if status == "failed":
            raise PermanentFailure(f"Synapse reports purge {p['purge_id']} failed")
        if time.time() - float(p.get("started", time.time())) > PURGE_GIVE_UP_S:
            raise PermanentFailure(f"purge {p['purge_id']} still {status} after a day")
        raise Deferred(f"purge {status}", 2.0)
