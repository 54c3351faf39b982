"""What the console's pages show, read through the store's repositories.

Charts come from the per-day counters (no decryption); lists are newest-first pages along
an index (:meth:`~bridge.store.reading.RecordReader.newest_page`), decrypted a batch at a
time; nothing reads the whole archive for a page.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bridge.archive.export import searches_trail, text_matches
from bridge.audit.kinds import (
    MEDIA_REFUSED_OUTCOMES,
    AuditKind,
    gate_refusal,
    split_type_filter,
)
from bridge.console.charts import Chart, build_chart
from bridge.policy.layers import DlpLayer, parse_runtime_dlp
from bridge.policy.scopes import GLOBAL
from bridge.store import Store
from bridge.store.console import DAY_MS, FINDING, REFUSAL, REPORT
from bridge.store.models import HoldInfo, StoreStats

PAGE_SIZE = 50
#: Records a filtered page reads at most before it is shown short (the reader's bound).
SCAN_LIMIT = 20_000
#: Record kinds on the Activity page: admin commands and changes, console logins, exports.
ACTIVITY_KINDS = (
    AuditKind.COMMAND,
    AuditKind.CONFIG,
    AuditKind.HOLD,
    AuditKind.OVERRIDE,
    AuditKind.RETROACTIVE,
    AuditKind.EXPORT,
    AuditKind.LOGIN,
    AuditKind.ACCESS,
)
INCIDENT_KINDS = (AuditKind.DECISION, AuditKind.GATE, AuditKind.MEDIA)
RANGES = (7, 30, 90, 365)
LAST_VERIFY_KEY = "console.last_verify"


class FilterError(ValueError):
    """A filter value the console cannot use (the message says which and why)."""


def parse_time(value: str, name: str, *, end: bool = False) -> int | None:
    """``YYYY-MM-DD`` or an ISO date-time (UTC unless it says otherwise) → ms; empty → None.
    A bare date as ``end`` means the end of that day."""
    value = value.strip()
    if not value:
        return None
    try:
        if len(value) == 10:
            day = dt.date.fromisoformat(value)
            start = dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)
            return int(start.timestamp() * 1000) + (DAY_MS if end else 0)
        moment = dt.datetime.fromisoformat(value)
    except ValueError:
        raise FilterError(f"{name}: expected a date (2025-01-31) or date and time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return int(moment.timestamp() * 1000)


def iso(ms: int | None) -> str:
    """ms since the epoch → ``2025-01-31 12:00:05 UTC`` ("" for None)."""
    if ms is None:
        return ""
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@dataclass(frozen=True, slots=True)
class SearchFilters:
    """The archive search's filters (those of ``audit search``) and the page cursor."""

    room: str = ""
    sender: str = ""
    type: str = ""
    since: str = ""
    until: str = ""
    text: str = ""
    before: int | None = None

    @classmethod
    def parse(cls, query: Mapping[str, str]) -> SearchFilters:
        """From a query string; raises FilterError."""

        def get(name: str, limit: int = 255) -> str:
            value = query.get(name, "").strip()
            if len(value) > limit:
                raise FilterError(f"{name}: at most {limit} characters")
            return value

        before_raw = get("before", 20)
        if before_raw and not before_raw.isdigit():
            raise FilterError("before: expected a record number")
        out = cls(
            room=get("room"),
            sender=get("sender"),
            type=get("type"),
            since=get("since", 40),
            until=get("until", 40),
            text=get("text", 500),
            before=int(before_raw) if before_raw else None,
        )
        out.window()  # validates the times
        return out

    def window(self) -> tuple[int | None, int | None]:
        """(since, until) in ms."""
        return parse_time(self.since, "since"), parse_time(self.until, "until", end=True)

    def reader_args(self) -> dict[str, Any]:
        """The filters as arguments of the record reader (all but the words)."""
        kind, etype = split_type_filter(self.type or None)
        since, until = self.window()
        return {
            "kind": kind,
            "room": self.room or None,
            "sender": self.sender or None,
            "type": etype,
            "since": since,
            "until": until,
        }

    def words(self) -> tuple[str, ...]:
        return tuple(w.casefold() for w in self.text.split())

    def as_query(self) -> dict[str, str]:
        """The filters (not the cursor) for links and the audit record."""
        return {
            k: v
            for k, v in (
                ("room", self.room),
                ("sender", self.sender),
                ("type", self.type),
                ("since", self.since),
                ("until", self.until),
                ("text", self.text),
            )
            if v
        }


