"""``--retroactive``: apply a new DLP rule to messages archived before it existed.

After ``!policy dlp add-keyword … --retroactive`` (or ``add-regex``, ``detectors enable``) is
committed, a background task reads the archive of the rule's scope for a bounded window
(``dlp.retroactive_window``, default 30 days; ``--window`` per command), judges every event
with the new policy, and enqueues, in batches, a redaction for each match of a ``block`` or
``redact`` rule. Only matches of the new rule count; events already redacted, the bot's own
and exempt ones are skipped. The management room gets one summary (count, and the first
matches with masked excerpts for ``notify`` rules); the run is audited (``retroactive``).

A scan is recorded as pending until it has finished. If the bridge stops while one runs, the
next start runs it again from the beginning (it enqueues nothing before it has read
everything, so nothing is done twice); a scan that failed also runs again at the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from bridge.audit.kinds import AuditKind
from bridge.commands.replies import Reply
from bridge.commands.services import RetroScan
from bridge.pipeline.actions import notice, redact
from bridge.policy.dlp import DlpEngine, DlpPolicy, KeywordList
from bridge.policy.durations import format_duration
from bridge.policy.engine import PolicyEngine
from bridge.policy.extract import extract_texts
from bridge.policy.model import Action
from bridge.policy.scopes import GLOBAL, rooms_in_scope
from bridge.scheduler import Scheduler, TaskKind
from bridge.store import AuditEntry, NewAction, Store

if TYPE_CHECKING:
    from bridge.pipeline.live_policy import LivePolicy
    from bridge.pipeline.services import ActionSubmitter

log = logging.getLogger(__name__)

BATCH = 100  # actions per enqueue (one commit each)
MAX_MATCHES = 10_000  # beyond this the scan stops and says so
LISTED = 20  # matches listed by name in the summary

TASK_NAME = "retroactive"


class RetroServices(Protocol):
    """What a scan needs of the running bridge: the archive, the executor's queue, where to
    report, the policy in force (to resume) and the scheduler that owns the scan's task."""

    @property
    def store(self) -> Store: ...
    @property
    def executor(self) -> ActionSubmitter: ...
    @property
    def management_room(self) -> str: ...
    @property
    def policy(self) -> LivePolicy: ...
    @property
    def scheduler(self) -> Scheduler: ...


@dataclass(frozen=True)
class RetroJob:
    """What to scan for: matches of ``rules`` in ``scope`` since ``since_ms``."""

    scope: str  # GLOBAL or a room ID (a space's ID covers the rooms in it too)
    rules: frozenset[str]  # rule names (keyword:…, regex:…, detector:…) that count
    since_ms: int
    window_ms: int
    requested_by: str
    command_room: str
    change: str
    # For keyword lists: an engine with only the new keyword, so other words of the same
    # list (which were not asked to apply retroactively) do not count.
    probe: DlpEngine | None = None
    probe_word: str | None = None  # what ``probe`` was built from (to resume after a restart)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    @property
    def rule_names(self) -> str:
        """The rules it looks for, for logs (which must not quote keywords)."""
        return ", ".join(sorted(self.rules))

    def to_json(self) -> dict[str, Any]:
        """The job as plain data (kept in the store until the scan has finished)."""
        return {
            "id": self.id,
            "scope": self.scope,
            "rules": sorted(self.rules),
            "since_ms": self.since_ms,
            "window_ms": self.window_ms,
            "requested_by": self.requested_by,
            "command_room": self.command_room,
            "change": self.change,
            "probe_word": self.probe_word,
        }

    @classmethod
    def from_scan(cls, scan: RetroScan) -> RetroJob:
        """The job a command asked for (:class:`bridge.commands.services.RetroScan`)."""
        return cls.from_json(
            {
                "id": uuid.uuid4().hex[:12],
                "scope": scan.scope,
                "rules": sorted(scan.rules),
                "since_ms": scan.since_ms,
                "window_ms": scan.window_ms,
                "requested_by": scan.requested_by,
                "command_room": scan.command_room,
                "change": scan.change,
                "probe_word": scan.probe_word,
            }
        )

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RetroJob:
        word = data.get("probe_word")
        probe = (
            DlpEngine.compile(DlpPolicy(keyword_lists=(KeywordList("new", (word,)),)))
            if isinstance(word, str) and word
            else None
        )
        return cls(
            scope=str(data["scope"]),
            rules=frozenset(data["rules"]),
            since_ms=int(data["since_ms"]),
            window_ms=int(data["window_ms"]),
            requested_by=str(data["requested_by"]),
            command_room=str(data["command_room"]),
            change=str(data["change"]),
            probe=probe,
            probe_word=word if isinstance(word, str) else None,
            id=str(data["id"]),
        )


