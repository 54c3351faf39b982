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


class Language(StrEnum):
    """The languages notices and the sender's command replies are written in."""

    EN = "en"
    DE = "de"


@dataclass(frozen=True, slots=True)
class Languages:
    """``notices.language`` (the default) and ``notices.languages``: per user ID
    (``@alice:corp.example``) or per server (``@*:corp.example``)."""

    default: Language = Language.EN
    by_user: tuple[tuple[str, Language], ...] = ()

    def for_user(self, user_id: str) -> Language:
        """The user's language: their own entry, else their server's, else the default."""
        table = dict(self.by_user)
        if user_id in table:
            return table[user_id]
        server = user_id.split(":", 1)[1] if ":" in user_id else ""
        return table.get(f"@*:{server}", self.default)

    @classmethod
    def parse(cls, default: object, mapping: object) -> Languages:
        """Validate the two config values (raises ValueError naming the bad one)."""
        known = ", ".join(lang.value for lang in Language)

        def language(value: object, where: str) -> Language:
            try:
                return Language(str(value).lower())
            except ValueError:
                raise ValueError(f"{where}: got {value!r}, expected one of {known}") from None

        chosen = language(default if default is not None else "en", "notices.language")
        if mapping is None:
            return cls(chosen)
        if not isinstance(mapping, Mapping):
            raise ValueError("notices.languages: expected a mapping of user ID to language")
        pairs: list[tuple[str, Language]] = []
        for user, value in mapping.items():
            if not isinstance(user, str) or not user.startswith("@") or ":" not in user:
                raise ValueError(
                    f"notices.languages: {user!r} is not a user ID (@name:server) or @*:server"
                )
            pairs.append((user, language(value, f"notices.languages.{user}")))
        return cls(chosen, tuple(pairs))


@dataclass(frozen=True, slots=True)
class NoticeSettings:
    """The ``notices:`` config section."""

    enabled: bool = True
    group_window: float = 600.0  # seconds: later refusals by the same rule are grouped
    override_window: float = 900.0  # seconds an override may be used in, once granted
    per_minute: int = 3  # notices to one user per minute, at most
    per_day: int = 50  # notices to one user per day, at most
    languages: Languages = field(default_factory=Languages)


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
    ROOM = "room"  # a room refused at creation (it has no room ID)
    UPLOAD = "upload"  # a file refused before Synapse stored it (no room yet)


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
    file: str = ""  # an upload: its type and size ("PDF, 988 KiB"), never its name or content

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
            "file": self.file,
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
            file=str(data.get("file", "")),
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
    Language.EN: {
        Subject.MESSAGE: "Your message",
        Subject.EVENT: "Your event",
        Subject.INVITE: "Your invitation",
        Subject.JOIN: "Your request to join",
        Subject.ROOM: "Your new room",
        Subject.UPLOAD: "Your upload",
    },
    Language.DE: {
        Subject.MESSAGE: "Ihre Nachricht",
        Subject.EVENT: "Ihr Ereignis",
        Subject.INVITE: "Ihre Einladung",
        Subject.JOIN: "Ihre Beitrittsanfrage",
        Subject.ROOM: "Ihr neuer Raum",
        Subject.UPLOAD: "Ihr Upload",
    },
}

_INSTEAD = {
    Language.EN: {
        Subject.MESSAGE: "remove the sensitive part and send the message again, or share it"
        " through a channel your organization approves for it.",
        Subject.EVENT: "send it again without the sensitive part.",
        Subject.INVITE: "ask a room admin or your administrator whether this person may be"
        " invited.",
        Subject.JOIN: "ask your administrator whether you may join this room.",
        Subject.ROOM: "create the room again without what the rule names (see Why).",
        Subject.UPLOAD: "remove the sensitive content from the file and upload it again, or"
        " share it through a channel your organization approves for it.",
    },
    Language.DE: {
        Subject.MESSAGE: "Entfernen Sie den vertraulichen Teil und senden Sie die Nachricht"
        " erneut, oder teilen Sie ihn über einen von Ihrer Organisation dafür freigegebenen"
        " Weg.",
        Subject.EVENT: "Senden Sie es ohne den vertraulichen Teil erneut.",
        Subject.INVITE: "Fragen Sie einen Raum-Admin oder Ihre Administration, ob diese Person"
        " eingeladen werden darf.",
        Subject.JOIN: "Fragen Sie Ihre Administration, ob Sie diesem Raum beitreten dürfen.",
        Subject.ROOM: "Erstellen Sie den Raum erneut ohne das, was die Regel nennt (siehe Warum).",
        Subject.UPLOAD: "Entfernen Sie den vertraulichen Inhalt aus der Datei und laden Sie sie"
        " erneut hoch, oder teilen Sie sie über einen von Ihrer Organisation dafür freigegebenen"
        " Weg.",
    },
}

