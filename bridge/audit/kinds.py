"""The kinds of records in the audit archive (pure: no I/O, no imports from the store).

A record's ``kind`` column says what it is: an archived Matrix event, or one of the
bridge's own records. ``AuditKind`` is a ``StrEnum``, so the stored values are the plain
strings they always were.
"""

from __future__ import annotations

from enum import StrEnum


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