@dataclass
class Match:
    room_id: str
    event_id: str
    sender: str
    rule: str
    actions: frozenset[Action]
    excerpt: str


@dataclass
class RetroResult:
    rooms: int = 0
    scanned: int = 0
    matches: list[Match] = field(default_factory=list)
    already_redacted: int = 0
    truncated: bool = False

    @property
    def redactions(self) -> list[Match]:
        return [m for m in self.matches if Action.BLOCK in m.actions or Action.REDACT in m.actions]


def _redacted_target(event: Mapping[str, Any]) -> str | None:
    target = event.get("redacts")
    if not isinstance(target, str):
        content = event.get("content")
        target = content.get("redacts") if isinstance(content, dict) else None
    return target if isinstance(target, str) else None


async def scan_archive(
    store: Store, engine: PolicyEngine, job: RetroJob, rooms: list[str]
) -> RetroResult:
    """Read the archive of ``rooms`` and collect the matches of ``job.rules`` (no effects)."""
    result = RetroResult(rooms=len(rooms))
    redacted: set[str] = set()
    # Archived events, then (e2ee) the decrypted copies of encrypted ones, whose matches
    # name the encrypted event (the same event ID).
    passes = [(room, kind) for room in rooms for kind in (AuditKind.EVENT, AuditKind.DECRYPTED)]
    for room, kind in passes:
        records = store.reader.iter(kind=kind, room=room, since=job.since_ms)
        async with contextlib.aclosing(records):  # a break must end the read-ahead now
            async for rec in records:
                event = rec.get("data")
                if kind is AuditKind.DECRYPTED and isinstance(event, dict):
                    event = event.get("event")
                if not isinstance(event, dict):
                    continue
                result.scanned += 1
                if event.get("type") == "m.room.redaction":
                    target = _redacted_target(event)
                    if target:
                        redacted.add(target)
                    continue
                verdict = engine.check_event(event)
                found = [f for f in verdict.findings if f.rule in job.rules]
                if not found:
                    continue
                if job.probe is not None and not job.probe.scan(extract_texts(event)):
                    continue
                f = found[0]
                result.matches.append(
                    Match(
                        room_id=str(event.get("room_id") or room),
                        event_id=str(event.get("event_id") or ""),
                        sender=str(event.get("sender") or "?"),
                        rule=f.rule,
                        actions=frozenset().union(*(x.actions for x in found)),
                        excerpt=f.excerpt,
                    )
                )
                if len(result.matches) >= MAX_MATCHES:
                    result.truncated = True
                    break
                await asyncio.sleep(0)  # let the gate and the worker run between matches
        if result.truncated:
            break
    before = len(result.matches)
    result.matches = [m for m in result.matches if m.event_id not in redacted]
    result.already_redacted = before - len(result.matches)
    return result


def plan_actions(result: RetroResult, job: RetroJob) -> list[NewAction]:
    """One redaction per match of a block/redact rule."""
    return [
        redact(
            m.room_id,
            m.event_id,
            f"removed by company policy ({m.rule}, applied retroactively)",
        )
        for m in result.redactions
    ]


def summary(result: RetroResult, job: RetroJob) -> Reply:
    """The management-room report of a finished scan."""
    where = "globally" if job.scope == GLOBAL else f"in {job.scope}"
    title = (
        f"Retroactive scan for {job.change} ({where}, last {format_duration(job.window_ms)}, "
        f"asked by {job.requested_by}): {result.scanned} archived event(s) in {result.rooms} "
        f"room(s) read, {len(result.matches)} match(es), {len(result.redactions)} queued for "
        "redaction"
        + (f", {result.already_redacted} already redacted" if result.already_redacted else "")
        + (f"; stopped after {MAX_MATCHES} matches: run it again" if result.truncated else "")
        + "."
    )
    items = [
        f"{m.sender} in {m.room_id}: {m.rule} [{', '.join(sorted(m.actions))}]"
        + (f" ({m.excerpt})" if m.excerpt and Action.NOTIFY in m.actions else "")
        for m in result.matches[:LISTED]
    ]
    if len(result.matches) > LISTED:
        items.append(f"… and {len(result.matches) - LISTED} more")
    return Reply.lines(title, items)


