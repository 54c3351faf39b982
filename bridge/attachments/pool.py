"""Extraction in separate processes, each call bounded by a wall-clock timeout, each
process by an address-space limit (``RLIMIT_AS``).

A hostile file can make a parser loop, recurse or allocate without end; none of that may
reach the bridge's event loop or its memory. Each worker is a ``spawn``-ed process (no copy
of the bridge's state, threads or sockets) that takes one file at a time over a pipe. A
call that overruns its timeout gets its worker killed and replaced; a worker that dies
(the kernel's OOM killer, a crash in a native library) is replaced too. Either way the
call answers with a :class:`~bridge.attachments.kinds.Unreadable.LIMIT` extraction.

A long PDF is read by several workers at once when they are idle (PDFium's text layout of
each page is the cost, and it is single threaded): the bridge's process decides from cheap
facts only (what :func:`~bridge.attachments.sniff.is_pdf` says of the first KiB, the size,
how many workers are free with no other file waiting for one; nothing is parsed here), each
worker reads its share of the pages (:class:`~bridge.attachments.pdf.Part`) within the same
bounds of time, memory and text as for a whole file, and
:func:`~bridge.attachments.extract.merge_parts` answers what one worker would have.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import resource
import time
from dataclasses import dataclass
from multiprocessing import reduction
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from bridge.attachments.extract import Extraction, extract, extract_part, merge_parts
from bridge.attachments.kinds import FileType, Unreadable
from bridge.attachments.limits import Limits
from bridge.attachments.pdf import Part
from bridge.attachments.sniff import is_pdf

log = logging.getLogger(__name__)

_CTX = multiprocessing.get_context("spawn")
#: Seconds :meth:`ExtractionPool.start` waits for a new worker's first answer.
WARM_UP_S = 60.0


#: Files at least this large go to the workers in a memory file (its descriptor passed over
#: the socket, written once however many workers read it), not through the pipe: one copy
#: in, one out, and no back-and-forth of socket-buffer-sized writes between the two
#: processes (≈ 2 ms less for 1 MB here). A file of Synapse's media store goes the same
#: way, by its own descriptor (:class:`FileRef`): not even read in the bridge's process.
MEMFD_MIN_BYTES = 64 * 1024
_MEMFD = hasattr(os, "memfd_create")

#: A PDF at least this large may be read by several workers at once, each part at least
#: half of this much of the file (so from this size in two parts): below it, starting a
#: second worker on the file costs more than it saves.
SPLIT_MIN_BYTES = 256 * 1024


@dataclass(frozen=True, slots=True)
class Job:
    """What a worker is asked to do with one file: read it within ``limits``; with a
    ``part``, only that part of a PDF's pages (for :func:`merge_parts`)."""

    limits: Limits
    part: Part | None = None


@dataclass(frozen=True, slots=True)
class FileRef:
    """An open file handed to the workers by its descriptor (a memory file, or a file of
    Synapse's media store): never read in the bridge's process. ``head`` is its first
    bytes, for the cheap decisions made here. The caller keeps the descriptor open for the
    call and closes it."""

    fd: int
    size: int
    head: bytes


@dataclass(frozen=True, slots=True)
class _Envelope:
    """A job on the pipe: the file inline, or (``inline`` None) ``size`` bytes of the
    file whose descriptor follows."""

    job: Job
    inline: bytes | None
    size: int


def _memory_file(data: bytes) -> FileRef:
    """``data`` in a memory file (written once, however many workers read it)."""
    fd = os.memfd_create("attachment", os.MFD_CLOEXEC)
    try:
        with open(fd, "wb", closefd=False) as f:
            f.write(data)
    except BaseException:
        os.close(fd)
        raise
    return FileRef(fd, len(data), data[:1024])


def _send_file(conn: Connection, source: bytes | FileRef, job: Job, pid: int) -> None:
    """Send one job: the bytes pickled, or the descriptor of the open file."""
    if isinstance(source, bytes):
        conn.send(_Envelope(job, source, len(source)))
        return
    conn.send(_Envelope(job, None, source.size))
    reduction.send_handle(conn, source.fd, pid)


