"""Console sessions: created at login, looked up per request, ended by logout or timeout.

Stored through :class:`~bridge.store.console.ConsoleRepository` (hashed IDs, sealed user
IDs), so replicas behind one load balancer share them. The role is not stored: it is read
from ``bridge.permissions`` on every request, so taking a role away takes effect at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bridge.config import ConsoleConfig
from bridge.console.security import new_session_id
from bridge.store.console import ConsoleRepository

#: A session's "last seen" is written at most this often (ms): fewer writes, and the idle
#: timeout is exact to within this.
TOUCH_EVERY_MS = 15_000


@dataclass(frozen=True, slots=True)
class Session:
    """A live session: its ID (the cookie value) and whose it is."""

    id: str
    user_id: str
    created_ts: int


class SessionManager:
    """Sessions with idle and absolute timeouts (``console.session_idle``/``session_max``)."""

    def __init__(
        self,
        repo: ConsoleRepository,
        settings: Callable[[], ConsoleConfig],
        clock_ms: Callable[[], int],
    ) -> None:
        self.repo = repo
        self.settings = settings
        self.clock_ms = clock_ms

    async def create(self, user_id: str) -> Session:
        """A new session for ``user_id`` (a fresh random ID: no fixation)."""
        sid = new_session_id()
        now = self.clock_ms()
        await self.repo.create_session(sid, user_id, now)
        return Session(sid, user_id, now)

    async def lookup(self, session_id: str | None) -> Session | None:
        """The live session with this ID; an expired one is deleted and gives None."""
        if not session_id or len(session_id) > 128:
            return None
        row = await self.repo.session(session_id)
        if row is None:
            return None
        now = self.clock_ms()
        cfg = self.settings()
        if (
            now - row.seen_ts > cfg.session_idle_s * 1000
            or now - row.created_ts > cfg.session_max_s * 1000
        ):
            await self.repo.end_session(session_id)
            return None
        if now - row.seen_ts >= TOUCH_EVERY_MS:
            await self.repo.touch_session(session_id, now)
        return Session(session_id, row.user_id, row.created_ts)

    async def end(self, session_id: str) -> None:
        """Log out."""
        await self.repo.end_session(session_id)

    async def purge(self) -> int:
        """Delete every expired session; returns how many."""
        now = self.clock_ms()
        cfg = self.settings()
        return await self.repo.purge_sessions(
            int(now - cfg.session_idle_s * 1000), int(now - cfg.session_max_s * 1000)
        )