@dataclass(frozen=True, slots=True)
class IncidentFilters:
    """The incidents page's filters."""

    rule: str = ""
    room: str = ""
    sender: str = ""
    action: str = ""
    since: str = ""
    until: str = ""
    before: int | None = None

    @classmethod
    def parse(cls, query: Mapping[str, str]) -> IncidentFilters:
        base = SearchFilters.parse(
            {k: query.get(k, "") for k in ("room", "sender", "since", "until", "before")}
        )
        rule, action = query.get("rule", "").strip(), query.get("action", "").strip()
        if len(rule) > 200 or len(action) > 40:
            raise FilterError("rule or action too long")
        return cls(rule, base.room, base.sender, action, base.since, base.until, base.before)

    def as_query(self) -> dict[str, str]:
        return {
            k: v
            for k, v in (
                ("rule", self.rule),
                ("room", self.room),
                ("sender", self.sender),
                ("action", self.action),
                ("since", self.since),
                ("until", self.until),
            )
            if v
        }


@dataclass(frozen=True, slots=True)
class Incident:
    """A DLP finding or gate refusal, as listed."""

    seq: int
    ts: int
    kind: str
    room_id: str
    sender: str
    rules: tuple[str, ...]
    actions: tuple[str, ...]
    excerpt: str
    outcome: str  # "refused" (gate), or the ingest path's actions


def incident_of(rec: Mapping[str, Any]) -> Incident | None:
    """The incident a decision, gate or media (attachment) record is, or None (an allow
    without findings)."""
    data = rec.get("data")
    if not isinstance(data, Mapping):
        return None
    findings = [f for f in data.get("findings") or [] if isinstance(f, Mapping)]
    media = rec["kind"] == AuditKind.MEDIA
    refused = gate_refusal(str(rec["kind"]), data) is not None
    if media and data.get("outcome") in MEDIA_REFUSED_OUTCOMES:
        refused = True  # also a file redacted in its room, e.g. one that cannot be read
    if not findings and not refused:
        return None
    actions = sorted({str(a) for f in findings for a in f.get("actions") or []})
    rules = tuple(str(f.get("rule") or "") for f in findings)
    if not rules and media and data.get("rule"):
        rules = (str(data["rule"]),)
    if media and data.get("path") == "gate":
        outcome = "upload refused by the gate" if refused else "upload allowed by the gate"
    elif rec["kind"] == AuditKind.GATE:
        outcome = "refused by the gate" if refused else "allowed by the gate"
    else:
        done = data.get("actions") or []
        outcome = ", ".join(str(a) for a in done) if done else "recorded"
    return Incident(
        seq=int(rec["seq"]),
        ts=int(rec["ts"]),
        kind=str(rec["kind"]),
        room_id=str(rec.get("room_id") or ""),
        sender=str(rec.get("sender") or ""),
        rules=rules,
        actions=tuple(actions),
        excerpt="; ".join(str(f.get("excerpt") or "") for f in findings if f.get("excerpt")),
        outcome=outcome,
    )


@dataclass(frozen=True, slots=True)
class PolicyRow:
    """One rule at one scope, and where it comes from."""

    section: str  # dlp | federation | retention
    scope: str  # global, a space's or a room's ID
    scope_kind: str  # global | space | room
    rule: str
    detail: str
    source: str  # config | command


@dataclass(frozen=True, slots=True)
class Overview:
    """The overview page's figures."""

    ready: bool
    stats: StoreStats
    last_checkpoint_ts: int | None
    unsigned_records: int
    unsigned_since: int | None
    last_verify: dict[str, Any] | None
    charts: tuple[Chart, ...]
    days: int
    first_day: int
    last_day: int


