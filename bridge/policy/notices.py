"""Policy notices to a blocked sender: the pure decisions (no I/O).

When the gate refuses something of a local user's, the bridge explains it to that user in a
private room with the bot. This module decides *whether* to write (grouping by user and
rule within a window, rate limits per minute and per day, per-rule opt-out) and *what* to
write. Every refusal has a short reference ID, kept with the recent refusals of the user
(:class:`Ledger`) so that the user can later refer to it (``!policy report <ref>``). The
matched text is never part of a notice: only the rule, its reason and the masked excerpt
(which stays in the ledger and goes only to the management room).
"""

from __future__ import annotations

import html
import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

#: Alphabet of reference IDs: no 0/O, 1/I/L, so they can be read aloud and typed.
REF_ALPHABET = "23456789ABCDEFGHJKMNPQRSTUVWXYZ"
REF_LENGTH = 8
#: How many recent refusals of one user are kept (the ones ``report`` can refer to).
MAX_RECENT = 20
DAY = 86_400.0


def new_ref() -> str:
    """A fresh reference ID (``K7QM-2XPA``): 8 characters of an unambiguous alphabet."""
    raw = "".join(secrets.choice(REF_ALPHABET) for _ in range(REF_LENGTH))
    return f"{raw[:4]}-{raw[4:]}"


def normalize_ref(text: str) -> str:
    """A reference ID as typed (any case, dash optional) in its canonical form."""
    raw = "".join(c for c in text.upper() if c.isalnum())
    return f"{raw[:4]}-{raw[4:]}" if len(raw) == REF_LENGTH else text.strip().upper()


@dataclass(frozen=True, slots=True)
class NoticeSettings:
    """The ``notices:`` config section."""

    enabled: bool = True
    group_window: float = 600.0  # seconds: later refusals by the same rule are grouped
    override_window: float = 900.0  # seconds an override may be used in, once granted
    per_minute: int = 3  # notices to one user per minute, at most
    per_day: int = 50  # notices to one user per day, at most


class NoticeOutcome(StrEnum):
    """What became of one refusal, notice-wise (recorded in the ``notice`` audit record)."""

    SENT = "sent"
    GROUPED = "grouped"  # the same rule refused the user within the window: one notice
    RATE_LIMITED = "rate limited"  # too many notices to this user this minute or day
    OPTED_OUT = "opted out"  # the rule says notify_sender: false
    DISABLED = "disabled"  # notices are off


class Subject(StrEnum):
    """What was refused."""

    MESSAGE = "message"  # (edits included: the gate does not tell them apart here)
    EVENT = "event"
    INVITE = "invite"
    JOIN = "join"


