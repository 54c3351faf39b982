"""The compliance console's tables: per-day counters and login sessions.

:func:`daily_counts` turns what one append writes into counter increments, and
:func:`add_daily` applies them in the append's own transaction (called by
:class:`~bridge.store.records.RecordLog`), so the console charts a million records without
decrypting one. :class:`ConsoleRepository` reads the counters and keeps the sessions.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection

from bridge.audit.kinds import AuditKind, gate_refusal
from bridge.store.database import Database
from bridge.store.keys import KeyRepository
from bridge.store.schema import console_daily, console_sessions

DAY_MS = 86_400_000

#: Derived series besides one per record kind.
FINDING = "finding"  # a DLP finding, label = rule
REFUSAL = "refusal"  # a gate refusal, label = callback
REPORT = "report"  # a false-positive report (``!policy report``) that went through

_UPSERT = text(
    "INSERT INTO console_daily (day, metric, label, n) VALUES (:day, :metric, :label, :n) "
    "ON CONFLICT (day, metric, label) DO UPDATE SET n = console_daily.n + excluded.n"
)

DailyKey = tuple[int, str, str]  # (day, metric, label)


def kind_counts(kinds_and_ts: Iterable[tuple[str, int]]) -> Counter[DailyKey]:
    """One increment per record: ``(day of ts, kind, "")``."""
    return Counter((ts // DAY_MS, kind, "") for kind, ts in kinds_and_ts)


def finding_counts(
    entries: Iterable[tuple[str, str | None, Mapping[str, Any]]], ts: int
) -> Counter[DailyKey]:
    """Findings per rule, gate refusals per callback (uploads the media gate refused
    included) and false-positive reports of audit entries ``(kind, type, data)``."""
    day = ts // DAY_MS
    out: Counter[DailyKey] = Counter()
    for kind, etype, data in entries:
        if kind == AuditKind.COMMAND and etype == "report" and data.get("outcome") == "ok":
            out[(day, REPORT, "")] += 1
            continue
        if kind not in (AuditKind.DECISION, AuditKind.GATE, AuditKind.MEDIA):
            continue
        findings = data.get("findings")
        if isinstance(findings, list):
            for f in findings:
                rule = f.get("rule") if isinstance(f, Mapping) else None
                if isinstance(rule, str) and rule:
                    out[(day, FINDING, rule[:200])] += 1
        callback = gate_refusal(kind, data)
        if callback is not None:
            out[(day, REFUSAL, callback[:200])] += 1
    return out


async def add_daily(conn: AsyncConnection, counts: Mapping[DailyKey, int]) -> None:
    """Add ``counts`` to the counters in ``conn``'s transaction (an upsert per key)."""
    if not counts:
        return
    await conn.execute(
        _UPSERT,
        [{"day": d, "metric": m, "label": lab, "n": n} for (d, m, lab), n in counts.items()],
    )


@dataclass(frozen=True, slots=True)
class SessionRow:
    """A console session as stored (the user ID opened)."""

    user_id: str
    created_ts: int
    seen_ts: int


def session_hash(session_id: str) -> bytes:
    """What is stored of a session ID: its SHA-256 (the ID itself is 256 random bits)."""
    return hashlib.sha256(session_id.encode("ascii", "replace")).digest()


class ConsoleRepository:
    """Counters for the charts; sessions (hashed IDs, sealed user IDs)."""

    def __init__(self, db: Database, keys: KeyRepository) -> None:
        self.db = db
        self.keys = keys

    async def daily(
        self, first_day: int, last_day: int, metrics: Sequence[str]
    ) -> list[tuple[int, str, str, int]]:
        """Counters ``(day, metric, label, n)`` of ``metrics`` for days in the range
        (inclusive), by day."""
        query = (
            select(
                console_daily.c.day,
                console_daily.c.metric,
                console_daily.c.label,
                console_daily.c.n,
            )
            .where(
                console_daily.c.day >= first_day,
                console_daily.c.day <= last_day,
                console_daily.c.metric.in_(list(metrics)),
            )
            .order_by(console_daily.c.day)
        )
        async with self.db.connect() as conn:
            return [
                (int(d), str(m), str(lab), int(n))
                for d, m, lab, n in (await conn.execute(query)).all()
            ]

    async def create_session(self, session_id: str, user_id: str, ts: int) -> None:
        """Store a new session for ``user_id``."""
        dk = await self.keys.op_key()
        assert dk is not None
        idh = session_hash(session_id)
        blob = self.keys.op_seal(
            dk, "console_sessions", idh, "data", json.dumps({"user_id": user_id}).encode()
        )
        async with self.db.transaction() as conn:
            await conn.execute(
                insert(console_sessions).values(id_hash=idh, data=blob, created_ts=ts, seen_ts=ts)
            )

    async def session(self, session_id: str) -> SessionRow | None:
        """The session with this ID, or None."""
        idh = session_hash(session_id)
        async with self.db.connect() as conn:
            row = (
                await conn.execute(
                    select(
                        console_sessions.c.data,
                        console_sessions.c.created_ts,
                        console_sessions.c.seen_ts,
                    ).where(console_sessions.c.id_hash == idh)
                )
            ).first()
        if row is None:
            return None
        dk = await self.keys.op_key_needed("a console session")
        obj = json.loads(
            self.keys.op_open(dk, "console_sessions", idh, "data", row[0], "a console session")
        )
        return SessionRow(str(obj["user_id"]), int(row[1]), int(row[2]))

    async def touch_session(self, session_id: str, ts: int) -> None:
        """Mark the session used at ``ts`` (its idle timeout starts again)."""
        async with self.db.transaction() as conn:
            await conn.execute(
                update(console_sessions)
                .where(console_sessions.c.id_hash == session_hash(session_id))
                .values(seen_ts=ts)
            )

    async def end_session(self, session_id: str) -> None:
        """Delete the session (logout, timeout)."""
        async with self.db.transaction() as conn:
            await conn.execute(
                delete(console_sessions).where(
                    console_sessions.c.id_hash == session_hash(session_id)
                )
            )

    async def purge_sessions(self, idle_before: int, created_before: int) -> int:
        """Delete sessions idle since before ``idle_before`` or created before
        ``created_before`` (ms); returns how many."""
        async with self.db.transaction() as conn:
            result = await conn.execute(
                delete(console_sessions).where(
                    (console_sessions.c.seen_ts < idle_before)
                    | (console_sessions.c.created_ts < created_before)
                )
            )
        return int(result.rowcount or 0)