@dataclass(slots=True)
class Page:
    """A page of records and the cursor to the next one."""

    items: list[Any] = field(default_factory=list)
    next_before: int | None = None
    scan_limit: int = SCAN_LIMIT

    @property
    def stopped_short(self) -> bool:
        """Older records may match, but the scan hit its bound before the page was full."""
        return self.next_before is not None and len(self.items) < PAGE_SIZE


def _dlp_rows(layer: DlpLayer, scope: str, scope_kind: str, source: str) -> list[PolicyRow]:
    rows = []
    for name, kw in sorted(layer.keyword_lists.items()):
        rows.append(
            PolicyRow(
                "dlp",
                scope,
                scope_kind,
                f"keyword:{name}",
                f"{len(kw.keywords)} keywords → {'+'.join(sorted(kw.actions))}",
                source,
            )
        )
    for name, rx in sorted(layer.regexes.items()):
        rows.append(
            PolicyRow(
                "dlp",
                scope,
                scope_kind,
                f"regex:{name}",
                f"{rx.pattern} → {'+'.join(sorted(rx.actions))}",
                source,
            )
        )
    for name, det in sorted(layer.detectors.items()):
        detail = "off" if det is None else "→ " + "+".join(sorted(det.actions))
        rows.append(PolicyRow("dlp", scope, scope_kind, f"detector:{name}", detail, source))
    if layer.forbid_encryption is not None:
        rows.append(
            PolicyRow(
                "dlp",
                scope,
                scope_kind,
                "forbid_encryption",
                "encryption forbidden" if layer.forbid_encryption else "encryption allowed",
                source,
            )
        )
    if layer.exempt_users or layer.exempt_rooms:
        who = sorted(layer.exempt_users) + sorted(layer.exempt_rooms)
        rows.append(PolicyRow("dlp", scope, scope_kind, "exemptions", ", ".join(who), source))
    for phrase in layer.allowed_phrases:
        rows.append(
            PolicyRow("dlp", scope, scope_kind, "allowed phrase", str(phrase.phrase), source)
        )
    return rows


def _scoped_rows(
    section: str, layers: Mapping[str, Any], kinds: Mapping[str, str], source: str
) -> list[PolicyRow]:
    rows = []
    for scope, fields in layers.items():
        if not isinstance(fields, Mapping):
            continue
        for key, value in sorted(fields.items()):
            rows.append(
                PolicyRow(
                    section,
                    scope,
                    kinds.get(scope, "room"),
                    key,
                    json.dumps(value, ensure_ascii=False, default=str),
                    source,
                )
            )
    return rows


