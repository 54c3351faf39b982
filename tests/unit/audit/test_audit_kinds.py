"""Record kinds: the values stored, and how a search's ``--type`` reads them."""

from __future__ import annotations

import pytest

from bridge.attachments.kinds import Outcome
from bridge.audit.chain import EXPIRY_KIND, SHRED_KIND
from bridge.audit.kinds import (
    EVENT_TYPED_KINDS,
    MEDIA_REFUSED_OUTCOMES,
    AuditKind,
    split_type_filter,
)


def test_the_stored_values_are_plain_strings() -> None:
    assert [k.value for k in AuditKind] == [
        "event",
        "decision",
        "gate",
        "action",
        "command",
        "config",
        "export",
        "hold",
        "retention",
        "retroactive",
        "error",
        "expiry",
        "shred",
        "notice",
        "override",
        "decrypted",
        "undecryptable",
        "login",
        "access",
        "media",
    ]
    assert AuditKind.RETROACTIVE == "retroactive" and f"{AuditKind.HOLD}" == "hold"
    assert (EXPIRY_KIND, SHRED_KIND) == (AuditKind.EXPIRY, AuditKind.SHRED)
    # the kind column is String(16)
    assert max(len(k) for k in AuditKind) <= 16


@pytest.mark.parametrize("kind", list(AuditKind))
def test_every_kind_is_recognised_as_a_type_filter(kind: AuditKind) -> None:
    assert split_type_filter(kind.value) == (kind, None)


def test_anything_else_is_an_event_type() -> None:
    assert split_type_filter("m.room.message") == (None, "m.room.message")
    assert split_type_filter("Command") == (None, "Command")  # kinds are exact
    assert split_type_filter(None) == split_type_filter("") == (None, None)


def test_event_typed_kinds() -> None:
    assert {
        AuditKind.EVENT,
        AuditKind.DECISION,
        AuditKind.GATE,
        AuditKind.DECRYPTED,  # e2ee: the decrypted event's own type
    } == EVENT_TYPED_KINDS


def test_media_refused_outcomes_are_the_attachment_outcomes_that_refuse() -> None:
    assert {Outcome(o) for o in MEDIA_REFUSED_OUTCOMES} == {
        Outcome.BLOCKED,
        Outcome.UNREADABLE_REFUSED,
    }
