"""Shared, pure types of the policy core.

Everything here is immutable and does no I/O: the gate, the ingest worker and
``dlp test`` all judge events with the same objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Action(StrEnum):
    """What a matching rule asks for."""

    BLOCK = "block"  # the gate refuses the event; on the ingest path it is redacted
    REDACT = "redact"  # removed after the fact through the executor
    WARN = "warn"  # a notice to the sender, in a thread under the message
    NOTIFY = "notify"  # a notice in the management room with a masked excerpt
    AUDIT = "audit"  # recorded only (dry run for new rules)


@dataclass(frozen=True, slots=True)
class Finding:
    """One rule that matched an event.

    ``message`` is shown to the sender and must never contain the matched secret;
    ``excerpt`` is a masked excerpt (``4111 **** **** 1111``) for the management room.
    ``notify_sender``: whether a refusal is explained to the sender in their notice room.
    ``overridable``: whether the sender may resend it once with a justification.
    """

    rule: str
    category: str
    actions: frozenset[Action]
    message: str
    excerpt: str = ""
    errcode: str = "M_FORBIDDEN"
    notify_sender: bool = True
    overridable: bool = False  # the sender may justify and resend it once


@dataclass(frozen=True, slots=True)
class Verdict:
    """The result of judging one event or request: the findings, possibly none."""

    findings: tuple[Finding, ...] = ()

    @property
    def blocked(self) -> bool:
        return any(Action.BLOCK in f.actions for f in self.findings)

    def wants(self, action: Action) -> bool:
        return any(action in f.actions for f in self.findings)

    @property
    def first_block(self) -> Finding | None:
        return next((f for f in self.findings if Action.BLOCK in f.actions), None)


ALLOW = Verdict()


def server_name(user_id: str) -> str:
    """The server part of a Matrix user ID (``@a:b.example:8448`` -> ``b.example:8448``)."""
    _, sep, server = user_id.partition(":")
    return server if sep else ""