#: Every other sentence the sender sees, per language (same placeholders in each).
TEXTS: Mapping[Language, Mapping[str, str]] = {
    Language.EN: {
        "refused": "{what}{target} in {room} was not sent (reference {ref}).",
        "refused_room": "{what} was not created (reference {ref}).",
        "refused_upload": "{what}{target} was not stored (reference {ref}).",
        "target": " of {invitee}",
        "when": "When",
        "rule": "Rule",
        "why": "Why",
        "instead": "What to do instead",
        "report": "Think this is a mistake? Answer here with:",
        "report_usage": "{prefix} report {ref} <comment>",
        "override": "Override: if you have a business reason, answer here with: {prefix}"
        " override {ref} <justification>, then send the same message again in the same room"
        " within {minutes} minutes (once; your justification is recorded and the compliance"
        " team is told).",
        "no_override": "Override: this rule cannot be overridden.",
        "no_override_upload": "Override: a refused upload cannot be overridden; if the"
        " refusal is a mistake, report it.",
        "grouped_one": "(This rule also refused 1 earlier attempt of yours since its last notice.)",
        "grouped_many": "(This rule also refused {count} earlier attempts of yours since its"
        " last notice.)",
        "warned": "Your message in {room} was sent, but it matched a policy rule.",
        "report_sent": "Thank you: your report on {ref} was sent to the compliance team."
        " Please do not resend the message until they answer.",
        "unknown_ref": "none of your recent refusals has the reference {ref}.",
        "already_reported": "you already reported {ref}; the compliance team has it.",
        "unreachable": "the compliance team cannot be reached right now; try again later.",
        "need_justification": "please give a business justification (a few words at least).",
        "not_overridable": "the rule {rule} cannot be overridden: an administrator has not"
        " marked it overridable. If the refusal is a mistake, use {prefix} report {ref}"
        " <comment>.",
        "override_done": "the override {ref} was already {state}.",
        "used": "used",
        "revoked": "revoked by {admin}",
        "override_granted": "Override {ref} granted: send the same message again in {room}"
        " before {until}. It works once; your justification is recorded.",
        "notice_room_only": "only `{prefix} report` and `{prefix} override` work in your notice"
        " room.",
        "unreadable": "{detail}",
        "failed": "the command failed unexpectedly; the error is in the logs.",
    },
    Language.DE: {
        "refused": "{what}{target} in {room} wurde nicht gesendet (Referenz {ref}).",
        "refused_room": "{what} wurde nicht erstellt (Referenz {ref}).",
        "refused_upload": "{what}{target} wurde nicht gespeichert (Referenz {ref}).",
        "target": " von {invitee}",
        "when": "Wann",
        "rule": "Regel",
        "why": "Warum",
        "instead": "Was Sie stattdessen tun können",
        "report": "Halten Sie das für einen Fehler? Antworten Sie hier mit:",
        "report_usage": "{prefix} report {ref} <Kommentar>",
        "override": "Ausnahme: Wenn Sie einen geschäftlichen Grund haben, antworten Sie hier mit:"
        " {prefix} override {ref} <Begründung> und senden Sie dieselbe Nachricht innerhalb von"
        " {minutes} Minuten erneut im selben Raum (einmalig; Ihre Begründung wird"
        " aufgezeichnet und das Compliance-Team informiert).",
        "no_override": "Ausnahme: Für diese Regel ist keine Ausnahme möglich.",
        "no_override_upload": "Ausnahme: Für abgelehnte Uploads ist keine Ausnahme möglich;"
        " wenn die Ablehnung ein Fehler ist, melden Sie sie.",
        "grouped_one": "(Diese Regel hat seit ihrem letzten Hinweis auch 1 früheren Versuch von"
        " Ihnen abgelehnt.)",
        "grouped_many": "(Diese Regel hat seit ihrem letzten Hinweis auch {count} frühere"
        " Versuche von Ihnen abgelehnt.)",
        "warned": "Ihre Nachricht in {room} wurde gesendet, entsprach aber einer Richtlinienregel.",
        "report_sent": "Danke: Ihre Meldung zu {ref} wurde an das Compliance-Team gesendet."
        " Bitte senden Sie die Nachricht nicht erneut, bevor es geantwortet hat.",
        "unknown_ref": "keine Ihrer letzten Ablehnungen hat die Referenz {ref}.",
        "already_reported": "Sie haben {ref} bereits gemeldet; das Compliance-Team hat die"
        " Meldung.",
        "unreachable": "das Compliance-Team ist gerade nicht erreichbar; versuchen Sie es"
        " später erneut.",
        "need_justification": "bitte geben Sie eine geschäftliche Begründung an (mindestens"
        " ein paar Worte).",
        "not_overridable": "für die Regel {rule} ist keine Ausnahme möglich: die Administration"
        " hat sie nicht dafür freigegeben. Wenn die Ablehnung ein Fehler ist, verwenden Sie"
        " {prefix} report {ref} <Kommentar>.",
        "override_done": "die Ausnahme {ref} wurde bereits {state}.",
        "used": "genutzt",
        "revoked": "von {admin} widerrufen",
        "override_granted": "Ausnahme {ref} gewährt: Senden Sie dieselbe Nachricht vor {until}"
        " erneut in {room}. Das geht einmal; Ihre Begründung wird aufgezeichnet.",
        "notice_room_only": "in Ihrem Hinweisraum funktionieren nur `{prefix} report` und"
        " `{prefix} override`.",
        "unreadable": "der Befehl konnte nicht gelesen werden ({detail}). Verwenden Sie"
        " `!policy report REFERENZ <Kommentar>` oder `!policy override REFERENZ <Begründung>`.",
        "failed": "der Befehl ist unerwartet fehlgeschlagen; der Fehler steht im Protokoll.",
    },
}

