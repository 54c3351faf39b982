"""Ask Synapse to redeliver at once what we refused while the database was down.

When the store is unavailable the appservice answers transactions with 503 and Synapse
keeps them, retrying with an exponential backoff that grows to 8.5 minutes. Waiting for that
leaves the archive and the DLP worker minutes behind after a short outage. Instead, once a
transaction was refused, this task watches the database and, as soon as it answers again,
sends the appservice ping, which makes Synapse retry its queued transactions immediately.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


class RedeliveryNudger:
    """Pings the homeserver once the database is back after a refused transaction.

    ``reachable`` probes the database; ``ping`` asks the homeserver to retry its queue and
    raises when that did not work (it should already repeat transient failures itself).
    """

    def __init__(
        self,
        reachable: Callable[[], Awaitable[bool]],
        ping: Callable[[], Awaitable[object]],
        probe_interval: float = 2.0,
        max_gap: float = 300.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._reachable = reachable
        self._ping = ping
        self._probe_interval = probe_interval
        self._max_gap = max_gap
        self._sleep = sleep
        self._refused = asyncio.Event()
        #: How many times the homeserver was asked to redeliver (for tests and status).
        self.nudges = 0

    def refused(self) -> None:
        """Note that a transaction was just refused because the store was unavailable."""
        self._refused.set()

    async def _until_reachable(self) -> None:
        while True:  # a poll: nothing tells us when a database server comes back
            if await self._reachable():
                return
            await self._sleep(self._probe_interval)

    async def run(self) -> None:
        """Serve forever: after each refusal, wait for the database, then ping once."""
        gap = self._probe_interval
        while True:
            await self._refused.wait()
            await self._until_reachable()
            # Refusals up to here are covered by the ping below: Synapse retries its oldest
            # queued transaction first and then every later one.
            self._refused.clear()
            try:
                await self._ping()
            except Exception as e:  # best effort: Synapse's own backoff still delivers
                log.warning("could not ask the homeserver to redeliver: %r", e)
            else:
                self.nudges += 1
                log.info("database is back: asked the homeserver to redeliver refused transactions")
            # Refused again right after the ping: the database answers but still fails writes.
            # Space the pings out so we do not drive Synapse's retries in a tight loop.
            await self._sleep(gap)
            gap = min(gap * 2, self._max_gap) if self._refused.is_set() else self._probe_interval
