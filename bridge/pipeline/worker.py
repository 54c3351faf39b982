"""The ingest worker: turns committed transactions into decisions and actions.

It reads the work queue in order and hands each event to its stages: the room tracker
(:mod:`bridge.pipeline.room_tracker`), the command runner
(:mod:`bridge.pipeline.command_runner`), and the policy engine, whose verdicts it enforces
here. What the stages produce goes into one :class:`~bridge.pipeline.batch.Batch`,
committed in the same commit that marks the transactions processed; what they remember
changes after that commit. A batch holds every transaction pending when the worker looks
(up to 20), so a backlog costs one commit per batch, not per transaction. A crash or a
failed commit before it means the transactions are processed again from scratch; after
it, never again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from bridge import metrics
from bridge.audit.kinds import AuditKind
from bridge.commands import CommandRegistry, Reply
from bridge.config import Config
from bridge.e2ee.seam import ENCRYPTED_EVENT
from bridge.pipeline import actions
from bridge.pipeline.batch import Batch, as_str
from bridge.pipeline.command_runner import CommandRunner
from bridge.pipeline.decryption import DecryptionStage
from bridge.pipeline.media_checks import media_refs
from bridge.pipeline.room_tracker import RoomTracker
from bridge.pipeline.services import WorkerServices
from bridge.policy.dlp import CATEGORY as DLP_CATEGORY
from bridge.policy.engine import ENCRYPTION_EVENT, ENCRYPTION_RULE, PolicyEngine
from bridge.policy.model import Action, Finding, Verdict
from bridge.policy.notices import is_local_user, render_warning
from bridge.store import AuditEntry, Store, StoredEvent, StoreUnavailable, WorkItem
from bridge.store.media import MediaCheck
from bridge.store.queue import UnreadableEvent

log = logging.getLogger(__name__)


def notify_text(finding: Finding, verb: str, sender: object, room_id: object) -> str:
    """The management-room line of a ``notify`` rule (with the masked excerpt, if any)."""
    text = f"Policy {finding.rule} {verb} a message from {sender} in {room_id}"
    return text + (f": {finding.excerpt}" if finding.excerpt else "")


class Worker:
    """Processes the work queue: the pending transactions (up to 20), one batch, one commit."""

    def __init__(
        self,
        store: Store,
        config: Callable[[], Config],
        engine: Callable[[], PolicyEngine],
        registry: CommandRegistry,
        services: WorkerServices,
        on_actions: Callable[[], None] = lambda: None,
        on_media: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        self.config = config
        self.engine = engine
        self.services = services
        self.on_actions = on_actions
        self.on_media = on_media  # attachments: in-room media checks were queued
        self.tracker = RoomTracker(store, config, engine, services)
        self.commands = CommandRunner(store, registry, services, self.tracker)
        # encrypted rooms: decrypt, archive the plaintext, retry late keys (bridge.e2ee)
        self.decryption = DecryptionStage(store, config, lambda: services.management_room)
        self._wake = asyncio.Event()
        self._backlog_at = -1.0

    def wake(self) -> None:
        """New transactions were committed: look at the queue now."""
        self._wake.set()

    async def load(self) -> None:
        """Read which rooms the bot is joined to, and commands awaiting confirmation."""
        await self.tracker.load()
        await self.commands.load()
        await self.decryption.load()

    async def run(self) -> None:
        """Process the queue forever, waking on new commits (and every few seconds)."""
        backoff = 0.5
        while True:
            try:
                done = await self.run_once()
                backoff = 0.5
            except (StoreUnavailable, SQLAlchemyError, OSError) as e:
                # Reads raise the driver's errors (connection refused, server shut down):
                # the database is away for a while; the worker must outlive it.
                log.warning("store unavailable in worker (%s); retrying in %.1fs", e, backoff)
                self._wake.clear()
                try:  # a new commit means the database is back: retry at once
                    await asyncio.wait_for(self._wake.wait(), backoff)
                except TimeoutError:
                    pass
                backoff = min(backoff * 2, 30)
                continue
            if done:
                continue
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), 5)
            except TimeoutError:
                pass

    async def run_once(self, limit: int = 20) -> int:
        """Process up to ``limit`` pending transactions in one batch; returns how many."""
        items = await self.store.queue.pending(limit)
        if items:
            await self.process_all(items)
        if self.decryption.retry_due():
            await self._retry_decryption()
        await self._report_backlog(empty=not items)
        return len(items)

    async def _report_backlog(self, *, empty: bool) -> None:
        """The queue gauges: zero when the queue was just seen empty; else read from the
        store at most once a second (a query per batch costs more than the gauges are worth)."""
        if empty:
            metrics.QUEUE_DEPTH.set(0)
            metrics.QUEUE_LAG.set(0)
            return
        now = time.monotonic()
        if now - self._backlog_at < 1.0:
            return
        self._backlog_at = now
        depth, lag = await self.store.queue.backlog()
        metrics.QUEUE_DEPTH.set(depth)
        metrics.QUEUE_LAG.set(lag)

    async def process(self, item: WorkItem) -> None:
        """Process one transaction and commit everything it produced at once."""
        await self.process_all([item])

    async def process_all(self, items: list[WorkItem]) -> None:
        """Process transactions, in order, into ONE batch: everything they produced and the
        marks that they were processed are one commit (all of them, or none)."""
        batch = Batch()
        # encrypted rooms: how long this batch may still wait for late room keys
        key_wait = [self.config().e2ee.key_wait_s]
        for item in items:
            unreadable: list[UnreadableEvent] = []
            for stored in item.events:
                if isinstance(stored, UnreadableEvent):
                    unreadable.append(stored)
                    continue
                await self._handle_stored(stored, batch, key_wait)
            if unreadable:
                self._unreadable(item, unreadable, batch)
        await self._commit([item.queue_id for item in items], batch)

    async def _retry_decryption(self) -> None:
        """Encrypted events whose keys arrived late: decrypted, recorded and handled in
        one commit of their own."""
        batch = await self.decryption.retry(self.handle_event)
        if batch is None:
            return
        await self._commit([], batch)

    async def _commit(self, queue_ids: list[int], batch: Batch) -> None:
        """Everything ``batch`` holds and the marks of ``queue_ids``: one commit; then the
        batch's after-commit callbacks and the wake-ups."""
        # encrypted rooms: the Megolm indexes this batch claimed, durable before it is
        await self.decryption.before_commit()
        await self.store.queue.complete(
            queue_ids,
            batch.actions,
            batch.audit,
            batch.state,
            rooms=list(batch.rooms.values()),
            media=batch.media,
        )
        for callback in batch.after_commit:
            callback()
        if batch.actions:
            self.on_actions()
        if batch.media:
            self.on_media()

    async def _handle_stored(
        self, stored: StoredEvent, batch: Batch, key_wait: list[float]
    ) -> None:
        """One stored event (and, in an encrypted room, its decrypted copy) into ``batch``;
        ``key_wait[0]`` is what the batch may still wait for late room keys."""
        event = stored.event
        try:
            await self.handle_event(event, batch)
            if event.get("type") == ENCRYPTED_EVENT and self.decryption.crypto is not None:
                started = time.monotonic()
                room = as_str(event.get("room_id")) or ""
                joined = self.tracker.joined(room, batch)
                plain = await self.decryption.decrypt(
                    event, stored.seq, batch, wait=key_wait[0], joined=joined
                )
                key_wait[0] = max(0.0, key_wait[0] - (time.monotonic() - started))
                if plain is not None:
                    await self.handle_event(plain, batch)
        except Exception as e:
            # An event we cannot handle must not block the queue: record and move on.
            log.exception(
                "could not process event %s in %s", event.get("event_id"), event.get("room_id")
            )
            batch.audit.append(
                AuditEntry(
                    kind=AuditKind.ERROR,
                    room_id=as_str(event.get("room_id")),
                    data={
                        "event_id": event.get("event_id"),
                        "seq": stored.seq,
                        "error": e.__class__.__name__,
                    },
                )
            )

    def _unreadable(self, item: WorkItem, events: list[UnreadableEvent], batch: Batch) -> None:
        """Archived events that cannot be read back are skipped, not retried forever: each
        gets an ``error`` audit record (its seq and why; nothing of its content), and the
        management room one notice per transaction. The record itself stays in the archive
        (``audit verify`` reports it if it was altered)."""
        for ev in events:
            log.error(
                "audit record seq %d of transaction %s cannot be read (%s); skipped by the worker",
                ev.seq,
                item.txn_id,
                ev.reason,
            )
            batch.audit.append(
                AuditEntry(
                    kind=AuditKind.ERROR,
                    data={
                        "seq": ev.seq,
                        "error": "unreadable",
                        "reason": ev.reason,
                        "queue_id": item.queue_id,
                    },
                )
            )
        batch.after_commit.append(lambda: metrics.UNREADABLE_EVENTS.inc(len(events)))
        if self.services.management_room:
            seqs = ", ".join(str(e.seq) for e in events[:20])
            more = f" and {len(events) - 20} more" if len(events) > 20 else ""
            reasons = "; ".join(sorted({e.reason for e in events}))
            batch.actions.append(
                actions.notice(
                    self.services.management_room,
                    Reply.plain(
                        f"⚠️ {len(events)} archived event(s) could not be read back for "
                        f"policy checks (audit record seq {seqs}{more}: {reasons}). They were "
                        "skipped; the transaction's other events were processed. "
                        "`!policy audit verify` checks the archive."
                    ),
                )
            )

    # -- per event ----------------------------------------------------------------------

    async def handle_event(self, event: Mapping[str, Any], batch: Batch) -> None:
        """Stage everything one event leads to: room bookkeeping, a command, enforcement."""
        cfg = self.config()
        self.tracker.on_event(event, batch, cfg)
        if self.decryption.crypto is not None:
            room = as_str(event.get("room_id")) or ""
            await self.decryption.on_event(event, batch, self.tracker.joined(room, batch))
        if event.get("sender") == cfg.bot_mxid:
            return
        # A command message is judged like any message below: a command prefix must not be
        # a way around the rules (the management room is exempt from DLP, so admins can
        # quote text). A reaction that confirms a command is not judged.
        if await self.commands.handle(event, batch, cfg):
            return
        self._queue_media_check(event, batch, cfg)
        verdict = self.engine().check_event(event)
        if verdict.findings:
            rules = [f.rule for f in verdict.findings if f.category == DLP_CATEGORY]
            if rules:  # counted once committed (a transaction processed again is not)
                batch.after_commit.append(lambda: _count_dlp_hits(rules))
            self._enforce(event, verdict, batch)

    def _queue_media_check(self, event: Mapping[str, Any], batch: Batch, cfg: Config) -> None:
        """Attachments (issue 12): queue the in-room check of the media a message refers
        to, or record why it cannot be read (see :mod:`bridge.pipeline.media_checks`)."""
        if not (cfg.attachments.enabled and cfg.attachments.recheck_in_rooms):
            return
        room_id = as_str(event.get("room_id")) or ""
        event_id = as_str(event.get("event_id")) or ""
        sender = as_str(event.get("sender")) or ""
        for ref, why in media_refs(event):  # the file and its thumbnail
            if ref is not None:
                batch.media.append(MediaCheck(room_id, event_id, sender, ref.mxc, key=ref.key))
            elif why:
                data = {"path": "room", "event_id": event_id, "outcome": "skipped", "why": why}
                batch.audit.append(
                    AuditEntry(kind=AuditKind.MEDIA, room_id=room_id, sender=sender, data=data)
                )

    # -- enforcement on the ingest path -------------------------------------------------

    def _enforce(self, event: Mapping[str, Any], verdict: Verdict, batch: Batch) -> None:
        room_id = as_str(event.get("room_id")) or ""
        event_id = as_str(event.get("event_id")) or ""
        sender = as_str(event.get("sender")) or ""
        done: list[str] = []
        if event.get("type") == ENCRYPTION_EVENT:
            # Encryption cannot be switched off again (and createRoom's initial state never
            # reaches the gate): redacting the state event would not help, so tell the admins.
            self._encryption_enabled(room_id, sender, verdict, batch, done)
        elif verdict.wants(Action.BLOCK) or verdict.wants(Action.REDACT):
            rule = (verdict.first_block or verdict.findings[0]).rule
            batch.actions.append(
                actions.redact(room_id, event_id, f"removed by company policy ({rule})")
            )
            done.append("redact")
        for f in verdict.findings:
            if f.rule == ENCRYPTION_RULE:
                continue  # reported above
            if Action.WARN in f.actions:
                # In a thread where readable, else in the sender's notice room (executor).
                joined = self.tracker.joined(room_id, batch)
                local = is_local_user(sender, self.config().homeserver.domain)
                if joined or local:
                    warning = Reply.plain(f"{sender}: {f.message}")
                    language = self.config().notices.languages.for_user(str(sender))
                    dm = render_warning(room_id, f.rule, f.message, time.time(), language)
                    batch.actions.append(
                        actions.warn_sender(
                            room_id,
                            sender,
                            event_id,
                            warning,
                            dm,
                            joined=joined,
                            local=local,
                            details={"rule": f.rule},
                        )
                    )
                    done.append("warn")
            if Action.NOTIFY in f.actions and self.services.management_room:
                text = notify_text(f, "matched", sender, room_id)
                batch.actions.append(
                    actions.notice(self.services.management_room, Reply.plain(text))
                )
                done.append("notify")
        batch.audit.append(
            AuditEntry(
                kind=AuditKind.DECISION,
                room_id=room_id,
                sender=sender,
                type=as_str(event.get("type")),
                data={
                    "event_id": event_id,
                    "path": "ingest",
                    "actions": done,
                    "findings": [
                        {"rule": f.rule, "actions": sorted(f.actions), "excerpt": f.excerpt}
                        for f in verdict.findings
                    ],
                },
            )
        )

    def _encryption_enabled(
        self, room_id: str, sender: str, verdict: Verdict, batch: Batch, done: list[str]
    ) -> None:
        mgmt = self.services.management_room
        if not mgmt or not verdict.wants(Action.NOTIFY):
            return
        batch.actions.append(
            actions.notice(
                mgmt,
                Reply.plain(
                    f"⚠️ {sender} turned on end-to-end encryption in {room_id}, where company"
                    f" policy ({ENCRYPTION_RULE}) forbids it (e.g. set when the room was"
                    " created, which the gate cannot refuse). Encryption cannot be turned off"
                    " again: the bridge cannot read or filter messages in this room. Consider"
                    " replacing the room (upgrade it, or create a new unencrypted room)."
                ),
            )
        )
        done.append("notify")


def _count_dlp_hits(rules: list[str]) -> None:
    for rule in rules:
        metrics.DLP_HITS.labels(rule, "ingest").inc()