class ReadModel:
    """The console's queries over one store."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def charts(self, days: int, today: int) -> tuple[Chart, ...]:
        """Events archived, DLP findings per rule, gate refusals, overrides and reports
        per day."""
        first = today - days + 1
        rows = await self.store.console.daily(
            first, today, [AuditKind.EVENT, FINDING, REFUSAL, AuditKind.OVERRIDE, REPORT]
        )
        by_metric: dict[str, dict[tuple[int, str], int]] = {}
        for day, metric, label, n in rows:
            by_metric.setdefault(metric, {})[(day, label or metric)] = n
        # overrides and reports share a chart: what blocked senders did about refusals
        by_metric.setdefault("override", {}).update(by_metric.get(REPORT, {}))
        return (
            build_chart(
                "events", "Events archived per day", first, today, by_metric.get("event", {})
            ),
            build_chart(
                "findings",
                "DLP findings per rule per day",
                first,
                today,
                by_metric.get(FINDING, {}),
            ),
            build_chart(
                "refusals",
                "Gate refusals per day (by callback)",
                first,
                today,
                by_metric.get(REFUSAL, {}),
            ),
            build_chart(
                "overrides",
                "Overrides and false-positive reports per day",
                first,
                today,
                by_metric.get("override", {}),
            ),
        )

    async def overview(self, ready: bool, days: int, now_ms: int) -> Overview:
        today = now_ms // DAY_MS
        log = self.store.records
        raw = await self.store.state.get(LAST_VERIFY_KEY)
        last_verify = json.loads(raw) if raw else None
        return Overview(
            ready=ready,
            stats=await self.store.stats.snapshot(),
            last_checkpoint_ts=log.last_checkpoint_ts,
            unsigned_records=log.unsigned_records,
            unsigned_since=log.unsigned_since,
            last_verify=last_verify,
            charts=await self.charts(days, today),
            days=days,
            first_day=today - days + 1,
            last_day=today,
        )

    async def search(self, f: SearchFilters) -> Page:
        """A page of the archive search, newest first."""
        words, query = f.words(), f.reader_args()
        trail = searches_trail(query["kind"])
        recs, nxt = await self.store.reader.newest_page(
            **query,
            before=f.before,
            limit=PAGE_SIZE,
            scan_limit=SCAN_LIMIT,
            keep=(lambda rs: text_matches(rs, words, trail=trail)) if words else None,
        )
        return Page(recs, nxt)

    async def incidents(self, f: IncidentFilters) -> Page:
        """A page of incidents (DLP findings, gate refusals), newest first."""
        since, until = parse_time(f.since, "since"), parse_time(f.until, "until", end=True)

        def keep(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
            out = []
            for rec in recs:
                inc = incident_of(rec)
                if inc is None:
                    continue
                if f.rule and f.rule not in inc.rules:
                    continue
                if f.action and f.action not in inc.actions and f.action not in inc.outcome:
                    continue
                rec["incident"] = inc
                out.append(rec)
            return out

        recs, nxt = await self.store.reader.newest_page(
            kinds=INCIDENT_KINDS,
            room=f.room or None,
            sender=f.sender or None,
            since=since,
            until=until,
            before=f.before,
            limit=PAGE_SIZE,
            scan_limit=SCAN_LIMIT,
            keep=keep,
        )
        return Page([r["incident"] for r in recs], nxt)

    async def record(self, seq: int) -> dict[str, Any] | None:
        return await self.store.reader.one(seq)

    async def activity(self, kind: str, before: int | None) -> Page:
        """Admin commands and changes (and console logins, reads, exports), newest first."""
        kinds: Sequence[str] = (kind,) if kind else ACTIVITY_KINDS
        recs, nxt = await self.store.reader.newest_page(kinds=kinds, before=before, limit=PAGE_SIZE)
        return Page(recs, nxt)

    async def holds(self) -> list[HoldInfo]:
        return await self.store.holds.entries()

    async def rooms(self) -> list[dict[str, Any]]:
        """Known rooms with their enforcement state and whether they are on hold."""
        rooms = await self.store.rooms.known()
        held = await self.store.holds.current()
        for r in rooms:
            r["held"] = r["room_id"] in held.rooms
        return rooms


def policy_rows(
    config_dlp: Mapping[str, DlpLayer],
    runtime_dlp: Mapping[str, Any],
    config_scoped: Mapping[str, Mapping[str, Any]],
    runtime_scoped: Mapping[str, Mapping[str, Any]],
    room_spaces: Mapping[str, tuple[str, ...]],
) -> list[PolicyRow]:
    """Every rule per scope (global, then spaces, then rooms), config before command."""
    spaces = {s for ids in room_spaces.values() for s in ids}
    kinds = {GLOBAL: "global", **{s: "space" for s in spaces}}
    rows: list[PolicyRow] = []
    runtime_layers = parse_runtime_dlp(runtime_dlp)
    for source, layers in (("config", config_dlp), ("command", runtime_layers)):
        for scope, layer in layers.items():
            rows.extend(_dlp_rows(layer, scope, kinds.get(scope, "room"), source))
    for section in ("federation", "retention"):
        rows.extend(_scoped_rows(section, config_scoped.get(section, {}), kinds, "config"))
        rows.extend(_scoped_rows(section, runtime_scoped.get(section, {}), kinds, "command"))
    order = {"global": 0, "space": 1, "room": 2}
    rows.sort(key=lambda r: (order[r.scope_kind], r.scope, r.section, r.source != "config"))
    return rows