def read_at(fd: int, size: int) -> bytes:
    """``size`` bytes from offset 0 (the descriptor's own offset is shared: not used)."""
    parts: list[bytes] = []
    got = 0
    while got < size:
        chunk = os.pread(fd, size - got, got)
        if not chunk:
            break  # shorter than announced: read what is there
        parts.append(chunk)
        got += len(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _receive_file(conn: Connection) -> tuple[bytes, Job]:
    """The worker's side of :func:`_send_file`."""
    envelope = conn.recv()
    if not isinstance(envelope, _Envelope):
        raise EOFError("not a job")  # only the pool writes to this pipe
    if envelope.inline is not None:
        return envelope.inline, envelope.job
    fd = reduction.recv_handle(conn)
    try:
        return read_at(fd, envelope.size), envelope.job
    finally:
        os.close(fd)


def _serve(conn: Connection, memory_bytes: int) -> None:
    """A worker's loop: (data, job) in, Extraction out, until the pipe closes."""
    if memory_bytes > 0:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    # A native reader (PDFium) aborts when an allocation fails: no core file of that size.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    while True:
        try:
            data, job = _receive_file(conn)
        except (EOFError, OSError):
            return
        try:
            if job.part is None:
                result = extract(data, job.limits)
            else:
                result = extract_part(data, job.limits, job.part)
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

    def call(self, source: bytes | FileRef, job: Job) -> Extraction | None:
        """Extract in this worker; None when it overran ``job.limits.timeout_s`` or died."""
        try:
            pid = self.process.pid
            assert pid is not None
            _send_file(self.conn, source, job, pid)
            if self.conn.poll(job.limits.timeout_s):
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


def _cpus() -> int:
    """The CPUs this process may run on: more parts than that are read no sooner."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class ExtractionPool:
    """``size`` worker processes; :meth:`extract` waits for a free one, or reads a long PDF
    with every free one (see the module's docstring).

    ``split_min_bytes`` (default :data:`SPLIT_MIN_BYTES`) and ``max_parts`` (default: the
    CPUs this process may use) bound that split."""

    def __init__(
        self,
        size: int,
        memory_bytes: int,
        *,
        split_min_bytes: int = SPLIT_MIN_BYTES,
        max_parts: int | None = None,
    ) -> None:
        self.size = size
        self.memory_bytes = memory_bytes
        self.split_min_bytes = max(1, split_min_bytes)
        self.max_parts = _cpus() if max_parts is None else max_parts
        self._idle: asyncio.Queue[_Worker] | None = None
        self._all: list[_Worker] = []
        self._waiting = 0  # calls waiting for a worker: a split never takes the one they get
        self._replacing: set[asyncio.Task[None]] = set()
        self.replaced = 0
        self.split = 0  # files read by several workers at once

    @property
    def idle(self) -> int:
        """How many workers are free right now."""
        return 0 if self._idle is None else self._idle.qsize()

    def _ready(self) -> _Worker:
        worker = self._start()
        if worker.call(b"", Job(Limits(timeout_s=WARM_UP_S))) is None:
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

    async def extract(self, source: bytes | FileRef, limits: Limits) -> tuple[Extraction, float]:
        """Read ``source`` (the bytes, or an open file) within ``limits``; returns the
        extraction and the seconds it took."""
        if isinstance(source, bytes) and _MEMFD and len(source) >= MEMFD_MIN_BYTES:
            memory = _memory_file(source)
            try:
                return await self._extract(memory, limits)
            finally:
                os.close(memory.fd)
        return await self._extract(source, limits)

    async def _extract(self, source: bytes | FileRef, limits: Limits) -> tuple[Extraction, float]:
        if self._idle is None:
            await self.start()
        idle = self._idle
        assert idle is not None
        parts = self._parts(source, limits)
        if parts > 1:
            workers = [idle.get_nowait() for _ in range(parts)]  # free: checked just now
            jobs = [Job(limits, Part(i, parts)) for i in range(parts)]
            self.split += 1
        else:
            self._waiting += 1
            try:
                workers = [await idle.get()]
            finally:
                self._waiting -= 1
            jobs = [Job(limits)]
        started = time.perf_counter()
        results = await self._run(workers, source, jobs)
        elapsed = time.perf_counter() - started
        return (results[0] if parts == 1 else merge_parts(results, limits)), elapsed

    def _parts(self, source: bytes | FileRef, limits: Limits) -> int:
        """How many workers read ``data`` at once: 1; for a PDF of at least
        ``split_min_bytes`` (within ``limits``), every worker free now that no other call is
        waiting for, up to ``max_parts`` and one per half ``split_min_bytes`` of the file.
        Cheap facts only: the file is not parsed in this process."""
        size, head = (
            (len(source), source) if isinstance(source, bytes) else (source.size, source.head)
        )
        if size < self.split_min_bytes or size > limits.max_file_bytes or not is_pdf(head):
            return 1
        free = self.idle - self._waiting
        return max(1, min(free, self.max_parts, size * 2 // self.split_min_bytes))

    async def _run(
        self, workers: list[_Worker], source: bytes | FileRef, jobs: list[Job]
    ) -> list[Extraction]:
        """Run each job in its worker, all at once; give the workers back, replacing each
        that gave no answer (overran its time, died, or its call was cancelled: it may still
        be busy with the file)."""
        calls = [
            asyncio.to_thread(w.call, source, job) for w, job in zip(workers, jobs, strict=True)
        ]
        answers: list[Extraction | None] = [None] * len(workers)
        try:
            answers = await asyncio.gather(*calls)
            # (evaluated before the finally below replaces a worker that died)
            answered = zip(workers, answers, jobs, strict=True)
            return [self._answer(w, a, job.limits) for w, a, job in answered]
        finally:
            unsound = [w for w, a in zip(workers, answers, strict=True) if a is None]
            for w, a in zip(workers, answers, strict=True):
                if a is not None:
                    self._give_back(w)
            if unsound:
                # In a task of its own: a second cancellation while waiting for it does not
                # leave a worker out of the pool.
                task = asyncio.create_task(self._replace_all(unsound))
                self._replacing.add(task)
                task.add_done_callback(self._replacing.discard)
                await asyncio.shield(task)

    @staticmethod
    def _answer(worker: _Worker, answer: Extraction | None, limits: Limits) -> Extraction:
        if answer is not None:
            return answer
        detail = (
            "extraction ran out of memory"
            if not worker.process.is_alive()
            else f"extraction took longer than {limits.timeout_s:g} s"
        )
        return Extraction(FileType.UNKNOWN, reason=Unreadable.LIMIT, detail=detail)

    def _give_back(self, worker: _Worker) -> None:
        if self._idle is not None:
            self._idle.put_nowait(worker)
        else:  # the pool was closed while it worked (a replacement started after close())
            worker.kill()

    async def _replace_all(self, workers: list[_Worker]) -> None:
        for worker in workers:
            if self._idle is None:
                worker.kill()  # closed meanwhile: no replacement
            else:
                self._give_back(await asyncio.to_thread(self._replace, worker))

    def _replace(self, worker: _Worker) -> _Worker:
        worker.kill()
        with contextlib.suppress(ValueError):  # close() may have forgotten it already
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
