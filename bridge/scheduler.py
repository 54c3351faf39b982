"""The one scheduler of the bridge's background tasks.

Every background task of a running bridge is started through one :class:`Scheduler`:

* a *critical* task (the worker, the executor, the sweeper, the audit sink, ...) that dies
  stops the bridge with exit code 1, so a supervisor restarts it;
* a *one-off* task (a reload, auto-enrolment, a ping, a management-room notice, a
  retroactive scan, room bookkeeping) that fails is logged and the bridge carries on;
* :meth:`Scheduler.stop` cancels everything still running and waits for it, bounded.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger(__name__)


class TaskKind(enum.Enum):
    """What the death of a background task means."""

    CRITICAL = "critical"  # its death stops the bridge (exit code 1)
    ONE_OFF = "one-off"  # its failure is logged; the bridge carries on


class Scheduler:
    """The single owner of the bridge's background tasks.

    ``on_critical_death(name, exc)`` is called when a critical task raised (not when it was
    cancelled). After :meth:`stop` has begun, nothing new is started.
    """

    def __init__(self, on_critical_death: Callable[[str, BaseException], None] | None = None):
        self._on_critical_death = on_critical_death
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = False

    @property
    def running(self) -> list[asyncio.Task[Any]]:
        """The tasks not finished yet."""
        return [t for t in self._tasks if not t.done()]

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` has begun."""
        return self._stopping

    def spawn(
        self,
        coro: Coroutine[Any, Any, Any],
        name: str,
        kind: TaskKind = TaskKind.CRITICAL,
    ) -> asyncio.Task[Any] | None:
        """Run ``coro`` in the background until it ends or :meth:`stop`.

        Needs a running event loop. Returns the task, or None when the scheduler is stopping
        (the coroutine is then closed unstarted).
        """
        if self._stopping:
            coro.close()
            log.debug("not starting %s: shutting down", name)
            return None
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._critical_done if kind is TaskKind.CRITICAL else self._done)
        return task

    def _critical_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("background task %s died: %r", task.get_name(), exc, exc_info=exc)
            if self._on_critical_death is not None:
                self._on_critical_death(task.get_name(), exc)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("%s failed: %r", task.get_name(), exc, exc_info=exc)

    async def wait(self, name: str | None = None) -> None:
        """Wait until no task (named ``name``, if given) runs any more (for tests)."""
        while todo := [t for t in self.running if name is None or t.get_name() == name]:
            await asyncio.wait(todo)

    async def stop(self, limit_s: float) -> None:
        """Refuse new tasks, cancel every running one and wait up to ``limit_s`` seconds."""
        self._stopping = True
        tasks = self.running
        for task in tasks:
            task.cancel()
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=limit_s)
        if pending:
            log.warning(
                "%d background task(s) did not stop within %ss: %s",
                len(pending),
                limit_s,
                ", ".join(sorted(t.get_name() for t in pending)),
            )
