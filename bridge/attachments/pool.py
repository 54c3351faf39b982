"""Extraction in separate processes, each call bounded by a wall-clock timeout, each
process by an address-space limit (``RLIMIT_AS``).

A hostile file can make a parser loop, recurse or allocate without end; none of that may
reach the bridge's event loop or its memory. Each worker is a ``spawn``-ed process (no copy
of the bridge's state, threads or sockets) that takes one file at a time over a pipe. A
call that overruns its timeout gets its worker killed and replaced; a worker that dies
(the kernel's OOM killer, a crash in a native library) is replaced too. Either way the
call answers with a :class:`~bridge.attachments.kinds.Unreadable.LIMIT` extraction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import resource
import time
from multiprocessing import reduction
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from bridge.attachments.extract import Extraction, extract
from bridge.attachments.kinds import FileType, Unreadable
from bridge.attachments.limits import Limits

log = logging.getLogger(__name__)

_CTX = multiprocessing.get_context("spawn")
#: Seconds :meth:`ExtractionPool.start` waits for a new worker's first answer.
WARM_UP_S = 60.0


#: Files at least this large go to the worker in a memory file (its descriptor passed over
#: the socket), not through the pipe: one copy in, one out, and no back-and-forth of
#: socket-buffer-sized writes between the two processes (≈ 2 ms less for 1 MB here).
MEMFD_MIN_BYTES = 64 * 1024
_MEMFD = hasattr(os, "memfd_create")
_INLINE, _MEMFILE = "inline", "memfile"


def _send_file(conn: Connection, data: bytes, limits: Limits, pid: int) -> None:
    """Send one job: small files (or without memfd) pickled, others as a memory file."""
    if not _MEMFD or len(data) < MEMFD_MIN_BYTES:
        conn.send((_INLINE, data, limits))
        return
    fd = os.memfd_create("attachment", os.MFD_CLOEXEC)
    try:
        with open(fd, "wb", closefd=False) as f:
            f.write(data)
        conn.send((_MEMFILE, len(data), limits))
        reduction.send_handle(conn, fd, pid)
    finally:
        os.close(fd)


def _receive_file(conn: Connection) -> tuple[bytes, Limits]:
    """The worker's side of :func:`_send_file`."""
    how, payload, limits = conn.recv()
    if how == _INLINE:
        return payload, limits
    fd = reduction.recv_handle(conn)
    try:
        with open(fd, "rb", closefd=False) as f:
            f.seek(0)  # the descriptor shares the sender's offset, which is at the end
            return f.read(payload), limits
    finally:
        os.close(fd)


def _serve(conn: Connection, memory_bytes: int) -> None:
    """A worker's loop: (data, limits) in, Extraction out, until the pipe closes."""
    if memory_bytes > 0:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    # A native reader (PDFium) aborts when an allocation fails: no core file of that size.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    while True:
        try:
            data, limits = _receive_file(conn)
        except (EOFError, OSError):
            return
        try:
            result = extract(data, limits)
        except MemoryError:
            result = Extraction(FileType.UNKNOWN, reason=Unreadable.LIMIT, detail="memory limit")
        except RecursionError:
            result = Extraction(FileType.UNKNOWN, reason=Unreadable.LIMIT, detail="nested deeply")
        except Exception as e:  # a reader's bug must not end the worker
            result = Extraction(
                FileType.UNKNOWN, reason=Unreadable.MALFORMED, detail=e.__class__.__name__
            )
        del data
        try:
            conn.send(result)
        except (OSError, MemoryError):
            return


class _Worker:
    def __init__(self, memory_bytes: int) -> None:
        self.conn, child = _CTX.Pipe()
        self.process: BaseProcess = _CTX.Process(
            target=_serve, args=(child, memory_bytes), daemon=True, name="attachment-extract"
        )
        self.process.start()
        child.close()

    def call(self, data: bytes, limits: Limits) -> Extraction | None:
        """Extract in this worker; None when it overran ``limits.timeout_s`` or died."""
        try:
            pid = self.process.pid
            assert pid is not None
            _send_file(self.conn, data, limits, pid)
            if self.conn.poll(limits.timeout_s):
                result = self.conn.recv()
                if isinstance(result, Extraction):
                    return result
        except (EOFError, OSError):
            pass
        return None

    def kill(self) -> None:
        self.process.kill()
        self.process.join(5)
        with contextlib.suppress(OSError):
            self.conn.close()


class ExtractionPool:
    """``size`` worker processes; :meth:`extract` waits for a free one."""

    def __init__(self, size: int, memory_bytes: int) -> None:
        self.size = size
        self.memory_bytes = memory_bytes
        self._idle: asyncio.Queue[_Worker] | None = None
        self._all: list[_Worker] = []
        self.replaced = 0

    def _ready(self) -> _Worker:
        worker = self._start()
        if worker.call(b"", Limits(timeout_s=WARM_UP_S)) is None:
            # Its late answer must never be taken for the next file's: start another.
            log.warning("an attachment extraction worker did not start in %g s", WARM_UP_S)
            return self._replace(worker)
        return worker

    def _start(self) -> _Worker:
        worker = _Worker(self.memory_bytes)
        self._all.append(worker)
        return worker

    async def start(self) -> None:
        """Start the workers and wait until each has answered an empty file (in threads:
        a spawned worker imports the readers, 0.5-2.5 s here), so the first upload after
        the bridge starts does not wait for that."""
        if self._idle is not None:
            return
        idle: asyncio.Queue[_Worker] = asyncio.Queue()
        workers = await asyncio.gather(*(asyncio.to_thread(self._ready) for _ in range(self.size)))
        for w in workers:
            idle.put_nowait(w)
        self._idle = idle

    async def extract(self, data: bytes, limits: Limits) -> tuple[Extraction, float]:
        """Read ``data`` within ``limits``; returns the extraction and the seconds it took."""
        if self._idle is None:
            await self.start()
        assert self._idle is not None
        worker = await self._idle.get()
        started = time.perf_counter()
        try:
            result = await asyncio.to_thread(worker.call, data, limits)
        except BaseException:  # cancelled: the worker may still be busy with this file
            self._idle.put_nowait(await asyncio.to_thread(self._replace, worker))
            raise
        elapsed = time.perf_counter() - started
        if result is None:
            dead = not worker.process.is_alive()
            worker = await asyncio.to_thread(self._replace, worker)
            self._idle.put_nowait(worker)
            detail = (
                "extraction ran out of memory"
                if dead
                else f"extraction took longer than {limits.timeout_s:g} s"
            )
            return Extraction(FileType.UNKNOWN, reason=Unreadable.LIMIT, detail=detail), elapsed
        self._idle.put_nowait(worker)
        return result, elapsed

    def _replace(self, worker: _Worker) -> _Worker:
        worker.kill()
        self._all.remove(worker)
        self.replaced += 1
        log.warning("attachment extraction worker replaced (overran its bounds)")
        return self._start()

    def close(self) -> None:
        """Stop every worker."""
        for worker in self._all:
            worker.kill()
        self._all.clear()
        self._idle = None
