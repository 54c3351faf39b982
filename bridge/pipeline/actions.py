"""The executor's vocabulary: action kinds and one typed constructor per kind.

Every module that queues work for the executor builds its actions here, so each kind's
payload is spelled out once. The kinds' values are the strings stored in the actions
table: rows queued by an older version still run.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from bridge.store import NewAction


class ActionKind(enum.StrEnum):
    """What the executor can do (the stored ``kind`` of an action row)."""

    SEND_NOTICE = "send_notice"
    SEND_STATE = "send_state"
    REDACT = "redact"
    KICK = "kick"
    INVITE = "invite"
    JOIN = "join"
    LEAVE = "leave"
    MAKE_ROOM_ADMIN = "make_room_admin"
    RECONCILE = "reconcile"
    PURGE_HISTORY = "purge_history"
    PURGE_STATUS = "purge_status"
    POLICY_NOTICE = "policy_notice"
    WARN_SENDER = "warn_sender"


class Rendered(Protocol):
    """A text with its HTML form (a command :class:`~bridge.commands.Reply`)."""

    @property
    def text(self) -> str: ...

    @property
    def html(self) -> str: ...


def send_notice(
    room_id: str,
    body: str,
    html: str | None = None,
    *,
    reply_to: str | None = None,
    thread_root: str | None = None,
    mentions: Iterable[str] | None = None,
    details: Mapping[str, Any] | None = None,
) -> NewAction:
    """A notice (``m.notice``) in ``room_id``: a reply to ``reply_to``, or in the thread of
    ``thread_root``, mentioning ``mentions``. ``details`` go into the payload as they are
    (and so into the action's audit record; body and HTML do not)."""
    payload: dict[str, Any] = {"body": body}
    if html is not None:
        payload["html"] = html
    if reply_to:
        payload["reply_to"] = reply_to
    if thread_root:
        payload["thread_root"] = thread_root
    if mentions is not None:
        payload["mentions"] = list(mentions)
    payload.update(details or {})
    return NewAction(ActionKind.SEND_NOTICE, payload, room_id=room_id)


def notice(room_id: str, reply: Rendered, *, reply_to: str | None = None) -> NewAction:
    """A notice carrying a command reply (text and HTML), optionally as a reply."""
    return send_notice(room_id, reply.text, reply.html, reply_to=reply_to)


def send_state(
    room_id: str, event_type: str, content: Mapping[str, Any], state_key: str = ""
) -> NewAction:
    """A state event to send in ``room_id``."""
    payload = {"type": event_type, "content": dict(content), "state_key": state_key}
    return NewAction(ActionKind.SEND_STATE, payload, room_id=room_id)


def redact(
    room_id: str,
    event_id: str,
    reason: str,
    *,
    retention: bool = False,
    sender: str | None = None,
) -> NewAction:
    """The redaction of ``event_id``. A ``retention`` removal names the event's ``sender``:
    a legal hold placed after it was queued still spares it (the executor checks)."""
    payload: dict[str, Any] = {"event_id": event_id, "reason": reason}
    if retention:
        payload["retention"] = True
        payload["sender"] = sender
    return NewAction(ActionKind.REDACT, payload, room_id=room_id)


def kick(room_id: str, user_id: str, reason: str = "") -> NewAction:
    """Remove ``user_id`` from ``room_id``."""
    return NewAction(ActionKind.KICK, {"user_id": user_id, "reason": reason}, room_id=room_id)


def invite(room_id: str, user_id: str) -> NewAction:
    """Invite ``user_id`` to ``room_id`` (already being there counts as done)."""
    return NewAction(ActionKind.INVITE, {"user_id": user_id}, room_id=room_id)


def join(room_id: str, *, not_before: float = 0.0) -> NewAction:
    """The bot joins ``room_id`` (at ``not_before``, unix time)."""
    return NewAction(ActionKind.JOIN, {}, room_id=room_id, not_before=not_before)


def leave(room_id: str) -> NewAction:
    """The bot leaves ``room_id``."""
    return NewAction(ActionKind.LEAVE, {}, room_id=room_id)


def make_room_admin(room_id: str, user_id: str, *, not_before: float = 0.0) -> NewAction:
    """Synapse's admin API makes ``user_id`` (the bot) an admin of ``room_id``."""
    return NewAction(
        ActionKind.MAKE_ROOM_ADMIN, {"user_id": user_id}, room_id=room_id, not_before=not_before
    )


def reconcile(
    room_id: str,
    reason: str,
    *,
    rollout: str | None = None,
    after_admin: bool = False,
    not_before: float = 0.0,
) -> NewAction:
    """Bring ``room_id`` in line with policy (read state, plan, send, kick). ``rollout``:
    the rollout it belongs to; ``after_admin``: it follows a make_room_admin (no second)."""
    payload: dict[str, Any] = {"reason": reason}
    if rollout is not None:
        payload["rollout"] = rollout
    if after_admin:
        payload["after_admin"] = True
    return NewAction(ActionKind.RECONCILE, payload, room_id=room_id, not_before=not_before)


def purge_history(
    room_id: str,
    purge_up_to_ts: int,
    *,
    delete_local_events: bool = True,
    not_before: float = 0.0,
) -> NewAction:
    """Purge ``room_id``'s history before ``purge_up_to_ts`` (ms) with the admin API."""
    payload = {"purge_up_to_ts": purge_up_to_ts, "delete_local_events": delete_local_events}
    return NewAction(ActionKind.PURGE_HISTORY, payload, room_id=room_id, not_before=not_before)


def purge_status(
    room_id: str | None,
    purge: Mapping[str, Any],
    purge_id: str,
    started: float,
    *,
    not_before: float = 0.0,
) -> NewAction:
    """Poll the status of purge ``purge_id`` started at ``started`` (unix time); the
    ``purge`` payload it came from goes along (what was purged, for the audit record)."""
    payload = {**purge, "purge_id": purge_id, "started": started}
    return NewAction(ActionKind.PURGE_STATUS, payload, room_id=room_id, not_before=not_before)


def policy_notice(
    user_id: str, body: str, html: str, details: Mapping[str, Any] | None = None
) -> NewAction:
    """A notice to ``user_id`` in their policy-notice room, created (a DM with the bot)
    on first need. ``details`` (reference, rule, room; never the matched text) go into the
    payload and so into the action's audit record; body and HTML do not."""
    payload: dict[str, Any] = {"user_id": user_id, "body": body, "html": html}
    payload.update(details or {})
    return NewAction(ActionKind.POLICY_NOTICE, payload)


def warn_sender(
    room_id: str,
    user_id: str,
    event_id: str,
    thread: Rendered,
    dm: tuple[str, str],
    *,
    joined: bool,
    local: bool,
    details: Mapping[str, Any] | None = None,
) -> NewAction:
    """A ``warn`` for ``user_id``'s message ``event_id``: ``thread`` in a thread under it
    where the bot is in the room (``joined``) and the room is not encrypted, else ``dm``
    (text, HTML) in the user's notice room if ``local`` (see ``policy.notices.warn_place``)."""
    payload: dict[str, Any] = {
        "user_id": user_id,
        "thread_root": event_id,
        "mentions": [user_id],  # the thread reply pings the sender
        "body": thread.text,
        "html": thread.html,
        "dm_body": dm[0],
        "dm_html": dm[1],
        "joined": joined,
        "local": local,
    }
    payload.update(details or {})
    return NewAction(ActionKind.WARN_SENDER, payload, room_id=room_id)


def kind_of(kind: str) -> ActionKind | None:
    """The kind of a stored action row, or None for a kind this version does not know."""
    try:
        return ActionKind(kind)
    except ValueError:
        return None
