"""The unsigned tail after the signed head: how old it is, and how a verifier reports it
(pure: shared by ``audit verify`` on the command line and ``!policy audit verify``)."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from bridge.audit.chain import VerifyReport

#: How far past ``audit.checkpoint_interval`` an unsigned record may be before verify fails.
TAIL_MARGIN_S = 30.0


def now_ms() -> int:
    """Wall time in ms: what an unsigned tail's age is measured against (tests replace it)."""
    return int(time.time() * 1000)


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def signed_head_line(report: VerifyReport, now_ms: int) -> str:
    """Where the signed head is and what lies after it, for an intact chain."""
    if report.signed_ts is None:
        head = "no signed checkpoint"
    else:
        age = max(0.0, (now_ms - report.signed_ts) / 1000)
        head = f"seq {report.signed_seq}, signed {_when(report.signed_ts)} ({age:.0f}s ago)"
    if not report.tail_records:
        return f"signed head: {head}; every record is signed"
    return (
        f"signed head: {head}; unsigned tail: {report.tail_records} records, the oldest "
        f"unsigned for {report.tail_age_s(now_ms):.1f}s, spanning "
        f"{report.tail_span_s:.1f}s up to the last record"
    )


def stale_tail_problem(report: VerifyReport, now_ms: int, limit_s: float) -> str | None:
    """Why the unsigned tail is older than ``limit_s`` seconds, or None if it is not."""
    age = report.tail_age_s(now_ms)
    if not report.tail_records or age <= limit_s:
        return None
    last = report.last_seq or 0
    return (
        f"records {last - report.tail_records + 1}..{last} have been unsigned for "
        f"{age:.0f}s, more than the {limit_s:.0f}s allowed: the bridge stopped without "
        f"signing them (a crash or kill), or it cannot sign (see its log). Until signed, "
        f"whoever can write the database can change or delete them unnoticed; a running "
        f"bridge signs them within audit.checkpoint_interval of its start"
    )
