"""Room enforcement bookkeeping: what we know of rooms, rollouts of policy changes.

The executor's ``reconcile`` action does the work in a room (read state, plan, send ACL and
retention, kick); this module decides when to schedule it, remembers each room's members
(from reconciles and the event stream, in memory), records each room's enforcement state
(enforced, drifted, lacks power, not joined), and reports rollout progress.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from .commands.registry import Reply
from .policy.federation import FederationPolicy, server_allowed
from .policy.model import server_name
from .store import NewAction, Store

log = logging.getLogger(__name__)

DRIFTED = "drifted"
ROLLOUT_KEY = "rollout"


class RoomEnforcer:
    """Schedules reconciles and keeps per-room enforcement state."""

    def __init__(
        self,
        store: Store,
        rollout_rate: Callable[[], float],
        notify: Callable[[Reply], Awaitable[None]],
    ) -> None:
        self.store = store
        self.rollout_rate = rollout_rate
        self.notify = notify
        self.members: dict[str, dict[str, str]] = {}
        self._rollout: dict[str, Any] | None = None
        self._reported: set[int] = set()
        self._remaining = 0

    # -- scheduling ---------------------------------------------------------------------

    @staticmethod
    def reconcile(room_id: str, reason: str, **extra: Any) -> NewAction:
        """One reconcile action for one room, now."""
        return NewAction("reconcile", {"reason": reason, **extra}, room_id=room_id)

    def rollout(self, rooms: Iterable[str], reason: str) -> tuple[list[NewAction], dict[str, Any]]:
        """Reconciles for many rooms, spread at the rollout rate; and the rollout record."""
        rate = max(0.01, self.rollout_rate())
        rid = uuid.uuid4().hex[:12]
        now = time.time()
        out = [
            NewAction(
                "reconcile",
                {"reason": reason, "rollout": rid},
                room_id=room,
                not_before=now + i / rate,
            )
            for i, room in enumerate(sorted(rooms))
        ]
        record = {"id": rid, "total": len(out), "reason": reason, "started": now}
        return out, record

    def start_rollout(self, record: Mapping[str, Any]) -> None:
        """Called after the rollout's actions are committed."""
        self._rollout = dict(record)
        self._reported = set()
        self._remaining = int(record["total"])

    async def load(self) -> None:
        """Resume reporting a rollout that was running before a restart."""
        raw = await self.store.get_state(ROLLOUT_KEY)
        if raw:
            record = json.loads(raw)
            if record.get("finished"):
                return
            self._rollout = record
            self._reported = set(record.get("reported", []))
            self._remaining = await self._pending(record["id"])

    async def _pending(self, rollout_id: str) -> int:
        # payloads are sealed at rest: the store decrypts the pending reconciles to match
        return await self.store.count_actions("reconcile", "pending", {"rollout": rollout_id})

    # -- results from the executor ------------------------------------------------------

    def on_state(self, room_id: str, state: list[dict[str, Any]]) -> None:
        """Remember the room's members from a full state read."""
        self.members[room_id] = {
            ev["state_key"]: str(ev.get("content", {}).get("membership", ""))
            for ev in state
            if ev.get("type") == "m.room.member" and isinstance(ev.get("state_key"), str)
        }

    def note_member(self, room_id: str, user_id: str, membership: str) -> None:
        """A membership change seen on the event stream."""
        self.members.setdefault(room_id, {})[user_id] = membership

    async def on_result(self, room_id: str, result: Mapping[str, Any]) -> None:
        """Record the room's enforcement state; report rollout progress."""
        if "error" in result:
            # Only a refused state read means the bot is not in the room; a refused kick or
            # state event means it is there without enough power.
            joined = False if "not allowed to read the room state" in str(result["error"]) else None
            await self.store.upsert_room(room_id, joined=joined, lacking=str(result["error"]))
        else:
            problems = list(result.get("lacking", [])) + list(result.get("unkickable", []))
            await self.store.upsert_room(room_id, joined=True, lacking="; ".join(problems))
        payload = result.get("payload") or {}
        rid = payload.get("rollout")
        if self._rollout and rid == self._rollout.get("id"):
            await self._progress()

    async def _progress(self) -> None:
        assert self._rollout is not None
        self._remaining = max(0, self._remaining - 1)
        total = int(self._rollout["total"]) or 1
        done = total - self._remaining
        pct = int(done * 100 / total)
        reached = [m for m in (25, 50, 75, 100) if pct >= m and m not in self._reported]
        if reached:
            # One notice for the highest mark crossed (small rollouts cross several at once).
            mark = reached[-1]
            self._reported.update(reached)
            self._rollout["reported"] = sorted(self._reported)
            self._rollout["finished"] = pct >= 100
            await self.store.set_state(ROLLOUT_KEY, json.dumps(self._rollout))
            await self.notify(
                Reply.plain(
                    f"Policy rollout ({self._rollout['reason']}): {done} of {total} rooms "
                    f"processed ({mark}%)."
                )
            )
        if pct >= 100:
            self._rollout = None

    # -- questions for commands ---------------------------------------------------------

    def affected(
        self, policy_for: Callable[[str], FederationPolicy], own_server: str
    ) -> tuple[int, int, set[str]]:
        """Rooms and members a federation policy would remove, and their servers."""
        rooms = members = 0
        servers: set[str] = set()
        for room, users in self.members.items():
            policy = policy_for(room)
            out = [
                u
                for u, m in users.items()
                if m in ("join", "invite")
                and not server_allowed(policy, own_server, server_name(u))
            ]
            if out:
                rooms += 1
                members += len(out)
                servers.update(server_name(u) for u in out)
        return rooms, members, servers
