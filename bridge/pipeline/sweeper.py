"""The retention sweeper: removes messages older than each room's ``max_lifetime``.

Every ``retention.sweep_interval`` (and at once when the retention policy changes) the
sweeper walks the joined rooms. For a room whose effective policy has a ``max_lifetime``
it reads, from the store's index (``room_idx``, ``origin_ts``; never the client API), one
batch of archived events older than the cutoff and past the room's swept position,
decrypts them to leave out state events, redactions and events already redacted, and
enqueues ``redact`` actions for the executor. When the room has caught up and a Synapse
admin token is configured, it also enqueues a ``purge_history`` up to the cutoff so the
content leaves the homeserver's database too (Synapse never purges state events).

Progress is per room, in the state table under ``retention.swept.<blind index of the room>``
(no room ID in plaintext), and commits in the same transaction as the actions it produced
(the work of up to ``group_rooms`` rooms per transaction): a restart resumes where the last
commit left off and redoes nothing. A tick handles at most
one batch per room and ``sweep_max_events`` events in all, and does not add work while the
executor still has more than ``sweep_max_pending`` actions waiting.

Legal hold: a room on hold is not swept at all (no redactions, no purge); events of a user
on hold are not redacted and a room where such a user spoke before the cutoff is not purged.
Holds are read again before every commit of batches, and a group computed under other holds
is dropped, so a hold placed during a sweep stops it before its next batch is queued.
Every purge and every skip because of a hold is audited with counts. What becomes of each
event and whether a room is purged are decided by the pure core in
:mod:`bridge.policy.retention` (:func:`sweep_fate`, :func:`plan_purge`), which the executor
also consults before it runs a queued removal.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Self

from bridge import metrics
from bridge.audit.kinds import AuditKind
from bridge.config import Config
from bridge.pipeline.actions import purge_history, redact
from bridge.policy.durations import format_duration
from bridge.policy.engine import PolicyEngine
from bridge.policy.retention import (
    USER_HELD,
    Fate,
    SkippedPurge,
    event_hold,
    expiry_cutoff,
    plan_purge,
    purge_due,
    sweep_fate,
)
from bridge.policy.scopes import rooms_in_scope
from bridge.store import AuditEntry, Holds, NewAction, Store, StoreUnavailable, now_ms
from bridge.store.sweep_queries import SweepQueries

log = logging.getLogger(__name__)

PROGRESS_PREFIX = "retention.swept."
TOTALS_KEY = "retention.sweep"
ROOM_PAGE = 200
# A user's redaction is looked for up to this long after the messages of a batch (further
# needs a (room, type, ts) index); a later one only means a harmless second redaction.
REDACTION_LOOKAHEAD_MS = 86_400_000
_END = 1 << 62  # a seq after every real one

Commit = Callable[[list[NewAction], list[AuditEntry], dict[str, str]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class SweepSettings:
    """How the sweep paces itself (``retention:`` section of the config)."""

    interval_s: float = 60.0  # between ticks
    batch: int = 200  # events per room per tick
    max_events: int = 2000  # events per tick, all rooms together
    max_pending: int = 5000  # no new work while the executor has more actions waiting
    purge_delay_s: float = 5.0  # a purge waits this long after the redactions it follows
    group_rooms: int = 50  # rooms committed together (one transaction)

    @classmethod
    def from_config(cls, config: Config) -> SweepSettings:
        section = config.retention
        return cls(
            interval_s=section.sweep_interval_s,
            batch=section.sweep_batch,
            max_events=section.sweep_max_events,
            max_pending=section.sweep_max_pending,
        )


async def load_holds(store: Store, config: Config) -> Holds:
    """Legal holds: the store's (``!policy hold``) plus the config's."""
    audit = config.audit
    held = await store.holds.current()
    rooms = set(held.rooms) | set(audit.legal_hold_rooms if audit is not None else ())
    users = set(held.users) | set(audit.legal_hold_users if audit is not None else ())
    return Holds(frozenset(rooms), frozenset(users))


class _JsonState:
    """A small dataclass kept as JSON in the store's state table."""

    @classmethod
    def decode(cls, text: str | None) -> Self:
        """The stored value (unknown keys ignored); a fresh one if missing or unreadable."""
        if not text:
            return cls()
        try:
            doc = json.loads(text)
            known = {k: v for k, v in doc.items() if k in cls.__dataclass_fields__}  # type: ignore[attr-defined]
            return cls(**known)
        except (ValueError, TypeError, AttributeError):
            log.warning("unreadable %s %r; starting afresh", cls.__name__, text)
            return cls()

    def encode(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True)  # type: ignore[call-overload]


