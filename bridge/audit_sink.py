"""Background writer for audit records produced on latency-critical paths (the gate).

The gate must answer from memory; its decisions are queued here and committed in batches.
If the database is unavailable, records wait (bounded) and are retried.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from .store import AuditEntry, Store, StoreUnavailable

log = logging.getLogger(__name__)


class AuditSink:
    """Buffers :class:`AuditEntry` objects and appends them to the store in batches."""

    def __init__(self, store: Store, *, max_buffer: int = 100_000, batch: int = 500) -> None:
        self.store = store
        self.max_buffer = max_buffer
        self.batch = batch
        self._buffer: deque[AuditEntry] = deque()
        self._wake = asyncio.Event()
        self.dropped = 0

    def submit(self, entry: AuditEntry) -> None:
        """Queue a record; never blocks. Beyond ``max_buffer`` the oldest is dropped."""
        if len(self._buffer) >= self.max_buffer:
            self._buffer.popleft()
            self.dropped += 1
            if self.dropped in (1, 100) or self.dropped % 10_000 == 0:
                log.error("audit buffer full: %d gate records dropped so far", self.dropped)
        self._buffer.append(entry)
        self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._buffer)

    async def flush(self) -> None:
        """Write everything buffered now; raises StoreUnavailable (records are kept)."""
        while self._buffer:
            chunk = [self._buffer[i] for i in range(min(self.batch, len(self._buffer)))]
            await self.store.append(chunk)
            for _ in chunk:
                self._buffer.popleft()

    async def run(self) -> None:
        """Flush whenever records arrive, retrying with backoff while the store is down."""
        backoff = 0.5
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.flush()
                backoff = 0.5
            except StoreUnavailable as e:
                log.warning("audit records not yet written (%s); retrying in %.1fs", e, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30)
                self._wake.set()
