"""What DLP commands may show outside the management room: counts, never rule contents.

A keyword list, a pattern or an exemption list posted into an ordinary room (possibly one
federated with other servers) is itself a leak: it tells everyone there what the company
watches for, and often names the secret projects. So ``dlp list`` and ``dlp test`` answer
with counts there, and with the full rules only in the management room. Pure functions.
"""

from __future__ import annotations

from collections.abc import Sequence

from bridge.policy.dlp import DlpPolicy
from bridge.policy.model import Action, Finding

ONLY_IN_MANAGEMENT = "rule contents are shown only in the management room"


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def redact_rule_listing(
    policy: DlpPolicy, where: str, *, encryption_forbidden: bool
) -> tuple[str, list[str]]:
    """The title and items of ``dlp list`` outside the management room: counts only."""
    keywords = sum(len(kl.keywords) for kl in policy.keyword_lists)
    exemptions = len(policy.exempt_users) + len(policy.exempt_rooms)
    items = []
    if policy.keyword_lists:
        items.append(
            _count(len(policy.keyword_lists), "keyword list", "keyword lists")
            + f" ({_count(keywords, 'keyword', 'keywords')})"
        )
    if policy.regex_rules:
        items.append(_count(len(policy.regex_rules), "pattern", "patterns"))
    if policy.detectors:
        items.append(_count(len(policy.detectors), "detector", "detectors"))
    if exemptions:
        items.append(_count(exemptions, "exemption", "exemptions"))
    if encryption_forbidden:
        items.append("end-to-end encryption: forbidden (the gate refuses m.room.encryption)")
    if not items:
        return f"DLP rules in force {where}: none", []
    return f"DLP rules in force {where} ({ONLY_IN_MANAGEMENT}):", items


def redact_test_result(findings: Sequence[Finding]) -> str:
    """The answer of ``dlp test`` outside the management room: the outcome and a count."""
    if not findings:
        return "No DLP rule matches: the message would be sent."
    blocked = any(Action.BLOCK in f.actions for f in findings)
    outcome = "The gate would refuse this message" if blocked else "The message would pass"
    matched = _count(len(findings), "rule matches", "rules match")
    return f"{outcome}: {matched} ({ONLY_IN_MANAGEMENT})."
