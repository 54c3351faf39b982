"""``audit export`` through worker processes.

The main process reads the sealed rows by keyset pages as the in-process path does
(:meth:`bridge.store.reading.RecordReader.iter_sealed_batches`) and hands each batch, with the
raw data keys it needs and the ids of shredded keys among its key ids
(:meth:`bridge.store.keys.KeyRepository.key_material`), to a pool of worker processes
(``spawn``: never ``fork`` an asyncio program). A worker opens, filters and formats the batch
(:func:`bridge.archive.export.export_batch`) and returns its output, encoded. The main process
writes the chunks in submission order, so in seq order, with at most ``2 * jobs`` batches in
flight (constant memory).

Keys travel only through the pool's pipes: they are never written to a file, logged, or put
in an error message. A failing batch (a record that does not authenticate, an unknown data
key) raises its StoreError, naming the record, in the main process: the earliest failing
batch in seq order, so the same error as in-process, after the same output.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import multiprocessing
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TYPE_CHECKING, Any

from bridge.archive.export import export_batch, init_worker, keep_heap_pages, searches_trail
from bridge.audit.decode import RecordError
from bridge.store.models import StoreError

if TYPE_CHECKING:
    from bridge.store import Store


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Keep the objects that exist now out of the garbage collector's passes meanwhile.

    The CLI holds tens of MB of long-lived objects (modules, the engine); streaming records
    allocates enough to trigger full collections, each of which would walk all of them
    (≈ 10 % of the export's CPU time).
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


#: Rows per task handed to a worker: larger tasks cost each worker more memory (its batch,
#: decoded, and its output), smaller ones more round trips; a page read from the database
#: (the in-process path's 2,000 rows) is split into tasks of this size.
TASK_ROWS = 1000


async def export_parallel(
    store: Store,
    query: dict[str, Any],
    fmt: str,
    words: Sequence[str],
    write: Callable[[bytes], object],
    *,
    jobs: int,
    batch: int = 2000,
    task_rows: int = TASK_ROWS,
) -> int:
    """Export the records ``query`` matches (:meth:`RecordReader.iter_sealed_batches` arguments)
    through ``jobs`` worker processes, writing the output with ``write`` in seq order;
    returns how many records were written.

    ``batch`` rows are read per query, handed on in tasks of ``task_rows``; at most
    ``2 * jobs`` tasks are in flight (one running and one queued per worker). A page's output
    is written once all its tasks are done, as the in-process path writes a page: when a
    record fails, both have written the same pages before it.
    """
    loop = asyncio.get_running_loop()
    trail = searches_trail(query.get("kind"))
    keep_heap_pages()
    pool = ProcessPoolExecutor(
        jobs, mp_context=multiprocessing.get_context("spawn"), initializer=init_worker
    )
    # (task, whether it ends its page)
    in_flight: deque[tuple[asyncio.Future[tuple[bytes, int]], bool]] = deque()
    page: list[bytes] = []  # output of the done tasks of the page not yet written
    n = 0

    async def finish_one() -> None:
        nonlocal n
        fut, last = in_flight.popleft()
        try:
            chunk, k = await fut
        except RecordError as e:  # raised in a worker: the store's error, as in-process
            raise StoreError(str(e)) from None
        page.append(chunk)
        n += k
        if last:
            for c in page:
                write(c)
            page.clear()

    try:
        pages = store.reader.iter_sealed_batches(**query, batch=batch)
        async with contextlib.aclosing(pages) as rows_it:
            async for rows in rows_it:
                for i in range(0, len(rows), task_rows):
                    task = [tuple(r) for r in rows[i : i + task_rows]]
                    material, shredded = store.keys.key_material(r[5] for r in task)
                    fut = loop.run_in_executor(
                        pool, export_batch, task, material, shredded, fmt, words, trail
                    )
                    in_flight.append((fut, i + task_rows >= len(rows)))
                    del task, material
                    while len(in_flight) >= 2 * jobs:
                        await finish_one()
        while in_flight:
            await finish_one()
    finally:
        for fut, _ in in_flight:
            fut.cancel()
        await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)
    return n