#: What each built-in detector finds, in German (the English text is the detector's own).
_DETECTOR_DE = {
    "card": "eine Zahlungskartennummer",
    "iban": "eine Bankkontonummer (IBAN)",
    "us_ssn": "eine US-Sozialversicherungsnummer",
    "private_key": "einen privaten Schlüssel",
    "aws_access_key": "einen AWS-Zugangsschlüssel",
    "github_token": "ein GitHub-Token",
    "slack_token": "ein Slack-Token",
    "jwt": "ein JSON Web Token (ein Anmelde-Nachweis)",
}
_SECRET_DETECTORS = frozenset({"private_key", "aws_access_key", "github_token", "slack_token",
                               "jwt"})  # fmt: skip


def text(language: Language, key: str, **values: object) -> str:
    """The sentence ``key`` of :data:`TEXTS` in ``language``, filled in."""
    return TEXTS[language][key].format(**values)


def reason_in(language: Language, rule: str, reason: str) -> str:
    """The refusal's reason in ``language``. The gate words it in English; in German it is
    rebuilt from the rule (never from the message: the matched text is in neither)."""
    if language is Language.EN:
        return reason
    kind, _, name = rule.partition(":")
    if kind == "detector" and name in _DETECTOR_DE:
        revoke = (
            " Falls es ein echtes Zugangsdatum ist, widerrufen Sie es jetzt: es könnte schon"
            " gesehen worden sein."
            if name in _SECRET_DETECTORS
            else ""
        )
        return (
            f"Die Datenschutzregel {rule!r} hat angeschlagen: der Inhalt scheint"
            f" {_DETECTOR_DE[name]} zu enthalten.{revoke}"
        )
    if kind == "keyword":
        return (
            f"Die Datenschutzregel {rule!r} hat angeschlagen: der Inhalt scheint einen Begriff"
            f" aus der Stichwortliste {name!r} zu enthalten."
        )
    if kind == "regex":
        return (
            f"Die Datenschutzregel {rule!r} hat angeschlagen: der Inhalt entspricht der"
            f" Musterregel {name!r}."
        )
    return f"Die Richtlinienregel {rule!r} lässt dies nicht zu."


