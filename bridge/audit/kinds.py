"""The kinds of records in the audit archive (pure: no I/O, no imports from the store).

A record's ``kind`` column says what it is: an archived Matrix event, or one of the
bridge's own records. ``AuditKind`` is a ``StrEnum``, so the stored values are the plain
strings they always were.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any


class AuditKind(StrEnum):
    """What an audit record is."""

    EVENT = "event"  # an archived Matrix event
    DECISION = "decision"  # the ingest path's judgement of an event
    GATE = "gate"  # a gate (spam-check) decision
    ACTION = "action"  # an executor action's outcome
    COMMAND = "command"  # an admin command (Matrix or CLI)
    CONFIG = "config"  # a config reload
    EXPORT = "export"  # an audit export
    HOLD = "hold"  # a legal hold set or lifted
    RETENTION = "retention"  # retention sweeps and archive expiry runs
    RETROACTIVE = "retroactive"  # a retroactive DLP scan
    ERROR = "error"  # an event the worker could not handle
    EXPIRY = "expiry"  # ciphertext dropped by archive expiry
    SHRED = "shred"  # a room key destroyed
    NOTICE = "notice"  # a policy notice to a blocked sender (sent, grouped or held back)
    OVERRIDE = "override"  # an override with justification: granted, used or revoked
    DECRYPTED = "decrypted"  # an end-to-end encrypted event, decrypted (linked to its record)
    UNDECRYPTABLE = "undecryptable"  # an encrypted event the bot could not decrypt, and why
    LOGIN = "login"  # a console login: succeeded, failed, refused (no role), logged out
    ACCESS = "access"  # a console read: a record viewed, a search, a verify run
    MEDIA = "media"  # an attachment judged (at upload or in its room): digest, type, rule


#: Kinds whose ``type`` is a Matrix event type (the event's own, or the type of the event
#: judged); the others use it for a sub-kind of their own (a command's name, …).
EVENT_TYPED_KINDS = frozenset(
    {AuditKind.EVENT, AuditKind.DECISION, AuditKind.GATE, AuditKind.DECRYPTED}
)


def split_type_filter(value: str | None) -> tuple[AuditKind | None, str | None]:
    """A search's ``--type``: a record kind filters on the kind, anything else on the
    event type. Returns ``(kind, event_type)``, at most one of them set."""
    if not value:
        return None, None
    try:
        return AuditKind(value), None
    except ValueError:
        return None, value


#: The upload gate's callback: the label of its refusals (its ``media`` records name none).
MEDIA_GATE_CALLBACK = "check_media_file_for_spam"
#: The outcomes of a judged file (``data.outcome`` of a ``media`` record, the values of
#: ``bridge.attachments.kinds.Outcome``) that refuse it: at upload, or redacted in a room.
MEDIA_REFUSED_OUTCOMES = frozenset({"blocked", "unreadable_refused"})


def gate_refusal(kind: str, data: Mapping[str, Any]) -> str | None:
    """The callback of which a record is a gate refusal, or None: a ``gate`` record that
    denied (``""`` when it names no callback), or a ``media`` record of the upload gate
    (``path: gate``) that refused the file."""
    if kind == AuditKind.GATE:
        if data.get("decision") != "deny":
            return None
        callback = data.get("callback")
        return callback if isinstance(callback, str) else ""
    if (
        kind == AuditKind.MEDIA
        and data.get("path") == "gate"
        and data.get("outcome") in MEDIA_REFUSED_OUTCOMES
    ):
        return MEDIA_GATE_CALLBACK
    return None
