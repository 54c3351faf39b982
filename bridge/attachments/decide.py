"""From an extraction and the DLP rules to an outcome (pure: no I/O).

Text that was read is always judged, even when reading stopped part-way: a rule that
blocks wins over the ``unreadable`` rule. Otherwise a file whose text could not all be read
follows the rule for its reason class: allow (and record), or refuse.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from bridge.attachments.extract import Extraction
from bridge.attachments.kinds import DEFAULT_UNREADABLE, OnUnreadable, Outcome, Unreadable
from bridge.policy.dlp import DlpEngine
from bridge.policy.model import Action, Finding

UNREADABLE_RULE = "attachment:unreadable"
__all__ = ["DEFAULT_UNREADABLE", "MediaVerdict", "OnUnreadable", "decide", "unreadable_message"]


_REASON_TEXT = {
    Unreadable.ENCRYPTED: "it is encrypted (password-protected)",
    Unreadable.LIMIT: "it exceeds the limits for reading files (size once unpacked, nesting, "
    "or time)",
    Unreadable.UNKNOWN_TYPE: "its type cannot be inspected",
    Unreadable.UNREAD_ARCHIVE: "it is an archive format that cannot be inspected (7z, RAR)",
    Unreadable.TOO_LARGE: "it is too large to inspect",
    Unreadable.MALFORMED: "it is damaged",
}


def unreadable_message(reason: Unreadable) -> str:
    """What a sender is told when a file that could not be read is refused."""
    return (
        f"This file was refused by company policy: {_REASON_TEXT[reason]}, so it cannot be "
        "checked for confidential data. Send it in a form that can be read (not encrypted, "
        "not nested in archives), or ask your administrator."
    )


@dataclass(frozen=True, slots=True)
class MediaVerdict:
    """The decision about one file: the outcome, the DLP findings, and the finding that
    refuses it (a DLP rule's, or the unreadable rule's)."""

    outcome: Outcome
    findings: tuple[Finding, ...] = ()
    refusal: Finding | None = None

    @property
    def refused(self) -> bool:
        return self.refusal is not None


def decide(
    extraction: Extraction,
    dlp: DlpEngine,
    unreadable: Mapping[Unreadable, OnUnreadable] = DEFAULT_UNREADABLE,
) -> MediaVerdict:
    """Judge ``extraction`` with ``dlp``'s rules and the ``unreadable`` rule."""
    findings = dlp.scan([extraction.text]) if extraction.text else ()
    block = next((f for f in findings if Action.BLOCK in f.actions), None)
    if block is not None:
        return MediaVerdict(Outcome.BLOCKED, findings, block)
    reason = extraction.reason
    if reason is None:
        return MediaVerdict(Outcome.ALLOWED, findings)
    if unreadable.get(reason, OnUnreadable.ALLOW) is OnUnreadable.REFUSE:
        refusal = Finding(
            rule=f"{UNREADABLE_RULE}:{reason}",
            category="attachment",
            actions=frozenset({Action.BLOCK}),
            message=unreadable_message(reason),
        )
        return MediaVerdict(Outcome.UNREADABLE_REFUSED, findings, refusal)
    return MediaVerdict(Outcome.UNREADABLE_ALLOWED, findings)
