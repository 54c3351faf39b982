"""The appservice ping: asks Synapse to call the bridge back.

At start it proves the registration works and makes Synapse replay the transactions it
queued while the bridge was down now, not after its backoff. A transient failure (Synapse
could not reach us yet, or the ping raced its own retry) is repeated in the background so
startup does not wait for it.
"""

from __future__ import annotations

import asyncio
import logging
import time

from mautrix.client import ClientAPI
from mautrix.errors import MatrixRequestError

from bridge.matrix import PING_RETRY_DELAYS, ping_homeserver, ping_is_transient, ping_until_reached
from bridge.scheduler import Scheduler, TaskKind

log = logging.getLogger(__name__)


class AppservicePing:
    """Pings the homeserver as appservice ``appservice_id``; ``address`` is the URL the
    registration gives Synapse (named when the ping fails)."""

    def __init__(
        self, client: ClientAPI, appservice_id: str, address: str, scheduler: Scheduler
    ) -> None:
        self.client = client
        self.appservice_id = appservice_id
        self.address = address
        self.scheduler = scheduler

    async def once(self) -> int:
        """One ping; returns the round trip in ms (raises MatrixRequestError)."""
        return await ping_homeserver(self.client, self.appservice_id, f"ping-{time.time_ns()}")

    async def until_reached(self) -> tuple[int, int]:
        """Ping, repeating transient failures; returns (round trip in ms, failed attempts)."""
        return await ping_until_reached(self.once)

    def _failed(self, e: MatrixRequestError) -> None:
        log.error(
            "appservice ping failed (%s: %s): check that the registration's url (%s) "
            "reaches this bridge and the tokens match",
            e.errcode,
            e.message,
            self.address,
        )

    async def at_startup(self) -> None:
        """Ping once; a transient failure is repeated in the background (never raises
        MatrixRequestError: failures are logged)."""
        try:
            rtt = await self.once()
        except MatrixRequestError as e:
            if not ping_is_transient(e):
                self._failed(e)
                return
            log.info("appservice ping failed (%s); retrying in the background", e.errcode)
        else:
            log.info("homeserver reached the bridge through the appservice ping (%d ms)", rtt)
            return
        self.scheduler.spawn(self._keep_pinging(), "appservice-ping", TaskKind.ONE_OFF)

    async def _keep_pinging(self) -> None:
        await asyncio.sleep(PING_RETRY_DELAYS[0])
        try:
            rtt, attempts = await ping_until_reached(self.once, PING_RETRY_DELAYS[1:])
        except MatrixRequestError as e:
            self._failed(e)
        except Exception as e:  # best effort: Synapse's own backoff still delivers
            log.warning("appservice ping gave up: %r", e)
        else:
            log.info(
                "homeserver reached the bridge through the appservice ping (%d ms, attempt %d)",
                rtt,
                attempts + 1,
            )
