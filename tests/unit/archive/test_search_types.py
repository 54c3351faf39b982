"""``audit search/export --type``: a record kind filters on the kind, for every kind."""

from __future__ import annotations

import argparse

import pytest

from bridge.archive.cli import _query
from bridge.audit.kinds import AuditKind


def args(type_: str | None) -> argparse.Namespace:
    return argparse.Namespace(type=type_, room=None, sender=None, since=None, until=None, text=None)


@pytest.mark.parametrize("kind", list(AuditKind))
def test_type_names_a_record_kind(kind: AuditKind) -> None:
    query = _query(args(kind.value))
    assert (query["kind"], query["type"]) == (kind, None)


def test_retroactive_scans_are_found_by_type() -> None:
    """Retroactive scans write kind ``retroactive``, which the CLI used to read as an event
    type, finding nothing."""
    assert _query(args("retroactive"))["kind"] == "retroactive"


def test_other_types_are_event_types() -> None:
    query = _query(args("m.room.message"))
    assert (query["kind"], query["type"]) == (None, "m.room.message")
    assert (_query(args(None))["kind"], _query(args(None))["type"]) == (None, None)