async def run(services: RetroServices, engine: PolicyEngine, job: RetroJob) -> RetroResult | None:
    """Scan, enqueue the redactions in batches, report and audit. Never raises."""
    started = time.perf_counter()
    mgmt = services.management_room
    try:
        managed = [r["room_id"] for r in await services.store.rooms.known() if r["joined"]]
        rooms = rooms_in_scope(job.scope, managed, engine.policy.room_spaces, mgmt)
        result = await scan_archive(services.store, engine, job, rooms)
        actions = plan_actions(result, job)
        for i in range(0, len(actions), BATCH):
            await services.executor.submit(actions[i : i + BATCH])
        report = summary(result, job)
        notices = [notice(mgmt, report)] if mgmt else []
        if job.command_room and job.command_room != mgmt:
            notices.append(notice(job.command_room, Reply.plain(report.text.split("\n")[0])))
        if notices:
            await services.executor.submit(notices)
        await services.store.records.append(
            [
                AuditEntry(
                    kind=AuditKind.RETROACTIVE,
                    room_id=None if job.scope == GLOBAL else job.scope,
                    sender=job.requested_by,
                    type="dlp",
                    data={
                        "change": job.change,
                        "scope": job.scope,
                        "rules": sorted(job.rules),
                        "window_ms": job.window_ms,
                        "rooms": result.rooms,
                        "scanned": result.scanned,
                        "matched": len(result.matches),
                        "redactions": [m.event_id for m in result.redactions],
                        "already_redacted": result.already_redacted,
                        "truncated": result.truncated,
                        "ms": round((time.perf_counter() - started) * 1000, 1),
                    },
                )
            ]
        )
        log.info(  # rule names, not job.change: that names the keyword, policy text
            "retroactive scan %s (%s): %d events read, %d matches, %d redactions queued",
            job.id,
            job.rule_names,
            result.scanned,
            len(result.matches),
            len(result.redactions),
        )
        return result
    except Exception as e:
        log.exception("retroactive scan %s (%s) failed", job.id, job.rule_names)
        try:
            if mgmt:
                await services.executor.submit(
                    [
                        notice(
                            mgmt,
                            Reply.plain(
                                f"⚠️ the retroactive scan for {job.change} failed "
                                f"({e.__class__.__name__}); the rule itself is in force. "
                                "Details are in the bridge log."
                            ),
                        )
                    ]
                )
        except Exception:
            log.exception("could not report the failed retroactive scan")
        return None


PENDING_KEY = "dlp.retroactive.pending"
# Unfinished scans per store (a process normally has one); written whole under a lock.
_PENDING: weakref.WeakKeyDictionary[Store, dict[str, RetroJob]] = weakref.WeakKeyDictionary()
_PERSIST = asyncio.Lock()


async def _persist(store: Store) -> None:
    async with _PERSIST:
        jobs = _PENDING.get(store, {})
        await store.state.set(PENDING_KEY, json.dumps([j.to_json() for j in jobs.values()]))


async def _run_recorded(services: RetroServices, engine: PolicyEngine, job: RetroJob) -> None:
    """Record the job as pending, scan, then clear it: a restart mid-scan starts it again
    (redactions already done are found in the archive and skipped). A scan that failed
    stays pending and runs again at the next start."""
    store = services.store
    _PENDING.setdefault(store, {})[job.id] = job
    try:
        await _persist(store)
    except Exception:
        log.warning("could not record the retroactive scan %s as pending", job.id)
    result = await run(services, engine, job)
    if result is not None:
        _PENDING.get(store, {}).pop(job.id, None)
        try:
            await _persist(store)
        except Exception:
            log.warning("could not clear the finished retroactive scan %s", job.id)


def start(services: RetroServices, engine: PolicyEngine, job: RetroJob) -> asyncio.Task[Any] | None:
    """Run the scan in the background (called after the command's commit), owned by the
    bridge's scheduler: a stop cancels it and the next start runs it again. Returns its task,
    or None when the bridge is already shutting down."""
    return services.scheduler.spawn(
        _run_recorded(services, engine, job), TASK_NAME, TaskKind.ONE_OFF
    )


async def resume(services: RetroServices) -> int:
    """Start again the scans a previous run did not finish; returns how many."""
    raw = await services.store.state.get(PENDING_KEY)
    jobs = [RetroJob.from_json(d) for d in (json.loads(raw) if raw else [])]
    for job in jobs:
        log.info("resuming the retroactive scan %s (%s)", job.id, job.rule_names)
        start(services, services.policy.engine, job)
    return len(jobs)