@dataclass(frozen=True, slots=True)
class Refusal:
    """One refusal of a user's, as the notices need it (never the matched text)."""

    ref: str
    rule: str
    room_id: str
    at: float
    subject: Subject
    reason: str  # the rule's reason text, as the gate answered it
    excerpt: str = ""  # the masked excerpt: for the management room only
    invitee: str = ""
    overridable: bool = False  # every rule that refused it allows an override
    digest: str = ""  # keyed digest of the refused message (see bridge.policy.overrides)

    def to_json(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "rule": self.rule,
            "room_id": self.room_id,
            "at": self.at,
            "subject": str(self.subject),
            "reason": self.reason,
            "excerpt": self.excerpt,
            "invitee": self.invitee,
            "overridable": self.overridable,
            "digest": self.digest,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Refusal:
        return cls(
            ref=str(data["ref"]),
            rule=str(data["rule"]),
            room_id=str(data.get("room_id", "")),
            at=float(data.get("at", 0.0)),
            subject=Subject(data.get("subject", Subject.EVENT)),
            reason=str(data.get("reason", "")),
            excerpt=str(data.get("excerpt", "")),
            invitee=str(data.get("invitee", "")),
            overridable=bool(data.get("overridable", False)),
            digest=str(data.get("digest", "")),
        )


@dataclass(frozen=True, slots=True)
class RuleWindow:
    """Per rule: when the last notice was written, and refusals grouped since."""

    last: float
    grouped: int = 0


@dataclass(frozen=True, slots=True)
class Ledger:
    """One user's notice history: what the rate limits and grouping look at."""

    rules: Mapping[str, RuleWindow] = field(default_factory=dict)
    sent: tuple[float, ...] = ()  # times of notices written within the last day
    recent: tuple[Refusal, ...] = ()  # newest last, at most MAX_RECENT

    def find(self, ref: str) -> Refusal | None:
        """The recent refusal with reference ``ref`` (canonical form), or None."""
        return next((r for r in reversed(self.recent) if r.ref == ref), None)

    def dumps(self) -> str:
        return json.dumps(
            {
                "rules": {k: [v.last, v.grouped] for k, v in self.rules.items()},
                "sent": list(self.sent),
                "recent": [r.to_json() for r in self.recent],
            }
        )

    @classmethod
    def loads(cls, text: str | None) -> Ledger:
        """The ledger stored as ``text`` (an empty one for None or a damaged value)."""
        if not text:
            return cls()
        try:
            data = json.loads(text)
            rules = {str(k): RuleWindow(float(v[0]), int(v[1])) for k, v in data["rules"].items()}
            sent = tuple(float(t) for t in data["sent"])
            recent = tuple(Refusal.from_json(r) for r in data["recent"])
        except (ValueError, KeyError, TypeError, IndexError):
            return cls()
        return cls(rules, sent, recent)


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do about one refusal: the outcome, the ledger after it, and for a notice
    how many earlier refusals by the same rule it also stands for."""

    outcome: NoticeOutcome
    ledger: Ledger
    grouped_before: int = 0


def decide(
    ledger: Ledger,
    refusal: Refusal,
    settings: NoticeSettings,
    *,
    notify_sender: bool = True,
) -> Decision:
    """Whether ``refusal`` gets a notice, given the user's ``ledger``.

    The refusal is always remembered (a report may name it). A rule refusing again within
    ``group_window`` of its last notice is grouped; otherwise a notice is written unless the
    user had ``per_minute`` notices in the last minute or ``per_day`` in the last day.
    Grouped and rate-limited refusals are counted and mentioned in the rule's next notice.
    """
    now = refusal.at
    recent = (*ledger.recent, refusal)[-MAX_RECENT:]
    sent = tuple(t for t in ledger.sent if now - t < DAY)
    base = replace(ledger, recent=recent, sent=sent)
    if not settings.enabled:
        return Decision(NoticeOutcome.DISABLED, base)
    if not notify_sender:
        return Decision(NoticeOutcome.OPTED_OUT, base)
    window = ledger.rules.get(refusal.rule)
    rules = dict(ledger.rules)
    if window is not None and now - window.last < settings.group_window:
        rules[refusal.rule] = replace(window, grouped=window.grouped + 1)
        return Decision(NoticeOutcome.GROUPED, replace(base, rules=rules))
    last_minute = sum(1 for t in sent if now - t < 60.0)
    if last_minute >= settings.per_minute or len(sent) >= settings.per_day:
        grouped = (window.grouped if window else 0) + 1
        rules[refusal.rule] = RuleWindow(window.last if window else 0.0, grouped)
        return Decision(NoticeOutcome.RATE_LIMITED, replace(base, rules=rules))
    rules[refusal.rule] = RuleWindow(now)
    before = window.grouped if window else 0
    return Decision(NoticeOutcome.SENT, replace(base, rules=rules, sent=(*sent, now)), before)


# -- what the notice says ----------------------------------------------------------------

_WHAT = {
    Subject.MESSAGE: "Your message",
    Subject.EVENT: "Your event",
    Subject.INVITE: "Your invitation",
    Subject.JOIN: "Your request to join",
}

_INSTEAD = {
    Subject.MESSAGE: "remove the sensitive part and send the message again, or share it"
    " through a channel your organization approves for it.",
    Subject.EVENT: "send it again without the sensitive part.",
    Subject.INVITE: "ask a room admin or your administrator whether this person may be invited.",
    Subject.JOIN: "ask your administrator whether you may join this room.",
}


def when(at: float) -> str:
    """A refusal's time as people read it (UTC)."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))


def override_line(refusal: Refusal, prefix: str, window: float) -> str:
    """Whether and how the refusal can be overridden."""
    if refusal.overridable and refusal.digest:
        return (
            f"Override: if you have a business reason, answer here with: {prefix} override"
            f" {refusal.ref} <justification>, then send the same message again in the same"
            f" room within {int(window // 60)} minutes (once; your justification is recorded"
            " and the compliance team is told)."
        )
    return "Override: this rule cannot be overridden."


def render(
    refusal: Refusal, grouped_before: int, prefix: str, window: float = 900.0
) -> tuple[str, str]:
    """The notice for ``refusal`` as text and HTML: what, where, when, which rule and why,
    what to do instead, the reference and how to report a mistake. Never the matched text
    nor the excerpt."""
    what = _WHAT[refusal.subject]
    target = f" of {refusal.invitee}" if refusal.invitee else ""
    lines = [
        f"🛡️ {what}{target} in {refusal.room_id} was not sent (reference {refusal.ref}).",
        f"When: {when(refusal.at)}",
        f"Rule: {refusal.rule}",
        f"Why: {refusal.reason}",
        f"What to do instead: {_INSTEAD[refusal.subject]}",
        f"Think this is a mistake? Answer here with: {prefix} report {refusal.ref} <comment>",
        override_line(refusal, prefix, window),
    ]
    if grouped_before:
        lines.append(
            f"(This rule also refused {grouped_before} earlier attempt"
            f"{'s' if grouped_before != 1 else ''} of yours since its last notice.)"
        )
    text = "\n".join(lines)
    room = html.escape(refusal.room_id)
    parts = [
        f"<p>🛡️ <b>{html.escape(what + target)}</b> in "
        f'<a href="https://matrix.to/#/{room}">{room}</a> was not sent '
        f"(reference <code>{html.escape(refusal.ref)}</code>).</p>",
        "<ul>",
        f"<li>When: {html.escape(when(refusal.at))}</li>",
        f"<li>Rule: <code>{html.escape(refusal.rule)}</code></li>",
        f"<li>Why: {html.escape(refusal.reason)}</li>",
        f"<li>What to do instead: {html.escape(_INSTEAD[refusal.subject])}</li>",
        "</ul>",
        f"<p>Think this is a mistake? Answer here with: <code>{html.escape(prefix)} report "
        f"{html.escape(refusal.ref)} &lt;comment&gt;</code></p>",
        f"<p>{html.escape(override_line(refusal, prefix, window))}</p>",
    ]
    if grouped_before:
        parts.append(f"<p><i>{html.escape(lines[-1])}</i></p>")
    return text, "".join(parts)


def subject_of(subject: Mapping[str, Any]) -> Subject:
    """What the gate refused, from the subject it reports (see ``Gate.judge``)."""
    if "invitee" in subject:
        return Subject.INVITE
    etype = subject.get("type")
    if etype is None:
        return Subject.JOIN
    return Subject.MESSAGE if etype == "m.room.message" else Subject.EVENT


def is_local_user(user_id: object, domain: str) -> bool:
    """Whether ``user_id`` is a user of this homeserver (``@name:domain``)."""
    return isinstance(user_id, str) and user_id.startswith("@") and user_id.endswith(":" + domain)


# -- warnings (the ``warn`` action) ---------------------------------------------------------


class WarnPlace(StrEnum):
    """Where a ``warn`` reaches its sender."""

    THREAD = "thread"  # a notice in a thread under the message (the room is readable)
    NOTICE_ROOM = "notice room"  # the sender's policy-notice room
    NOWHERE = "nowhere"  # a remote sender in a room the bot is not in, or encrypted


def warn_place(joined: bool, encrypted: bool, local_sender: bool) -> WarnPlace:
    """A thread where the bot is in the room and the room is not end-to-end encrypted
    (its plaintext notice would stand out there, and may be unreadable to clients that
    hide unencrypted events); else the sender's notice room, for local senders."""
    if joined and not encrypted:
        return WarnPlace.THREAD
    return WarnPlace.NOTICE_ROOM if local_sender else WarnPlace.NOWHERE


def render_warning(room_id: str, rule: str, reason: str, at: float) -> tuple[str, str]:
    """A warning for the sender's notice room (never the matched text)."""
    lines = [
        f"⚠️ Your message in {room_id} was sent, but it matched a policy rule.",
        f"When: {when(at)}",
        f"Rule: {rule}",
        f"Why: {reason}",
    ]
    text = "\n".join(lines)
    room = html.escape(room_id)
    body = (
        f'<p>⚠️ Your message in <a href="https://matrix.to/#/{room}">{room}</a> was sent, but'
        " it matched a policy rule.</p><ul>"
        f"<li>When: {html.escape(when(at))}</li>"
        f"<li>Rule: <code>{html.escape(rule)}</code></li>"
        f"<li>Why: {html.escape(reason)}</li></ul>"
    )
    return text, body
