"""Room enforcement bookkeeping: what we know of rooms, rollouts of policy changes.

The executor's ``reconcile`` action does the work in a room (read state, plan, send ACL and
retention, kick) through the :class:`RoomEnforcement` hooks; this module decides when to
schedule it, remembers each room's members (from reconciles and the event stream; kept in
the store's sealed room records, so the count of members a federation change would remove
survives a restart), records each room's enforcement state (enforced, drifted, lacks power,
not joined), reports what power the bot lacks (once per room and distinct lack, batched
into few notices; and once in the room itself), and reports rollout progress with what the
rollout achieved (:mod:`bridge.policy.outcomes` words it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bridge.commands.replies import Reply
from bridge.commands.services import StagedChange
from bridge.pipeline import actions
from bridge.pipeline.actions import ActionKind
from bridge.policy.federation import FederationPolicy, server_allowed
from bridge.policy.model import server_name
from bridge.policy.outcomes import (
    RolloutTally,
    classify,
    power_lacks,
    rollout_text,
    room_notice,
)
from bridge.policy.rooms import DRIFTED as DRIFTED  # re-exported for the worker
from bridge.policy.rooms import RoomPlan, RoomState
from bridge.scheduler import Scheduler, TaskKind
from bridge.store import NewAction, Store

log = logging.getLogger(__name__)

ROLLOUT_KEY = "rollout"
#: Memberships the planner removes when the server is excluded.
PRESENT = frozenset({"join", "invite", "knock"})
#: Fields of a room's sealed record (``RoomRepository.update_data``).
MEMBERS_FIELD = "members"  # {user_id: membership} of present members (remote ones when known)
REPORTED_FIELD = "reported"  # the lack last reported to the management room
POWER_FIELD = "cannot"  # {event type or "kick": lack} the bot's power falls short of
NOTICED_FIELD = "noticed"  # the bot told the room it cannot enforce there (until fixed)
#: A lack longer than this is cut in notices (a room with many unkickable members).
LACK_TEXT_LIMIT = 300


@dataclass(frozen=True, slots=True)
class Affected:
    """The members a federation change would remove, by room."""

    rooms: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def members(self) -> int:
        return sum(len(u) for u in self.rooms.values())

    @property
    def servers(self) -> set[str]:
        return {server_name(u) for users in self.rooms.values() for u in users}

    def __bool__(self) -> bool:
        return bool(self.rooms)

    def describe(self, max_rooms: int = 10, max_users: int = 5) -> str:
        """Counts, servers, and the first rooms with the first members of each."""
        lines = [
            f"this change would remove {self.members} member(s) from {len(self.rooms)} "
            f"room(s) (servers: {', '.join(sorted(self.servers))}):"
        ]
        ordered = sorted(self.rooms.items(), key=lambda kv: (-len(kv[1]), kv[0]))
        for room, users in ordered[:max_rooms]:
            shown = ", ".join(users[:max_users])
            more = f" and {len(users) - max_users} more" if len(users) > max_users else ""
            lines.append(f"• {room}: {len(users)} member(s): {shown}{more}")
        if len(ordered) > max_rooms:
            lines.append(f"• … and {len(ordered) - max_rooms} more room(s)")
        return "\n".join(lines)


@dataclass(frozen=True)
class RoomEnforcement:
    """Hooks the executor's ``reconcile`` action uses: the pure planner, and where the
    state it read (``on_state``) and the outcome (``on_result``) go."""

    plan: Callable[[str, list[dict[str, Any]]], RoomPlan]
    on_state: Callable[[str, list[dict[str, Any]]], None] = lambda _r, _s: None
    on_result: Callable[[str, dict[str, Any]], Awaitable[None]] | None = None


def _power_lacks_of(result: Mapping[str, Any]) -> list[str]:
    """The lacks of a reconcile result that power given to the bot would fix."""
    out = [str(lack) for lack in result.get("lacking") or ()]
    for item in result.get("unkickable") or ():
        _user, _sep, why = str(item).partition(": ")
        if why.startswith("the bot needs power") and why not in out:
            out.append(why)
    return out


class RoomEnforcer:
    """Schedules reconciles and keeps per-room enforcement state.

    ``own_server``: when given, members of our own server (never removed by a federation
    policy) are not kept. Missing power is reported at most every ``report_delay`` seconds
    (or with a rollout's progress notices), listing up to ``report_limit`` rooms; a lack is
    reported once it has lasted ``report_grace`` seconds (a reconcile that obtains power
    with make_room_admin comes right after the first one).
    """

    def __init__(
        self,
        store: Store,
        rollout_rate: Callable[[], float],
        notify: Callable[[Reply], Awaitable[None]],
        *,
        own_server: str = "",
        bot: str = "",
        submit: Callable[[list[NewAction]], Awaitable[None]] | None = None,
        command_prefix: str = "!policy",
        report_delay: float = 30.0,
        report_grace: float = 10.0,
        report_limit: int = 20,
        scheduler: Scheduler | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.store = store
        self._sleep = sleep  # the report timer's clock (tests drive it tick by tick)
        # Background bookkeeping runs as one-off tasks of the bridge's scheduler (alone, as
        # in tests, the enforcer has a scheduler of its own).
        self.scheduler = scheduler or Scheduler()
        self.rollout_rate = rollout_rate
        self.notify = notify
        self.own_server = own_server
        self.bot = bot  # whose power is read from room state (none: not read)
        self.submit = submit  # queues the one notice in a room it cannot enforce (none: not sent)
        self.command_prefix = command_prefix
        self.report_delay = report_delay
        self.report_grace = report_grace
        self.report_limit = report_limit
        #: room -> {user: membership} of members present (join, invite, knock).
        self.members: dict[str, dict[str, str]] = {}
        self._rollout: dict[str, Any] | None = None
        self._reported: set[int] = set()
        self._remaining = 0
        self._rollout_seen = 0.0  # monotonic time of the rollout's last result
        self._loaded = False
        self._dirty: set[str] = set()  # rooms whose members are not stored yet
        #: room -> {event type or "kick": lack}: the power the bot lacks there (from state).
        self.cannot: dict[str, dict[str, str]] = {}
        self._power_dirty: set[str] = set()
        self._noticed: dict[str, bool] = {}  # room -> told the room it cannot enforce
        self._tally = RolloutTally()
        self._counted: set[str] = set()  # rooms this process counted in the rollout
        self._told: dict[str, str] = {}  # room -> the lack last reported
        self._told_dirty: set[str] = set()
        self._lacks: dict[str, tuple[str, float]] = {}  # room -> (lack, since) to report
        self._flush_lock = asyncio.Lock()
        self._tasks: dict[str, asyncio.Task[None]] = {}

    # -- scheduling ---------------------------------------------------------------------

    def rollout(self, rooms: Iterable[str], reason: str) -> tuple[list[NewAction], dict[str, Any]]:
        """Reconciles for many rooms, spread at the rollout rate; and the rollout record."""
        rate = max(0.01, self.rollout_rate())
        rid = uuid.uuid4().hex[:12]
        now = time.time()
        out = [
            actions.reconcile(room, reason, rollout=rid, not_before=now + i / rate)
            for i, room in enumerate(sorted(rooms))
        ]
        record = {"id": rid, "total": len(out), "reason": reason, "started": now}
        return out, record

    def stage_rollout(self, rooms: Iterable[str], reason: str) -> StagedChange:
        """A rollout as a command commits it: the actions, the rollout record, and its
        start once committed."""
        actions, record = self.rollout(rooms, reason)
        return StagedChange(
            state={ROLLOUT_KEY: json.dumps(record)},
            actions=tuple(actions),
            after_commit=(lambda: self.start_rollout(record),),
        )

    def start_rollout(self, record: Mapping[str, Any]) -> None:
        """Called after the rollout's actions are committed."""
        self._rollout = dict(record)
        self._reported = set()
        self._remaining = int(record["total"])
        self._tally = RolloutTally()
        self._counted = set()

    async def load(self) -> None:
        """Read the rooms' members and reported lacks; resume reporting a rollout that was
        running before a restart."""
        await self._load_rooms()
        raw = await self.store.state.get(ROLLOUT_KEY)
        if raw:
            record = json.loads(raw)
            if record.get("finished"):
                return
            self._rollout = record
            self._reported = set(record.get("reported", []))
            self._remaining = await self._pending(record["id"])
            self._tally = RolloutTally.from_doc(record.get("tally"))
            self._counted = set()

    async def _pending(self, rollout_id: str) -> int:
        # payloads are sealed at rest: the store decrypts the pending reconciles to match
        return await self.store.actions.count(
            ActionKind.RECONCILE, "pending", {"rollout": rollout_id}
        )

    # -- results from the executor ------------------------------------------------------

    def _kept(self, user: str) -> bool:
        return not (self.own_server and server_name(user) == self.own_server)

    def on_state(self, room_id: str, state: list[dict[str, Any]]) -> None:
        """Remember the room's members from a full state read."""
        members = {
            ev["state_key"]: str(ev.get("content", {}).get("membership", ""))
            for ev in state
            if ev.get("type") == "m.room.member" and isinstance(ev.get("state_key"), str)
        }
        present = {u: m for u, m in members.items() if m in PRESENT and self._kept(u)}
        if self.bot:
            cannot = power_lacks(RoomState.from_events(state), self.bot)
            if self.cannot.get(room_id) != cannot:
                self.cannot[room_id] = cannot
                self._power_dirty.add(room_id)
                self._spawn("flush", self._flush_soon)
        if self.members.get(room_id) != present:
            self.members[room_id] = present
            self._changed(room_id)

    def note_member(self, room_id: str, user_id: str, membership: str) -> None:
        """A membership change seen on the event stream."""
        if not self._kept(user_id):
            return
        known = self.members.setdefault(room_id, {})
        if membership in PRESENT:
            if known.get(user_id) == membership:
                return
            known[user_id] = membership
        elif known.pop(user_id, None) is None:
            return
        self._changed(room_id)

    async def on_result(
        self, room_id: str, result: Mapping[str, Any], *, obtaining: bool = False
    ) -> None:
        """Record the room's enforcement state; report missing power and rollout progress.

        ``obtaining``: the bot lacked power and is obtaining it (make_room_admin and a second
        reconcile of the same rollout follow): the room's outcome is the second one's, and
        the room is not told it cannot be enforced.
        """
        if "error" in result:
            # Only a refused state read means the bot is not in the room; a refused kick or
            # state event means it is there without enough power.
            lack = str(result["error"])
            joined = False if "not allowed to read the room state" in lack else None
            await self.store.rooms.upsert(room_id, joined=joined, lacking=lack)
        else:
            problems = list(result.get("lacking", [])) + list(result.get("unkickable", []))
            lack = "; ".join(problems)
            await self.store.rooms.upsert(room_id, joined=True, lacking=lack)
        self._note_lack(room_id, lack)
        outcome = classify(result, room_id)
        if not obtaining and "error" not in result:
            await self._tell_room(room_id, _power_lacks_of(result))
        await self._flush_quietly()  # the members this reconcile read, a cleared lack
        payload = result.get("payload") or {}
        rid = payload.get("rollout")
        if self._rollout and rid == self._rollout.get("id") and not obtaining:
            self._tally.add(outcome)
            self._counted.add(room_id)
            await self._progress()

    async def _tell_room(self, room_id: str, lacking: list[str]) -> None:
        """Say once in the room that the bot cannot enforce the policy there (again only
        after a reconcile found the power sufficient in between)."""
        told = self._noticed.get(room_id, False)
        if bool(lacking) == told:
            return
        if lacking and self.submit is not None:
            await self.submit([actions.send_notice(room_id, room_notice(lacking))])
        elif lacking:
            return  # nobody to send it: try again at the next reconcile
        self._noticed[room_id] = bool(lacking)
        self._told_dirty.add(room_id)

    async def known_lacks(self, rooms: Iterable[str], event_type: str) -> dict[str, str]:
        """Of ``rooms``, those where the bot is known to lack the power to send
        ``event_type`` (or ``"kick"``), with the lack: from the power levels its last
        reconcile read, else from the stored enforcement state."""
        if not self._loaded:
            await self._load_rooms()
        stored = {r["room_id"]: str(r["lacking"] or "") for r in await self.store.rooms.known()}
        out: dict[str, str] = {}
        for room in rooms:
            known = self.cannot.get(room)
            if known is not None:
                if event_type in known:
                    out[room] = known[event_type]
                continue
            parts = [p for p in stored.get(room, "").split("; ") if f"to send {event_type}" in p]
            if parts:
                out[room] = parts[0]
        return out

    # -- persistence of members and reported lacks ---------------------------------------

    async def _load_rooms(self) -> None:
        """The stored members and reported lacks (what this process learnt since wins)."""
        data = await self.store.rooms.data()
        for room, fields in data.items():
            members = fields.get(MEMBERS_FIELD)
            if isinstance(members, dict):
                stored = {u: m for u, m in members.items() if m in PRESENT and self._kept(u)}
                if room in self._dirty:  # changes seen before the load go on top
                    stored.update(self.members.get(room, {}))
                    self.members[room] = stored
                elif room not in self.members or not self.members[room]:
                    self.members[room] = stored
            told = fields.get(REPORTED_FIELD)
            if isinstance(told, str) and room not in self._told:
                self._told[room] = told
            cannot = fields.get(POWER_FIELD)
            if isinstance(cannot, dict) and room not in self.cannot:
                self.cannot[room] = {str(k): str(v) for k, v in cannot.items()}
            noticed = fields.get(NOTICED_FIELD)
            if isinstance(noticed, bool) and room not in self._noticed:
                self._noticed[room] = noticed
        self._loaded = True

    def _changed(self, room_id: str) -> None:
        self._dirty.add(room_id)
        self._spawn("flush", self._flush_soon)

    def _spawn(self, name: str, fn: Callable[[], Awaitable[None]]) -> None:
        """Run ``fn`` in the background unless it already runs (needs a running loop)."""
        task = self._tasks.get(name)
        if task is not None and not task.done():
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # no loop (a synchronous caller): the next flush stores it
            return

        async def run() -> None:
            try:
                await fn()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("room bookkeeping (%s) failed; retried later", name, exc_info=True)

        task = self.scheduler.spawn(run(), f"room-{name}", TaskKind.ONE_OFF)
        if task is not None:
            self._tasks[name] = task

    async def _flush_soon(self) -> None:
        while self._dirty or self._told_dirty or self._power_dirty:
            await self.flush()

    async def flush(self) -> None:
        """Store the members and reported lacks changed since the last flush (one commit).

        Rooms the store does not know (the bot never joined them) are not stored.
        """
        async with self._flush_lock:
            members, told, power = self._dirty, self._told_dirty, self._power_dirty
            if not (members or told or power):
                return
            self._dirty, self._told_dirty, self._power_dirty = set(), set(), set()
            updates: dict[str, dict[str, Any]] = {}
            for room in members:
                updates.setdefault(room, {})[MEMBERS_FIELD] = dict(self.members.get(room, {}))
            for room in told:
                updates.setdefault(room, {})[REPORTED_FIELD] = self._told.get(room, "")
                updates[room][NOTICED_FIELD] = self._noticed.get(room, False)
            for room in power:
                updates.setdefault(room, {})[POWER_FIELD] = dict(self.cannot.get(room, {}))
            try:
                await self.store.rooms.update_data(updates)
            except BaseException:
                self._dirty |= members
                self._told_dirty |= told
                self._power_dirty |= power
                raise

    async def _flush_quietly(self) -> None:
        """:meth:`flush`; a failure is logged and the changes kept for the next flush."""
        try:
            await self.flush()
        except Exception:
            log.warning("storing room members and reported lacks failed", exc_info=True)

    async def close(self) -> None:
        """Stop background work and store what is pending (best effort)."""
        for task in self._tasks.values():
            task.cancel()
        for task in self._tasks.values():
            with contextlib.suppress(BaseException):
                await task
        self._tasks.clear()
        await self._flush_quietly()

    # -- missing power ------------------------------------------------------------------

    def _note_lack(self, room_id: str, lack: str) -> None:
        told = self._told.get(room_id, "")
        if lack == told:
            self._lacks.pop(room_id, None)
            return
        if not lack:
            # Fixed: forget it, so that the same lack coming back is reported again.
            self._lacks.pop(room_id, None)
            self._told[room_id] = ""
            self._told_dirty.add(room_id)
            return
        if self._lacks.get(room_id, ("",))[0] != lack:
            self._lacks[room_id] = (lack, time.monotonic())
        self._spawn("report", self._report_later)

    @property
    def pending_lacks(self) -> dict[str, str]:
        """Lacks seen but not reported yet, by room."""
        return {room: lack for room, (lack, _since) in self._lacks.items()}

    async def _report_later(self) -> None:
        """The batching timer: one notice per ``report_delay`` at most, none while a rollout
        is moving (its progress notices carry the reports)."""
        while self._lacks:
            await self._sleep(self.report_delay)
            moving = (
                self._rollout is not None
                and time.monotonic() - self._rollout_seen < self.report_delay
            )
            if not moving:
                await self.report_lacks()

    def _ripe(self, *, everything: bool = False) -> list[tuple[str, str]]:
        now = time.monotonic()
        return sorted(
            (room, lack)
            for room, (lack, since) in self._lacks.items()
            if everything or now - since >= self.report_grace
        )

    def _lacks_text(self, ripe: list[tuple[str, str]]) -> str:
        def cut(text: str) -> str:
            return text if len(text) <= LACK_TEXT_LIMIT else text[: LACK_TEXT_LIMIT - 1] + "…"

        lines = [f"⚠️ The bot lacks power to enforce the policy in {len(ripe)} room(s):"]
        lines += [f"• {room}: {cut(lack)}" for room, lack in ripe[: self.report_limit]]
        if len(ripe) > self.report_limit:
            lines.append(f"• … and {len(ripe) - self.report_limit} more room(s)")
        lines.append(
            f"`{self.command_prefix} rooms lacking` lists every such room. Give the bot the "
            "power level it needs, or let it obtain power (bridge.obtain_power with "
            "homeserver.admin_token)."
        )
        return "\n".join(lines)

    def _take_ripe(
        self, *, everything: bool = False, also: Iterable[str] = ()
    ) -> tuple[str, list[str]]:
        """The text reporting the lacks due now (and those of the rooms ``also``), and the
        rooms it reports."""
        ripe = self._ripe(everything=everything)
        extra = set(also) - {room for room, _ in ripe}
        ripe = sorted(ripe + [(r, lack) for r, (lack, _s) in self._lacks.items() if r in extra])
        if not ripe:
            return "", []
        return self._lacks_text(ripe), [room for room, _ in ripe]

    def _told_now(self, rooms: list[str]) -> None:
        for room in rooms:
            lack, _since = self._lacks.pop(room)
            self._told[room] = lack
            self._told_dirty.add(room)

    async def report_lacks(self, *, everything: bool = False) -> int:
        """Send one notice for the lacks due now (all pending with ``everything``);
        returns how many rooms it listed."""
        text, rooms = self._take_ripe(everything=everything)
        if not rooms:
            return 0
        await self.notify(Reply.plain(text))
        self._told_now(rooms)
        await self._flush_quietly()
        return len(rooms)

    async def _progress(self) -> None:
        assert self._rollout is not None
        self._rollout_seen = time.monotonic()
        self._remaining = max(0, self._remaining - 1)
        total = int(self._rollout["total"]) or 1
        done = total - self._remaining
        pct = int(done * 100 / total)
        reached = [m for m in (25, 50, 75, 100) if pct >= m and m not in self._reported]
        # The tally is kept with the record at every result, so a restart loses no count.
        self._rollout["tally"] = self._tally.to_doc()
        self._reported.update(reached)
        self._rollout["reported"] = sorted(self._reported)
        self._rollout["finished"] = pct >= 100
        await self.store.state.set(ROLLOUT_KEY, json.dumps(self._rollout))
        if reached:
            # One notice for the highest mark crossed (small rollouts cross several at once).
            mark = reached[-1]
            # The rooms where the bot lacks power go with the progress: one notice (the
            # final one names every room of the rollout that lacks power, grace or not).
            lacks, rooms = self._take_ripe(also=self._counted if mark >= 100 else ())
            text = rollout_text(
                str(self._rollout["reason"]), done, total, mark, self._tally, fix=not lacks
            )
            await self.notify(Reply.plain(f"{text}\n{lacks}" if lacks else text))
            if rooms:
                self._told_now(rooms)
                await self._flush_quietly()
        if pct >= 100:
            self._rollout = None

    # -- questions for commands ---------------------------------------------------------

    async def affected(
        self,
        current: Callable[[str], FederationPolicy],
        candidate: Callable[[str], FederationPolicy],
        own_server: str,
        rooms: Iterable[str] | None = None,
    ) -> Affected:
        """The members ``candidate`` would remove that ``current`` keeps, by room.

        ``rooms``: the rooms the change reaches (default: every room with known members).
        Counts come from the stored members (read once after a restart) kept up to date by
        reconciles and the event stream.
        """
        if not self._loaded:
            await self._load_rooms()
        wanted = set(self.members) if rooms is None else set(rooms)
        out: dict[str, tuple[str, ...]] = {}
        for room in sorted(wanted & set(self.members)):
            now, then = current(room), candidate(room)
            removed = tuple(
                sorted(
                    u
                    for u, m in self.members[room].items()
                    if m in PRESENT
                    and server_allowed(now, own_server, server_name(u))
                    and not server_allowed(then, own_server, server_name(u))
                )
            )
            if removed:
                out[room] = removed
        return Affected(out)
