"""Counters for status and metrics."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from bridge.store.core import StoreCore
from bridge.store.models import StoreStats, now_ms
from bridge.store.schema import actions, records, rooms, transactions


class StatsMixin(StoreCore):
    """Cheap counters for status and metrics."""

    async def queue_state(self) -> tuple[int, float]:
        """(transactions waiting, age in seconds of the oldest): one indexed query."""
        async with self.engine.connect() as conn:
            return await self._queue_state(conn)

    @staticmethod
    async def _queue_state(conn: AsyncConnection) -> tuple[int, float]:
        depth, oldest = (
            await conn.execute(
                select(func.count(), func.min(transactions.c.received_ts)).where(
                    transactions.c.processed.is_(False)
                )
            )
        ).one()
        return int(depth), max(0.0, (now_ms() - oldest) / 1000) if oldest else 0.0

    async def stats(self) -> StoreStats:
        """Counters for status and metrics; cheap: index lookups, no scan of the records.

        The number of events is counted once (on first use) and then kept up to date in
        memory by the appends of this process.
        """
        async with self.engine.connect() as conn:
            if self._events is None:
                self._events = (
                    await conn.execute(select(func.count()).where(records.c.kind == "event"))
                ).scalar_one()
            events = self._events
            total = (await conn.execute(select(func.max(records.c.seq)))).scalar() or 0
            depth, lag = await self._queue_state(conn)
            by_status: dict[str, int] = dict(
                (
                    await conn.execute(
                        select(actions.c.status, func.count())
                        .where(actions.c.status.in_(("pending", "failed")))
                        .group_by(actions.c.status)
                    )
                ).all()
            )
            known = (await conn.execute(select(func.count()).select_from(rooms))).scalar_one()
        return StoreStats(
            events=events,
            records=total,
            queue_depth=depth,
            queue_lag_s=lag,
            actions_pending=by_status.get("pending", 0),
            actions_failed=by_status.get("failed", 0),
            rooms_known=known,
        )
