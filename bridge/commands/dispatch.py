"""Running one command line: parse, check the role and the room, call the handler.

A policy-notice room (the bot's DM with one user, see :mod:`bridge.store.notice_rooms`) is
different on purpose: there only its recipient is heard, and only the self-service commands
(``CommandSpec.notice_room``: ``report``, ``override``) run, with or without a role.
Anyone else's command there is ignored (no reply); self-service commands work nowhere else.

The worker decides whether a message is a command, keeps the commands awaiting a ✅
confirmation, and commits what :func:`run_command` returns (the reply, the staged changes
and the audit details) in one commit with the rest of its batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from bridge.commands.context import CommandContext
from bridge.commands.errors import CommandError, NeedsConfirmation
from bridge.commands.registry import (
    MAX_COMMAND_LENGTH,
    CommandRegistry,
    summarize_args,
    tokenize,
)
from bridge.commands.replies import Reply
from bridge.commands.roles import Role, role_allows
from bridge.commands.services import CommandServices
from bridge.policy.notices import Language
from bridge.policy.notices import text as notice_text

log = logging.getLogger(__name__)


class Outcome(StrEnum):
    """How a command ended (a metrics label and part of its audit record)."""

    OK = "ok"
    REFUSED = "refused"  # no role, not the role it needs, or not allowed in this room
    ERROR = "error"  # bad input, or the handler failed
    NEEDS_CONFIRMATION = "needs confirmation"
    IGNORED = "ignored"  # someone else's command in a notice room: no reply at all


@dataclass(frozen=True, slots=True)
class CommandRequest:
    """A command line typed by ``sender`` in ``room_id``: ``body`` starts with ``prefix``."""

    sender: str
    room_id: str
    event_id: str
    prefix: str
    body: str
    role: Role | None
    in_management_room: bool
    confirmed: bool = False  # a ✅ reaction confirmed it: run it as with ``--yes``
    notice_owner: str | None = None  # typed in this user's policy-notice room


@dataclass(slots=True)
class CommandResult:
    """What running a command produced. ``context`` is set when the handler succeeded:
    its staged state, actions and after-commit callbacks belong to the commit."""

    name: str
    outcome: Outcome
    reply: Reply
    details: dict[str, Any] = field(default_factory=dict)  # for the audit record
    context: CommandContext | None = None


async def run_command(
    registry: CommandRegistry, services: CommandServices, request: CommandRequest
) -> CommandResult:
    """Parse and run ``request``; every failure becomes a reply, never an exception."""
    prefix = request.prefix
    name = "?"
    outcome = Outcome.ERROR
    # In a notice room the sender is answered in their language (notices.languages).
    lang = (
        services.config.notices.languages.for_user(request.sender)
        if request.notice_owner is not None
        else Language.EN
    )
    try:
        if len(request.body) > MAX_COMMAND_LENGTH:
            raise CommandError(f"the command is too long (over {MAX_COMMAND_LENGTH} chars)")
        if request.notice_owner is not None and request.sender != request.notice_owner:
            return CommandResult(name, Outcome.IGNORED, Reply.plain(""))
        if request.role is None and request.notice_owner is None:
            outcome = Outcome.REFUSED
            raise CommandError(
                f"sorry, {request.sender} is not allowed to use policy commands. "
                "Ask a bridge admin to grant you a role."
            )
        try:
            tokens = tokenize(request.body[len(prefix) :])
            if request.confirmed:
                tokens.append("--yes")
            parsed = registry.parse(tokens, prefix)
        except CommandError as e:
            if lang is Language.EN:
                raise
            raise CommandError(notice_text(lang, "unreadable", detail=str(e))) from None
        name = parsed.spec.name
        if request.notice_owner is not None or parsed.spec.notice_room:
            if not (request.notice_owner is not None and parsed.spec.notice_room):
                outcome = Outcome.REFUSED
                raise CommandError(
                    f"`{prefix} {name}` works only in your policy-notice room."
                    if parsed.spec.notice_room
                    else notice_text(lang, "notice_room_only", prefix=prefix)
                )
        elif not role_allows(request.role, parsed.spec.role):
            outcome = Outcome.REFUSED
            raise CommandError(
                f"sorry, `{prefix} {name}` needs the {parsed.spec.role} role; "
                f"you have {request.role}."
            )
        if not (request.in_management_room or parsed.spec.room_scoped or parsed.spec.notice_room):
            outcome = Outcome.REFUSED
            raise CommandError(f"`{prefix} {name}` only works in the management room.")
        ctx = CommandContext(
            sender=request.sender,
            room_id=request.room_id,
            event_id=request.event_id,
            role=request.role,
            in_management_room=request.in_management_room,
            args=parsed.args,
            flags=parsed.flags,
            services=services,
            registry=registry,
        )
        reply = await parsed.spec.handler(ctx)
        details = {**summarize_args(parsed), **ctx.audit}
        return CommandResult(name, Outcome.OK, reply, details, ctx)
    except NeedsConfirmation as e:
        return CommandResult(name, Outcome.NEEDS_CONFIRMATION, Reply.plain(f"❓ {e}"))
    except CommandError as e:
        return CommandResult(name, outcome, Reply.plain(f"⚠️ {e}"))
    except Exception:
        log.exception("command %s failed", name)
        reply = Reply.plain("⚠️ " + notice_text(lang, "failed"))
        return CommandResult(name, outcome, reply)
