"""Background audit jobs of a running bridge: interval checkpoints, archive expiry and
checkpoint notices.

:class:`CheckpointSigner` (spawned as soon as the store is open) signs a checkpoint over
the chain head once the oldest record no checkpoint covers is ``audit.checkpoint_interval``
old, so no record stays unsigned longer (besides the checkpoints every
``audit.checkpoint_every`` records and at shutdown). Nothing new written: nothing signed.

``run_audit_jobs(...)`` is spawned once the bridge has started. It

* runs archive expiry (:meth:`bridge.store.archive_expiry.ArchiveExpiry.expire`) at start
  and then every ``audit.archive_expiry_interval`` when ``audit.archive_retention`` is set,
  and
* posts new checkpoint heads to the management room (``audit.post_checkpoints``), at most
  one notice per ``audit.checkpoint_post_interval``; a checkpoint written in between is
  remembered, and the newest one is posted when the interval has passed.

A failing run is logged and retried later; it never stops the bridge.
"""

from __future__ import annotations

import asyncio
import html
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from bridge.archive.setup import audit_config
from bridge.audit.chain import Checkpoint
from bridge.config import Config
from bridge.pipeline.actions import send_notice
from bridge.scheduler import Scheduler, TaskKind
from bridge.store import NewAction, Store, StoreUnavailable
from bridge.store.records import RecordLog

log = logging.getLogger(__name__)

TICK_S = 30.0
RETRY_S = 300.0
#: The signer never checks more often than this (a due head it could not sign is retried).
MIN_SIGNER_WAIT_S = 0.2
#: The signer signs this share of the interval early (at most :data:`MAX_SIGN_LEAD_S`), so
#: that the time a signing takes (the append lock, the commit) does not let a record's
#: unsigned time exceed the interval.
SIGN_LEAD = 0.25
MAX_SIGN_LEAD_S = 5.0