def when(at: float) -> str:
    """A refusal's time as people read it (UTC)."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))


def override_line(
    refusal: Refusal, prefix: str, window: float, language: Language = Language.EN
) -> str:
    """Whether and how the refusal can be overridden."""
    if refusal.subject is Subject.UPLOAD:
        return text(language, "no_override_upload")
    if refusal.overridable and refusal.digest:
        return text(language, "override", prefix=prefix, ref=refusal.ref, minutes=int(window // 60))
    return text(language, "no_override")


def render(
    refusal: Refusal,
    grouped_before: int,
    prefix: str,
    window: float = 900.0,
    language: Language = Language.EN,
) -> tuple[str, str]:
    """The notice for ``refusal`` as text and HTML in ``language``: what, where, when, which
    rule and why, what to do instead, the reference and how to report a mistake. Never the
    matched text nor the excerpt."""
    what = _WHAT[language][refusal.subject]
    target = text(language, "target", invitee=refusal.invitee) if refusal.invitee else ""
    if refusal.file:
        target = f" ({refusal.file})"
    reason = reason_in(language, refusal.rule, refusal.reason)
    instead = _INSTEAD[language][refusal.subject]
    usage = text(language, "report_usage", prefix=prefix, ref=refusal.ref)
    # A room refused at creation, an upload: no room ID to name.
    sentence = {Subject.ROOM: "refused_room", Subject.UPLOAD: "refused_upload"}.get(
        refusal.subject, "refused"
    )
    refused = text(language, sentence, what=what, target=target, room=refusal.room_id,
                   ref=refusal.ref)  # fmt: skip
    lines = [
        "🛡️ " + refused,
        f"{text(language, 'when')}: {when(refusal.at)}",
        f"{text(language, 'rule')}: {refusal.rule}",
        f"{text(language, 'why')}: {reason}",
        f"{text(language, 'instead')}: {instead}",
        f"{text(language, 'report')} {usage}",
        override_line(refusal, prefix, window, language),
    ]
    if grouped_before:
        key = "grouped_one" if grouped_before == 1 else "grouped_many"
        lines.append(text(language, key, count=grouped_before))
    room = html.escape(refusal.room_id)
    link = f'<a href="https://matrix.to/#/{room}">{room}</a>'
    # The template is ours; every value put into it is escaped.
    head = text(
        language,
        sentence,
        what=f"<b>{html.escape(what + target)}</b>",
        target="",
        room=link,
        ref=f"<code>{html.escape(refusal.ref)}</code>",
    )
    parts = [
        f"<p>🛡️ {head}</p>",
        "<ul>",
        f"<li>{text(language, 'when')}: {html.escape(when(refusal.at))}</li>",
        f"<li>{text(language, 'rule')}: <code>{html.escape(refusal.rule)}</code></li>",
        f"<li>{text(language, 'why')}: {html.escape(reason)}</li>",
        f"<li>{html.escape(text(language, 'instead'))}: {html.escape(instead)}</li>",
        "</ul>",
        f"<p>{html.escape(text(language, 'report'))} <code>{html.escape(usage)}</code></p>",
        f"<p>{html.escape(override_line(refusal, prefix, window, language))}</p>",
    ]
    if grouped_before:
        parts.append(f"<p><i>{html.escape(lines[-1])}</i></p>")
    return "\n".join(lines), "".join(parts)


def subject_of(subject: Mapping[str, Any]) -> Subject:
    """What the gate refused, from the subject it reports (see ``Gate.judge``)."""
    if "invitee" in subject:
        return Subject.INVITE
    etype = subject.get("type")
    if etype == "m.room.create":
        return Subject.ROOM
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


def render_warning(
    room_id: str, rule: str, reason: str, at: float, language: Language = Language.EN
) -> tuple[str, str]:
    """A warning for the sender's notice room in ``language`` (never the matched text)."""
    reason = reason_in(language, rule, reason)
    lines = [
        "⚠️ " + text(language, "warned", room=room_id),
        f"{text(language, 'when')}: {when(at)}",
        f"{text(language, 'rule')}: {rule}",
        f"{text(language, 'why')}: {reason}",
    ]
    room = html.escape(room_id)
    head = text(language, "warned", room=f'<a href="https://matrix.to/#/{room}">{room}</a>')
    body = (
        f"<p>⚠️ {head}</p><ul>"
        f"<li>{text(language, 'when')}: {html.escape(when(at))}</li>"
        f"<li>{text(language, 'rule')}: <code>{html.escape(rule)}</code></li>"
        f"<li>{text(language, 'why')}: {html.escape(reason)}</li></ul>"
    )
    return "\n".join(lines), body
