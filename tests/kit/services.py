"""The ``services`` object a Worker sees, as the tests build it (the bridge's is app.Bridge)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from bridge.pipeline.enforcement import RoomEnforcer
from bridge.pipeline.live_policy import LivePolicy
from bridge.scheduler import Scheduler
from bridge.store import Store


async def _quiet(_reply: Any) -> None:
    return None


class Services:
    """Store, config, live policy, management room, room enforcer and scheduler, nothing else."""

    def __init__(
        self,
        store: Store,
        config: Any,
        management_room: str,
        *,
        notify: Callable[[Any], Awaitable[None]] = _quiet,
        own_server: str = "",
    ) -> None:
        self.store = store
        self.config = config
        self.management_room = management_room
        self.policy = LivePolicy(config)
        self.policy.set_management_room(management_room)
        self.started_monotonic = time.monotonic()
        self.scheduler = Scheduler()
        self.rooms = RoomEnforcer(
            store, lambda: 1000.0, notify, own_server=own_server, scheduler=self.scheduler
        )