@dataclass
class RoomProgress(_JsonState):
    """Where a room's sweep stands (kept as JSON under its blind key; no IDs inside).

    ``ts``/``seq``: the last swept event; ``unpurged``: messages swept since the last
    purge; ``held_users``: blind indexes of senders whose events were skipped under hold,
    from position ``held_from``; once such holds are lifted the sweep goes back over that
    range up to ``rescan_to``, redacting only the events of ``rescan_users`` (the others
    were redacted the first time).
    """

    ts: int = -1
    seq: int = 0
    unpurged: int = 0
    purged_to: int = 0
    removed: int = 0
    audited: str = ""  # the last hold skip audited, so an unchanged skip is not repeated
    held_users: list[str] = field(default_factory=list)
    held_from: list[int] | None = None
    rescan_to: list[int] | None = None
    rescan_users: list[str] = field(default_factory=list)


@dataclass
class SweepTotals(_JsonState):
    """Counters shown by ``!policy status`` (persisted under ``retention.sweep``)."""

    last_run: int = 0  # ms
    ticks: int = 0
    events_removed: int = 0  # redactions enqueued
    purges: int = 0  # purge_history enqueued
    rooms_completed: int = 0  # times a room's backlog was cleared
    hold_skips: int = 0
    rooms_in_policy: int = 0  # in the last tick: rooms whose policy expires messages
    rooms_behind: int = 0  # ... of which not yet caught up
    rooms_held: int = 0  # ... of which skipped for legal hold
    waiting: bool = False  # the last tick waited for the executor


@dataclass
class _Group:
    """Several rooms' work, committed in one transaction (after a last look at holds)."""

    holds: Holds
    actions: list[NewAction] = field(default_factory=list)
    audit: list[AuditEntry] = field(default_factory=list)
    state: dict[str, str] = field(default_factory=dict)
    rooms: int = 0
    removed: int = 0
    purges: int = 0
    completed: int = 0
    hold_skips: int = 0

    def add(self, key: str, progress: RoomProgress) -> None:
        if key not in self.state:
            self.rooms += 1
        self.state[key] = progress.encode()


@dataclass
class _Tick:
    budget: int
    in_policy: int = 0
    behind: int = 0
    held: int = 0
    events: int = 0