class CheckpointSigner:
    """Signs the chain head before its oldest unsigned record is ``interval_s`` old.

    It signs once that record is :attr:`due_s` old (the interval less a lead for the
    signing itself). Each round runs :meth:`bridge.store.records.RecordLog.sign_due` (the
    store's write path: one transaction under the append lock, so it never races an
    append; with replicas, run it on the one writer only). Between rounds it sleeps until
    the oldest unsigned record is due, or ``interval_s`` when everything is signed (then
    the round also picks up records another process appended). ``clock`` (wall time,
    seconds: records carry wall time) and ``sleep`` are injectable for tests.
    """

    def __init__(
        self,
        records: RecordLog,
        interval_s: float,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.records = records
        self.interval_s = interval_s
        #: The age of the oldest unsigned record at which the head is signed.
        self.due_s = interval_s - min(MAX_SIGN_LEAD_S, interval_s * SIGN_LEAD)
        self.clock = clock
        self.sleep = sleep
        self.signed = 0

    async def round(self) -> float:
        """Sign if due; returns the seconds to wait before the next round."""
        if not self.records.sign_checkpoints:
            return self.interval_s
        due_ms = int(self.due_s * 1000)
        now = int(self.clock() * 1000)
        try:
            cp = await self.records.sign_due(now - due_ms)
        except StoreUnavailable as e:
            log.warning("could not sign the audit head (%s); retrying", e)
            return self.interval_s
        if cp is not None:
            self.signed += 1
        since = self.records.unsigned_since
        if since is None:
            return self.interval_s
        wait = (since + due_ms - now) / 1000
        return min(self.interval_s, max(wait, min(MIN_SIGNER_WAIT_S, self.interval_s)))

    async def run(self) -> None:
        """Forever: a round, then wait as it says."""
        while True:
            await self.sleep(await self.round())


def checkpoint_notice(room_id: str, cp: Checkpoint) -> NewAction:
    """The management-room notice carrying a checkpoint head (a copy outside the store)."""
    when = datetime.fromtimestamp(cp.ts / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    lines = [
        "Audit checkpoint",
        f"seq: {cp.seq} ({cp.record_count} records)",
        f"head: {cp.head_hash.hex()}",
        f"signing key: {cp.key_id}",
        f"time: {when}",
    ]
    body = "\n".join(lines)
    items = "".join(f"<li>{html.escape(x)}</li>" for x in lines[1:])
    return send_notice(
        room_id,
        body,
        f"<p>{html.escape(lines[0])}</p><ul>{items}</ul>",
        details={"checkpoint": cp.to_dict()},
    )


class CheckpointPoster:
    """Store callback: posts checkpoint heads to the management room, rate-limited.

    Each post runs as a one-off task of ``scheduler`` (alone, as in tests, a scheduler of its
    own).
    """

    def __init__(
        self,
        submit: Callable[[list[NewAction]], Awaitable[None]],
        room: Callable[[], str],
        interval_s: float,
        clock: Callable[[], float] = time.monotonic,
        scheduler: Scheduler | None = None,
    ) -> None:
        self.submit = submit
        self.room = room
        self.interval_s = interval_s
        self.clock = clock
        self.pending: Checkpoint | None = None
        self.last_post: float | None = None
        self.posted = 0
        self.scheduler = scheduler or Scheduler()

    def __call__(self, cp: Checkpoint) -> None:
        if self.pending is None or cp.seq > self.pending.seq:
            self.pending = cp
        self.tick()

    def tick(self) -> None:
        """Post the newest unposted checkpoint if the interval allows it."""
        cp, room = self.pending, self.room()
        if cp is None or not room:
            return
        now = self.clock()
        if self.last_post is not None and now - self.last_post < self.interval_s:
            return
        self.pending = None
        self.last_post = now
        self.posted += 1
        self.scheduler.spawn(self._post(room, cp), "checkpoint-notice", TaskKind.ONE_OFF)

    async def _post(self, room: str, cp: Checkpoint) -> None:
        try:
            await self.submit([checkpoint_notice(room, cp)])
        except Exception as e:  # the checkpoint is in the log file and table anyway
            log.warning("could not queue the checkpoint notice for seq %d: %s", cp.seq, e)


async def expire_once(store: Store, retention_ms: int) -> None:
    report = await store.expiry.expire(retention_ms)
    log.info(
        "archive expiry: %d records expired, %d skipped (legal hold), %d room keys destroyed",
        report.expired,
        report.skipped_on_hold,
        report.rooms_shredded,
    )


async def run_audit_jobs(
    config: Config,
    store: Store,
    submit: Callable[[list[NewAction]], Awaitable[None]],
    management_room: Callable[[], str],
    scheduler: Scheduler,
) -> None:
    """Forever: archive expiry on schedule, checkpoint notices (see the module docstring).

    ``config`` is the config at start (the audit settings need a restart); ``submit`` queues
    the notices for the executor; ``management_room`` says where they go right now.
    """
    cfg = audit_config(config)
    poster: CheckpointPoster | None = None
    if cfg.post_checkpoints:
        poster = CheckpointPoster(
            submit,
            management_room,
            cfg.checkpoint_post_interval_s,
            scheduler=scheduler,
        )
        store.records.on_checkpoint = poster
    retention = cfg.archive_retention_ms
    next_expiry = time.monotonic()
    try:
        while True:
            if poster is not None:
                poster.tick()
            if retention is not None and time.monotonic() >= next_expiry:
                try:
                    await expire_once(store, retention)
                    next_expiry = time.monotonic() + cfg.archive_expiry_interval_s
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("archive expiry failed; retrying in %.0fs", RETRY_S)
                    next_expiry = time.monotonic() + min(RETRY_S, cfg.archive_expiry_interval_s)
            await asyncio.sleep(TICK_S)
    finally:
        if store.records.on_checkpoint is poster:
            store.records.on_checkpoint = None
