"""Change notices between replicas: PostgreSQL LISTEN/NOTIFY on one channel.

A write that changes something every replica's gate reads (a runtime policy document, the
overrides, the management room, a config reload) publishes the name of what changed *in
its own transaction* (:func:`publish`): PostgreSQL delivers the notice on commit, to every
listening replica, including the writer. :class:`ChangeFeed` listens on a dedicated
connection (not the pool's) and calls back with each name. After the connection was lost
and made again, and every ``resync`` seconds in any case, it calls back with
:data:`EVERYTHING`: notices sent while nobody listened are gone, so the replica re-reads
all it caches.

On SQLite nothing is published (one process per database).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import asyncpg
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncConnection

from bridge.store.database import Backend

log = logging.getLogger(__name__)

CHANNEL = "bridge_changes"
#: How the listening connection names itself (``pg_stat_activity.application_name``).
APPLICATION_NAME = "policy-bridge-changes"
#: The callback argument meaning "anything may have changed: re-read it all".
EVERYTHING = "*"
_NOTIFY = text("SELECT pg_notify(:channel, :topic)")


async def publish(conn: AsyncConnection, backend: Backend, topic: str) -> None:
    """Announce ``topic`` to every replica when ``conn``'s transaction commits."""
    if backend is Backend.POSTGRESQL:
        await conn.execute(_NOTIFY, {"channel": CHANNEL, "topic": topic})


def asyncpg_dsn(url: URL) -> str:
    """The libpq-style DSN asyncpg takes, from a ``postgresql+asyncpg://`` URL."""
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


class ChangeFeed:
    """Listens for change notices and calls ``on_change(topic)`` for each (in order)."""

    def __init__(
        self,
        url: URL,
        on_change: Callable[[str], Awaitable[None]],
        *,
        resync: float = 30.0,
        check: float = 2.0,
    ) -> None:
        self._dsn = asyncpg_dsn(url)
        self._on_change = on_change
        self.resync = resync
        self.check = check
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        #: Whether the listening connection is up (for health and tests).
        self.listening = asyncio.Event()

    def _notice(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self._queue.put_nowait(payload)

    async def run(self) -> None:
        """Listen forever (reconnecting with backoff) and dispatch notices."""
        dispatcher = asyncio.create_task(self._dispatch(), name="change-dispatch")
        try:
            delay = 0.5
            while True:
                try:
                    await self._listen_once()
                    delay = 0.5
                except Exception as e:  # whatever the connection did: it must outlive it
                    log.warning("change feed lost (%s); reconnecting", e.__class__.__name__)
                self.listening.clear()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        finally:
            dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await dispatcher

    async def _listen_once(self) -> None:
        conn = await asyncio.wait_for(
            asyncpg.connect(self._dsn, server_settings={"application_name": APPLICATION_NAME}),
            10,
        )
        try:
            await conn.add_listener(CHANNEL, self._notice)
            self.listening.set()
            self._queue.put_nowait(EVERYTHING)  # whatever changed while not listening
            next_resync = time.monotonic() + self.resync
            while True:
                await asyncio.sleep(self.check)
                # a dead or stalled connection would deliver nothing: probe it
                await asyncio.wait_for(conn.fetchval("SELECT 1"), self.check * 2)
                if time.monotonic() >= next_resync:
                    self._queue.put_nowait(EVERYTHING)
                    next_resync = time.monotonic() + self.resync
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 2)

    async def _dispatch(self) -> None:
        while True:
            topic = await self._queue.get()
            pending = {topic}
            while not self._queue.empty():  # a burst: each topic once
                pending.add(self._queue.get_nowait())
            if EVERYTHING in pending:
                pending = {EVERYTHING}
            for t in sorted(pending):
                try:
                    await self._on_change(t)
                except Exception:
                    log.exception("applying a change notice failed; the next resync retries")