class RetentionSweeper:
    """Finds expired events through the store's index and has the executor remove them."""

    def __init__(
        self,
        store: Store,
        engine: Callable[[], PolicyEngine],
        config: Callable[[], Config],
        *,
        purge: Callable[[], bool],
        management_room: Callable[[], str] = lambda: "",
        commit: Commit | None = None,
        on_actions: Callable[[], None] = lambda: None,
        clock: Callable[[], int] = now_ms,
        settings: SweepSettings | None = None,
    ) -> None:
        self.store = store
        self.q = SweepQueries(store)
        self.engine = engine
        self.config = config
        self.purge = purge
        self.management_room = management_room
        self.commit: Commit = commit or self._commit
        self.on_actions = on_actions
        self.clock = clock
        self._settings = settings
        self.totals = SweepTotals()
        self._cursor = ""  # resume the round robin after this room ID
        self._wake = asyncio.Event()
        self._seen_policy: Any = None
        self._group: _Group | None = None

    @property
    def settings(self) -> SweepSettings:
        return self._settings or SweepSettings.from_config(self.config())

    async def _commit(
        self, actions: list[NewAction], audit: list[AuditEntry], state: dict[str, str]
    ) -> None:
        await self.store.queue.complete([], actions, audit, state)

    def progress_key(self, room_id: str) -> str:
        return PROGRESS_PREFIX + self.q.room_idx(room_id).hex()

    async def load(self) -> None:
        """Read the persisted counters."""
        self.totals = SweepTotals.decode(await self.store.state.get(TOTALS_KEY))

    # -- the loop ---------------------------------------------------------------------

    def wake(self) -> None:
        """Sweep now (the retention policy or a hold changed)."""
        self._wake.set()

    def _policy_marker(self) -> Any:
        policy = self.engine().policy
        return (policy.retention, dict(policy.room_spaces))

    async def run(self) -> None:
        """Tick forever; between ticks wait for the interval, a wake-up or a policy change."""
        self._seen_policy = self._policy_marker()
        backoff = 1.0
        while True:
            try:
                behind = await self.tick()
                backoff = 1.0
            except StoreUnavailable as e:
                log.warning("retention sweep: store unavailable (%s); retry in %.0fs", e, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 60)
                continue
            except Exception:
                log.exception("retention sweep failed; next try in %.0fs", self.settings.interval_s)
                behind = False
            interval = self.settings.interval_s
            await self._pause(min(interval, 5.0) if behind else interval)

    async def _pause(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        self._wake.clear()
        while (left := deadline - time.monotonic()) > 0:
            try:
                await asyncio.wait_for(self._wake.wait(), min(left, 1.0))
                return
            except TimeoutError:
                pass
            marker = self._policy_marker()
            if marker != self._seen_policy:
                self._seen_policy = marker
                log.info("retention policy changed: sweeping now")
                return

    # -- one tick ---------------------------------------------------------------------

    async def tick(self) -> bool:
        """One pass: at most one batch per room and ``max_events`` events in all.

        Returns whether work is left (some room not caught up, or the budget ran out).
        """
        settings = self.settings
        totals = self.totals
        totals.ticks += 1
        totals.last_run = self.clock()
        metrics.RETENTION_LAST_SWEEP.set(totals.last_run / 1000)
        if await self.q.pending_actions() > settings.max_pending:
            totals.waiting = True
            log.info("retention sweep: the executor is busy; waiting before adding work")
            await self.store.state.set(TOTALS_KEY, totals.encode())
            return True
        totals.waiting = False
        tick = _Tick(budget=settings.max_events)
        self._group = None
        start = self._cursor
        stopped_at = await self._pass(start, None, tick)
        if stopped_at is None and start:
            stopped_at = await self._pass("", start, tick)  # wrap around once
        await self._flush(tick)
        self._cursor = stopped_at or ""
        totals.rooms_in_policy = tick.in_policy
        totals.rooms_behind = tick.behind
        totals.rooms_held = tick.held
        metrics.RETENTION_ROOMS.labels("limited").set(tick.in_policy)
        metrics.RETENTION_ROOMS.labels("behind").set(tick.behind)
        metrics.RETENTION_ROOMS.labels("held").set(tick.held)
        await self.store.state.set(TOTALS_KEY, totals.encode())
        return tick.behind > 0 or stopped_at is not None

    async def _pass(self, after: str, until: str | None, tick: _Tick) -> str | None:
        """Rooms after ``after`` (up to ``until`` included); the room where the budget ran
        out, or None when the pass finished."""
        mgmt = self.management_room()
        engine = self.engine()
        settings = self.settings
        while True:
            page = await self.q.joined_rooms(after, ROOM_PAGE)
            if until is not None:  # pages follow the store's room order (blind indexes)
                last = self.q.order_key(until)
                page = [r for r in page if self.q.order_key(r[0]) <= last]
            if not page:
                return None
            keys = {room: self.progress_key(room) for room, _ in page}
            stored = await self.q.get_states(list(keys.values()))
            for room, lacking in page:
                after = room
                if room == mgmt:
                    continue
                cutoff = expiry_cutoff(engine.retention_for(room), self.clock())
                if not cutoff:
                    continue
                tick.in_policy += 1
                if "redact" in lacking:
                    tick.behind += 1  # reported as lacking power by !policy rooms
                    continue
                if self._group is None:
                    self._group = _Group(await load_holds(self.store, self.config()))
                group = self._group
                progress = RoomProgress.decode(stored.get(keys[room]))
                tick.budget -= await self._sweep_room(room, keys[room], cutoff, progress, tick)
                if group.rooms >= settings.group_rooms or len(group.actions) >= 1000:
                    await self._flush(tick)
                if tick.budget <= 0:
                    return room
            if until is not None and self.q.order_key(after) >= self.q.order_key(until):
                return None

    async def _flush(self, tick: _Tick) -> None:
        """Commit the group's actions, audit records and progress in one transaction, if
        the legal holds are still those the group was computed with (else drop it: those
        rooms are swept again next time)."""
        group, self._group = self._group, None
        if group is None or not group.state:
            return
        holds = await load_holds(self.store, self.config())
        if holds != group.holds:
            log.info("legal holds changed during the sweep; %d room(s) left for later", group.rooms)
            tick.behind += 1
            return
        t = self.totals
        t.events_removed += group.removed
        t.purges += group.purges
        t.rooms_completed += group.completed
        t.hold_skips += group.hold_skips
        group.state[TOTALS_KEY] = t.encode()
        try:
            await self.commit(group.actions, group.audit, group.state)
        except BaseException:
            await self.load()  # the counters in memory ran ahead of what was committed
            raise
        metrics.RETENTION_REMOVALS.labels("redact").inc(group.removed)
        metrics.RETENTION_REMOVALS.labels("purge").inc(group.purges)
        metrics.RETENTION_HOLD_SKIPS.inc(group.hold_skips)
        if group.actions:
            self.on_actions()

    async def _sweep_room(
        self, room: str, key: str, cutoff: int, progress: RoomProgress, tick: _Tick
    ) -> int:
        """One batch in one room, added to the group; returns how many events it read."""
        group = self._group
        assert group is not None
        holds = group.holds
        settings = self.settings
        policy = self.engine().retention_for(room)
        assert policy.max_lifetime_ms is not None
        if progress.held_users:
            self._maybe_rewind(progress, holds)
        room_hold = event_hold(room, None, holds.rooms, ())
        if room_hold is not None:
            tick.held += 1
            waiting = await self.q.count_expired(room, cutoff, progress.ts, progress.seq)
            marker = f"room:{waiting}"
            if waiting and progress.audited != marker:
                progress.audited = marker
                group.hold_skips += 1
                group.audit.append(self._audit(room, "skipped", room_hold, events=waiting))
                group.add(key, progress)
            return 0
        limit = max(1, min(settings.batch, tick.budget))
        batch = await self.q.expired_batch(room, cutoff, progress.ts, progress.seq, limit)
        actions: list[NewAction] = []
        reason = f"retention: older than {format_duration(policy.max_lifetime_ms)}"
        held_events = state_events = already = 0
        if batch:
            first, last = batch[0], batch[-1]
            redacted = await self.q.redacted_targets(
                room, first.origin_ts, last.origin_ts + REDACTION_LOOKAHEAD_MS, (self.bot,)
            )
            held_idx = set(progress.held_users)
            rescan = set(progress.rescan_users)
            for rec in batch:
                ev = rec.event
                fate = sweep_fate(ev, redacted, holds.users)
                if ev is None or fate is Fate.UNREADABLE:
                    continue
                if fate is Fate.STATE:
                    state_events += 1
                    continue
                if fate is Fate.REDACTED:
                    already += 1
                    continue
                event_id, sender = ev["event_id"], ev.get("sender")
                sender_idx = (
                    self.store.keys.blind("sender", sender) if isinstance(sender, str) else None
                )
                if rescan and (sender_idx is None or sender_idx.hex() not in rescan):
                    continue  # swept before the hold was lifted
                if fate is Fate.HELD and sender_idx is not None:
                    held_events += 1
                    held_idx.add(sender_idx.hex())
                    if progress.held_from is None:
                        progress.held_from = [rec.origin_ts, rec.seq - 1]
                    continue
                named = sender if isinstance(sender, str) else None
                actions.append(redact(room, event_id, reason, retention=True, sender=named))
            progress.ts, progress.seq = last.origin_ts, last.seq
            progress.held_users = sorted(held_idx)
            if progress.rescan_to is not None and [last.origin_ts, last.seq] >= progress.rescan_to:
                progress.rescan_to = None
                progress.rescan_users = []
            progress.unpurged += len(actions) + held_events
            progress.removed += len(actions)
            group.removed += len(actions)
            group.audit.append(
                self._audit(
                    room,
                    "redactions",
                    reason,
                    events=len(actions),
                    skipped_state=state_events,
                    skipped_redacted=already,
                    skipped_held_users=held_events,
                )
            )
            if held_events:
                group.hold_skips += 1
                group.audit.append(self._audit(room, "skipped", USER_HELD, events=held_events))
        if len(batch) < limit:  # caught up with the cutoff
            if batch:
                group.completed += 1
            await self._maybe_purge(room, cutoff, progress, holds, actions, group)
        else:
            tick.behind += 1
        group.actions.extend(actions)
        if batch or actions or progress.audited:
            group.add(key, progress)
        return len(batch)

    @property
    def bot(self) -> str:
        return self.config().bot_mxid

    def _maybe_rewind(self, progress: RoomProgress, holds: Holds) -> None:
        """Users whose events were skipped under hold are no longer held: go back over
        that range for their events only."""
        still = {
            idx.hex()
            for u in holds.users
            if (idx := self.store.keys.blind("sender", u)) is not None
        }
        lifted = set(progress.held_users) - still
        if not lifted or progress.held_from is None:
            return
        progress.rescan_users = sorted(set(progress.rescan_users) | lifted)
        if progress.rescan_to is None or [progress.ts, progress.seq] > progress.rescan_to:
            progress.rescan_to = [progress.ts, progress.seq]
        progress.ts, progress.seq = progress.held_from
        progress.held_users = sorted(set(progress.held_users) & still)
        progress.held_from = None

    async def _maybe_purge(
        self,
        room: str,
        cutoff: int,
        progress: RoomProgress,
        holds: Holds,
        actions: list[NewAction],
        group: _Group,
    ) -> None:
        if not self.purge() or not purge_due(cutoff, progress.purged_to, progress.unpurged):
            return
        senders = await self.q.senders_before(room, holds.users, cutoff) if holds.users else ()
        plan = plan_purge(
            room,
            cutoff,
            purged_to=progress.purged_to,
            pending=progress.unpurged,
            held_rooms=holds.rooms,
            held_senders=senders,
        )
        if plan is None:
            return
        if isinstance(plan, SkippedPurge):
            marker = f"users:{progress.unpurged}"
            if progress.audited != marker:
                progress.audited = marker
                group.hold_skips += 1
                group.audit.append(
                    self._audit(room, "purge_skipped", plan.reason, events=progress.unpurged)
                )
            return
        actions.append(
            purge_history(
                room,
                plan.purge_up_to_ts,
                delete_local_events=True,
                not_before=time.time() + self.settings.purge_delay_s,
            )
        )
        group.audit.append(
            self._audit(
                room, "purge", "expired history", events=progress.unpurged, purge_up_to_ts=cutoff
            )
        )
        group.purges += 1
        progress.purged_to = cutoff
        progress.unpurged = 0
        progress.audited = ""

    @staticmethod
    def _audit(room: str, what: str, reason: str, **counts: Any) -> AuditEntry:
        return AuditEntry(
            kind=AuditKind.RETENTION,
            room_id=room,
            type=what,
            data={"outcome": what, "reason": reason, **counts},
        )

    # -- confirmation of a shorter retention ------------------------------------------

    async def count_expiring(
        self, scope: str, candidate: PolicyEngine, current: PolicyEngine | None = None
    ) -> tuple[int, int]:
        """Messages (and rooms holding them) that ``candidate`` would delete and the
        policy in force (``current``) would not yet, not counting rooms on hold.

        The rooms are those the change reaches (:func:`rooms_in_scope`, as the rollout
        and the retroactive scan use): every joined room for ``global``, else the scope's
        room and, for a space, the joined rooms in it."""
        now = self.clock()
        holds = await load_holds(self.store, self.config())
        mgmt = self.management_room()
        events = rooms = 0
        joined: list[str] = []
        after = ""
        while page := await self.q.joined_rooms(after, ROOM_PAGE):
            joined.extend(r for r, _ in page)
            after = page[-1][0]
        targets = rooms_in_scope(scope, joined, candidate.policy.room_spaces, mgmt)
        for room in targets:
            if room == mgmt or event_hold(room, None, holds.rooms, ()) is not None:
                continue
            cutoff = expiry_cutoff(candidate.retention_for(room), now)
            if not cutoff:
                continue
            progress = RoomProgress.decode(await self.store.state.get(self.progress_key(room)))
            after_ts, after_seq = progress.ts, progress.seq
            old = expiry_cutoff(current.retention_for(room), now) if current else None
            if old and old - 1 > after_ts:
                after_ts, after_seq = old - 1, _END
            if after_ts >= cutoff:
                continue
            n = await self.q.count_expired(room, cutoff, after_ts, after_seq)
            if n:
                events += n
                rooms += 1
        return events, rooms

    # -- status -----------------------------------------------------------------------

    def status_lines(self, now: int | None = None) -> list[str]:
        t = self.totals
        if not t.last_run:
            return ["retention sweep: not run yet"]
        ago = max(0, ((now or self.clock()) - t.last_run) // 1000)
        line = (
            f"retention sweep: last run {format_duration(ago * 1000)} ago; "
            f"{t.rooms_in_policy} room(s) with a retention limit, {t.rooms_behind} still "
            f"sweeping, {t.rooms_held} on legal hold"
        )
        if t.waiting:
            line += " (waiting for the executor)"
        return [
            line,
            f"retention totals: {t.events_removed} event(s) removed, {t.purges} purge(s), "
            f"{t.rooms_completed} room sweep(s) completed, {t.hold_skips} skip(s) for legal hold",
        ]
