"""The leader lease: which replica runs the worker, executor, sweepers and jobs.

Several ``bridge run`` processes (replicas) may share one PostgreSQL database. Every one
answers gate calls and appservice transactions; exactly one, the holder of the lease row
``bridge_lease`` (name ``leader``), runs the work that must happen once.

* **Acquire / renew** is one statement: take the row when it is free or expired, keep it
  when this replica holds it; the expiry is the database's clock plus ``ttl``. Each new
  holder gets the next ``epoch``.
* **Deposed before the next one starts.** A holder counts its term from *before* it sent
  the renewal (its own monotonic clock) and gives up ``margin`` seconds before the expiry
  it asked for, also when the renewal hangs (a stalled connection): its leader tasks are
  cancelled while the row still names it, and only after the expiry can another replica
  take the row.
* **Fenced writes.** Every transaction of a leader task starts with :meth:`Lease.fence`:
  it reads the row ``FOR SHARE`` and fails unless this replica still holds an unexpired
  lease of the same epoch. The share lock makes a successor's takeover wait for the
  commit, so a deposed leader's last commit is either entirely before the new term or
  rolled back: queue marks and action outcomes are neither lost nor doubled even if two
  leaders overlap in time.
* A process that dies simply stops renewing: the row expires after ``ttl`` and a
  follower, polling every ``poll`` seconds, takes over. A clean stop releases the row at
  once.

SQLite has no lease: one process per database (:mod:`.process_lock`), always the leader.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection

from bridge.store.database import SCHEMA_LOCK_KEY, Database, advisory_xact_lock
from bridge.store.models import StoreUnavailable

log = logging.getLogger(__name__)

LEADER = "leader"

_CREATE = text(
    "CREATE TABLE IF NOT EXISTS bridge_lease ("
    " name VARCHAR(64) PRIMARY KEY, holder VARCHAR(255) NOT NULL,"
    " epoch BIGINT NOT NULL, expires_at TIMESTAMPTZ NOT NULL)"
)
_ACQUIRE = text(
    "INSERT INTO bridge_lease AS l (name, holder, epoch, expires_at)"
    " VALUES (:name, :holder, 1, clock_timestamp() + make_interval(secs => :ttl))"
    " ON CONFLICT (name) DO UPDATE SET"
    "  holder = EXCLUDED.holder,"
    "  epoch = CASE WHEN l.holder = EXCLUDED.holder THEN l.epoch ELSE l.epoch + 1 END,"
    "  expires_at = EXCLUDED.expires_at"
    " WHERE l.holder = EXCLUDED.holder OR l.expires_at < clock_timestamp()"
    " RETURNING epoch"
)
_FENCE = text(
    "SELECT epoch FROM bridge_lease WHERE name = :name AND holder = :holder"
    " AND epoch = :epoch AND expires_at > clock_timestamp() FOR SHARE"
)
_RELEASE = text(
    "UPDATE bridge_lease SET expires_at = clock_timestamp() - interval '1 second'"
    " WHERE name = :name AND holder = :holder"
)
_HOLDER = text("SELECT holder, epoch FROM bridge_lease WHERE name = :name")


class Role(enum.StrEnum):
    """What a replica is right now."""

    LEADER = "leader"
    FOLLOWER = "follower"


class LeaseLost(StoreUnavailable):
    """A leader task's write was refused: this replica no longer holds the lease."""


@dataclass(frozen=True, slots=True)
class LeaseTiming:
    """``ttl``: how long a renewal keeps the lease; ``renew``: how often the holder
    renews; ``poll``: how often a follower tries to take it; ``margin``: how long before
    the expiry the holder gives up on its own. Takeover after a crash: at most
    ``ttl + poll`` seconds."""

    ttl: float = 6.0
    renew: float = 1.5
    poll: float = 1.0
    margin: float = 1.0


