"""The one scheduler of the bridge's background tasks.

Every background task of a running bridge is started through one :class:`Scheduler`:

* a *critical* task (the worker, the executor, the sweeper, the audit sink, ...) that dies
  stops the bridge with exit code 1, so a supervisor restarts it;
* a *one-off* task (a reload, auto-enrolment, a ping, a management-room notice, a
  retroactive scan, room bookkeeping) that fails is logged and the bridge carries on;
* :meth:`Scheduler.stop` cancels everything still running and waits for it, bounded.

Replicas (several processes on one PostgreSQL database): the work that must run once (the
worker, executor, sweepers, jobs) is started with :meth:`Scheduler.spawn_leader` when this
replica becomes the leader, and :meth:`Scheduler.stop_leader` cancels it, and every task
those tasks spawned, when its term ends. Code running in such a task sees
:func:`in_leader_task` true: the store fences its writes with the lease.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import logging
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger(__name__)

_LEADER_TASK: contextvars.ContextVar[bool] = contextvars.ContextVar("leader_task", default=False)


def in_leader_task() -> bool:
    """Whether the running code belongs to the leader's work (:meth:`Scheduler.spawn_leader`)."""
    return _LEADER_TASK.get()


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
        self._leader: set[asyncio.Task[Any]] = set()
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
        if in_leader_task():  # spawned by leader work: ends with the term
            self._leader.add(task)
            task.add_done_callback(self._leader.discard)
        task.add_done_callback(self._critical_done if kind is TaskKind.CRITICAL else self._done)
        return task

    def spawn_leader(
        self,
        coro: Coroutine[Any, Any, Any],
        name: str,
        kind: TaskKind = TaskKind.CRITICAL,
    ) -> asyncio.Task[Any] | None:
        """:meth:`spawn` a task of the leader's work (cancelled by :meth:`stop_leader`)."""
        if self._stopping:
            coro.close()
            return None
        context = contextvars.copy_context()
        context.run(_LEADER_TASK.set, True)
        task = asyncio.get_running_loop().create_task(coro, name=name, context=context)
        self._tasks.add(task)
        self._leader.add(task)
        task.add_done_callback(self._leader.discard)
        task.add_done_callback(self._critical_done if kind is TaskKind.CRITICAL else self._done)
        return task

    @property
    def leader_tasks(self) -> list[asyncio.Task[Any]]:
        """The leader's tasks still running."""
        return [t for t in self._leader if not t.done()]

    async def stop_leader(self, limit_s: float) -> None:
        """Cancel the leader's work (its term ended) and wait up to ``limit_s`` seconds."""
        tasks = self.leader_tasks
        for task in tasks:
            task.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=limit_s)
            if pending:
                log.warning("%d leader task(s) did not stop within %ss", len(pending), limit_s)

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
