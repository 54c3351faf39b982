"""What a replica re-reads when another one changed something its gate uses.

Every replica answers gate calls, so each keeps in memory what the gate reads: the live
policy (runtime documents set by commands, the room→spaces map), the override grants, the
management room (exempt from DLP), the config. The leader changes them (commands run in
its worker); the store publishes a change notice in the same commit for the state keys
:func:`broadcast_key` names (:mod:`bridge.store.changes`), and :class:`ReplicaSync`
applies each notice by re-reading just that. A config reload is announced as
:data:`CONFIG_TOPIC`; every replica then re-reads its own config file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sqlalchemy.exc import SQLAlchemyError

from bridge.pipeline.live_policy import (
    SECTIONS,
    SPACES_KEY,
    LivePolicy,
    runtime_key,
    stored_room_spaces,
)
from bridge.pipeline.management import MANAGEMENT_ROOM_KEY
from bridge.policy.overrides import OverrideBook
from bridge.store import Store, StoreUnavailable
from bridge.store.changes import EVERYTHING
from bridge.store.notice_rooms import OVERRIDES_KEY

log = logging.getLogger(__name__)

#: The change notice of a config reload (not a state key).
CONFIG_TOPIC = "config.reload"
#: "New work is queued": a follower stored a transaction or queued an action, and the
#: leader's worker and executor should look now rather than at their next poll.
WAKE_TOPIC = "leader.wake"
_POLICY_KEYS = frozenset({runtime_key(s) for s in SECTIONS} | {SPACES_KEY})


def broadcast_key(key: str) -> bool:
    """Whether a write of state ``key`` must reach every replica's gate."""
    return key in _POLICY_KEYS or key in (OVERRIDES_KEY, MANAGEMENT_ROOM_KEY)


@dataclass(frozen=True, slots=True)
class ReplicaHooks:
    """What :class:`ReplicaSync` changes in the running bridge."""

    policy: Callable[[], LivePolicy]
    overrides: OverrideBook
    set_management_room: Callable[[str], None]
    reload_config: Callable[[], Awaitable[object]]
    wake: Callable[[], None]


class ReplicaSync:
    """Applies change notices (and the periodic re-read) to this replica."""

    def __init__(self, store: Store, hooks: ReplicaHooks, configured_room: str = "") -> None:
        self.store = store
        self.hooks = hooks
        self.configured_room = configured_room
        #: How many notices were applied (for tests and the health summary).
        self.applied = 0

    async def on_change(self, topic: str) -> None:
        """Re-read what ``topic`` names (:data:`EVERYTHING`: all of it)."""
        everything = topic == EVERYTHING
        if everything or topic in _POLICY_KEYS:
            await self.refresh_policy()
        if everything or topic == OVERRIDES_KEY:
            self.hooks.overrides.merge(await self.store.state.get(OVERRIDES_KEY))
        if (everything or topic == MANAGEMENT_ROOM_KEY) and not self.configured_room:
            room = await self.store.state.get(MANAGEMENT_ROOM_KEY)
            if room:
                self.hooks.set_management_room(room)
        if topic == CONFIG_TOPIC:
            await self.hooks.reload_config()
        if everything or topic == WAKE_TOPIC:
            self.hooks.wake()
        self.applied += 1

    async def refresh_policy(self) -> None:
        """Rebuild the engine if the stored runtime documents or space links differ."""
        keys = [runtime_key(s) for s in SECTIONS]
        stored = await self.store.state.get_many([*keys, SPACES_KEY])
        runtime = {s: LivePolicy.decode(stored.get(runtime_key(s))) for s in SECTIONS}
        spaces = stored_room_spaces(stored.get(SPACES_KEY))
        try:
            if self.hooks.policy().replace(runtime, spaces):
                log.info("policy changed by another replica: engine rebuilt")
        except ValueError as e:
            log.error("the runtime rules in the database are invalid, not applied: %s", e)


class LeaderWaker:
    """Coalesces a follower's "new work" pokes into few :data:`WAKE_TOPIC` notices: one
    in flight at a time, and one more after it if poked meanwhile."""

    def __init__(self, announce: Callable[[], Awaitable[None]]) -> None:
        self._announce = announce
        self._task: asyncio.Task[None] | None = None
        self._again = False

    def poke(self) -> None:
        """Ask for a notice (returns at once)."""
        if self._task is not None and not self._task.done():
            self._again = True
            return
        self._task = asyncio.get_running_loop().create_task(self._run(), name="leader-wake")

    async def _run(self) -> None:
        while True:
            self._again = False
            try:
                await self._announce()
            except (StoreUnavailable, SQLAlchemyError, OSError) as e:
                log.debug("could not wake the leader: %s", e.__class__.__name__)
            if not self._again:
                return

    async def close(self) -> None:
        """Wait for a notice in flight (bounded by the caller)."""
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task
