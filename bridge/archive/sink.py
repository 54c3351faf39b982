"""Background writer for audit records produced on latency-critical paths (the gate).

The gate answers from memory; its decisions are queued here and committed in batches (one
commit for everything that arrived meanwhile). A caller that must know its record is durable
(the gate refusing an event) waits for the commit of its batch, bounded by a timeout. If the
database is unavailable, records wait (bounded) and are retried.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from bridge.store import AuditEntry, Store, StoreUnavailable

log = logging.getLogger(__name__)


class AuditSink:
    """Buffers :class:`AuditEntry` objects and appends them to the store in batches."""

    def __init__(self, store: Store, *, max_buffer: int = 100_000, batch: int = 500) -> None:
        self.store = store
        self.max_buffer = max_buffer
        self.batch = batch
        self._buffer: deque[tuple[AuditEntry, asyncio.Future[bool] | None]] = deque()
        self._wake = asyncio.Event()
        self.dropped = 0
        #: True from a failed flush (the store unavailable) until the next one succeeds.
        self.store_down = False

    def submit(self, entry: AuditEntry) -> None:
        """Queue a record; never blocks. Beyond ``max_buffer`` the oldest is dropped."""
        self._queue(entry, None)

    async def record(self, entry: AuditEntry, within: float) -> bool:
        """Queue a record and wait until it is committed; False if that took longer than
        ``within`` seconds (the record stays queued and is written later)."""
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._queue(entry, done)
        try:
            return await asyncio.wait_for(asyncio.shield(done), within)
        except TimeoutError:
            return False

    def _queue(self, entry: AuditEntry, done: asyncio.Future[bool] | None) -> None:
        if len(self._buffer) >= self.max_buffer:
            _, lost = self._buffer.popleft()
            if lost is not None and not lost.done():
                lost.set_result(False)
            self.dropped += 1
            if self.dropped in (1, 100) or self.dropped % 10_000 == 0:
                log.error("audit buffer full: %d gate records dropped so far", self.dropped)
        self._buffer.append((entry, done))
        self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._buffer)

    async def flush(self) -> None:
        """Write everything buffered now; raises StoreUnavailable (records are kept)."""
        while self._buffer:
            chunk = [self._buffer[i] for i in range(min(self.batch, len(self._buffer)))]
            await self.store.records.append([entry for entry, _ in chunk])
            for _ in chunk:
                self._buffer.popleft()
            for _, done in chunk:
                if done is not None and not done.done():
                    done.set_result(True)

    async def run(self) -> None:
        """Flush whenever records arrive, retrying with backoff while the store is down."""
        backoff = 0.5
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.flush()
                backoff = 0.5
                self.store_down = False
            except StoreUnavailable as e:
                self.store_down = True
                log.warning("audit records not yet written (%s); retrying in %.1fs", e, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30)
                self._wake.set()
