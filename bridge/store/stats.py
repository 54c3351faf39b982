"""Counters for status and metrics."""

from __future__ import annotations

from sqlalchemy import func, select

from bridge.audit.kinds import AuditKind
from bridge.store.database import Database
from bridge.store.models import StoreStats
from bridge.store.queue import WorkQueue
from bridge.store.records import RecordLog
from bridge.store.schema import actions, records, rooms


class StatsQueries:
    """Cheap counters for status and metrics."""

    def __init__(self, db: Database, records: RecordLog) -> None:
        self.db = db
        self.records = records

    async def snapshot(self) -> StoreStats:
        """Counters for status and metrics; cheap: index lookups, no scan of the records.

        The number of events is counted once (on first use) and then kept up to date in
        memory by the appends of this process.
        """
        log = self.records
        async with self.db.connect() as conn:
            if log.events is None:
                log.events = (
                    await conn.execute(
                        select(func.count()).where(records.c.kind == AuditKind.EVENT)
                    )
                ).scalar_one()
            events = log.events
            total = (await conn.execute(select(func.max(records.c.seq)))).scalar() or 0
            depth, lag = await WorkQueue.backlog_in(conn)
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