def replica_id() -> str:
    """A name for this process, unique per start (host, pid, random)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Lease:
    """The leader lease of one replica (see the module docstring)."""

    def __init__(
        self,
        db: Database,
        holder: str | None = None,
        timing: LeaseTiming = LeaseTiming(),
        name: str = LEADER,
    ) -> None:
        self.db = db
        self.holder = holder or replica_id()
        self.timing = timing
        self.name = name
        #: The epoch of the term this replica holds (None: not the leader).
        self.epoch: int | None = None
        self._valid_until = 0.0  # monotonic
        self._ready = False

    @property
    def role(self) -> Role:
        """Leader while the term is held and not past its own deadline."""
        if self.epoch is not None and time.monotonic() < self._valid_until:
            return Role.LEADER
        return Role.FOLLOWER

    async def setup(self) -> None:
        """Create the lease table if missing (PostgreSQL only; no data to migrate)."""
        if self._ready:
            return
        async with self.db.transaction() as conn:
            await advisory_xact_lock(conn, SCHEMA_LOCK_KEY)
            await conn.execute(_CREATE)
        self._ready = True

    async def try_acquire(self) -> bool:
        """Take or renew the lease once; True if this replica holds it afterwards."""
        await self.setup()
        started = time.monotonic()
        async with self.db.transaction() as conn:
            epoch = (
                await conn.execute(
                    _ACQUIRE, {"name": self.name, "holder": self.holder, "ttl": self.timing.ttl}
                )
            ).scalar()
        if epoch is None:
            self.epoch = None
            return False
        if self.epoch is not None and epoch != self.epoch:
            log.warning("lease epoch moved from %d to %d under this replica", self.epoch, epoch)
        self.epoch = int(epoch)
        self._valid_until = started + self.timing.ttl - self.timing.margin
        return True

    def remaining(self) -> float:
        """Seconds this replica may still act as leader (0 when a follower)."""
        return max(0.0, self._valid_until - time.monotonic()) if self.epoch is not None else 0.0

    async def fence(self, conn: AsyncConnection) -> None:
        """Refuse (raise :class:`LeaseLost`) a leader write unless the lease is still ours;
        holds a share lock on the row until ``conn`` commits, so no successor starts its
        term in between."""
        epoch = self.epoch
        if epoch is None or self.role is not Role.LEADER:
            raise LeaseLost("this replica is not the leader")
        row = (
            await conn.execute(_FENCE, {"name": self.name, "holder": self.holder, "epoch": epoch})
        ).first()
        if row is None:
            self.epoch = None
            raise LeaseLost("the leader lease was taken over")

    async def release(self) -> None:
        """Let the lease go now (a clean stop: a follower takes over at its next poll)."""
        if self.epoch is None:
            return
        self.epoch = None
        with contextlib.suppress(SQLAlchemyError, OSError):
            async with self.db.transaction() as conn:
                await conn.execute(_RELEASE, {"name": self.name, "holder": self.holder})

    async def current_holder(self) -> tuple[str, int] | None:
        """(holder, epoch) as stored, or None if nobody ever held the lease."""
        await self.setup()
        async with self.db.connect() as conn:
            row = (await conn.execute(_HOLDER, {"name": self.name})).first()
        return None if row is None else (str(row[0]), int(row[1]))

    async def run(
        self,
        on_elected: Callable[[int], Awaitable[None]],
        on_deposed: Callable[[], Awaitable[None]],
    ) -> None:
        """Hold or wait for the lease forever; ``on_elected(epoch)`` when this replica
        becomes the leader, ``on_deposed()`` (awaited: the leader tasks stop) when its term
        ends, before the expiry it was granted."""
        leading = False
        while True:
            pause = self.timing.poll
            budget = self.remaining() if leading else self.timing.ttl
            try:
                held = await asyncio.wait_for(self.try_acquire(), max(0.05, budget))
            except Exception as e:  # the database away or stalled: the term runs out
                held = False
                if leading:
                    log.warning("cannot renew the leader lease: %s", e.__class__.__name__)
            if held and self.remaining() > 0:
                pause = self.timing.renew
                if not leading:
                    leading = True
                    log.info("this replica is the leader (epoch %s)", self.epoch)
                    await on_elected(self.epoch or 0)
            elif leading and self.remaining() <= 0:
                leading = False
                self.epoch = None
                log.warning("this replica lost the leader lease; stopping its leader tasks")
                await on_deposed()
            elif not held and leading:
                # renewal failed but the term still runs: retry soon, give up at its end
                pause = min(self.timing.poll, self.remaining())
                if pause <= 0:
                    continue
            await asyncio.sleep(pause)
