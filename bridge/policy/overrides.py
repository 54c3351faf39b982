"""Overrides with justification: one resend of one refused message, by its sender.

A sender whose message was refused by a rule an admin marked ``overridable`` may justify it
(``!policy override REF <why>``) and then send *that* message again, in *that* room, once,
within the window. A message is recognised by a keyed digest of its type and content
(:func:`content_digest`): only the digest is kept, never the content, and the key (the gate
token) keeps low-entropy secrets such as a bare card number from being guessed back from it.

:class:`OverrideBook` holds the grants in memory for the gate, which consumes one with a
single synchronous call (atomic on the event loop: two resends cannot both use it). Pure:
no I/O; the owner persists :meth:`OverrideBook.dumps` after each change.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from bridge.policy.model import Action, Verdict

DEFAULT_WINDOW = 900.0  # seconds a grant may be used in


def content_digest(key: str, event: Mapping[str, Any]) -> str:
    """The keyed digest of ``event``'s type and content (what a resend must match)."""
    canonical = json.dumps(
        {"type": event.get("type"), "content": event.get("content")},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        default=str,
    )
    return hmac.new(key.encode(), canonical.encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class Grant:
    """One override: ``sender`` may resend the message with ``digest`` in ``room_id``."""

    ref: str
    sender: str
    room_id: str
    digest: str
    rule: str
    expires: float
    justification: str
    used: bool = False
    revoked_by: str = ""

    def usable(self, now: float) -> bool:
        return not self.used and not self.revoked_by and now < self.expires

    def to_json(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "sender": self.sender,
            "room_id": self.room_id,
            "digest": self.digest,
            "rule": self.rule,
            "expires": self.expires,
            "justification": self.justification,
            "used": self.used,
            "revoked_by": self.revoked_by,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Grant:
        return cls(
            ref=str(data["ref"]),
            sender=str(data["sender"]),
            room_id=str(data["room_id"]),
            digest=str(data["digest"]),
            rule=str(data["rule"]),
            expires=float(data["expires"]),
            justification=str(data.get("justification", "")),
            used=bool(data.get("used", False)),
            revoked_by=str(data.get("revoked_by", "")),
        )


class OverrideBook:
    """The grants in force, by reference. ``on_change`` is called after every change (to
    persist :meth:`dumps`)."""

    def __init__(self, on_change: Callable[[], None] | None = None) -> None:
        self._grants: dict[str, Grant] = {}
        self.on_change = on_change

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def load(self, text: str | None) -> None:
        """Replace the grants with those stored as ``text`` (damaged values: none)."""
        self._grants = {}
        if not text:
            return
        try:
            items = [Grant.from_json(g) for g in json.loads(text)]
        except (ValueError, KeyError, TypeError):
            return
        self._grants = {g.ref: g for g in items}

    def merge(self, text: str | None) -> None:
        """Take in grants another replica stored (``text`` as :meth:`dumps` writes it):
        unknown grants are added; for a grant known to both, the later-expiring one wins,
        and of the same grant, used or revoked on either side stays so. Grants only ever
        move towards used/revoked, so merging in any order gives the same book."""
        other = OverrideBook()
        other.load(text)
        for ref, theirs in other._grants.items():
            mine = self._grants.get(ref)
            self._grants[ref] = theirs if mine is None else merged_grant(mine, theirs)

    def dumps(self, now: float | None = None) -> str:
        """The grants as JSON (those expired for a day are left out, if ``now`` is given)."""
        keep = [
            g.to_json() for g in self._grants.values() if now is None or now - g.expires < 86_400.0
        ]
        return json.dumps(keep)

    def get(self, ref: str) -> Grant | None:
        return self._grants.get(ref)

    def grants(self) -> Iterable[Grant]:
        return list(self._grants.values())

    def add(self, grant: Grant) -> None:
        """Record ``grant`` (replacing an earlier one for the same reference)."""
        self._grants[grant.ref] = grant
        self._changed()

    def revoke(self, ref: str, by: str) -> Grant | None:
        """Revoke the grant ``ref``; returns it as it was, or None if unknown."""
        grant = self._grants.get(ref)
        if grant is None:
            return None
        self._grants[ref] = replace(grant, revoked_by=by)
        self._changed()
        return grant

    def consume(self, sender: str, room_id: str, digest: str, now: float) -> Grant | None:
        """Use the grant for exactly this message, if one is usable: it is used up at once
        (synchronously, so a concurrent resend cannot use it too)."""
        for grant in self._grants.values():
            if (
                grant.sender == sender
                and grant.room_id == room_id
                and hmac.compare_digest(grant.digest, digest)
                and grant.usable(now)
            ):
                self._grants[grant.ref] = replace(grant, used=True)
                self._changed()
                return grant
        return None


def merged_grant(a: Grant, b: Grant) -> Grant:
    """One grant from two copies of it (see :meth:`OverrideBook.merge`)."""
    if a.expires != b.expires:
        return a if a.expires > b.expires else b
    return replace(a, used=a.used or b.used, revoked_by=a.revoked_by or b.revoked_by)


def override_digest(key: str, callback: str, body: Mapping[str, Any], verdict: Verdict) -> str:
    """The digest a refused event is remembered by for an override, or "" when it cannot be
    overridden (not a sent event, or a refusing rule not marked ``overridable``)."""
    blocking = [f for f in verdict.findings if Action.BLOCK in f.actions]
    event = body.get("event")
    if callback != "check_event_for_spam" or not isinstance(event, Mapping) or not blocking:
        return ""
    if not all(f.overridable for f in blocking):
        return ""
    return content_digest(key, event)
