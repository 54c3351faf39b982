"""Reading the record chain and checkpoints straight from the engine (verification)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from bridge.audit.chain import ChainFields, ChainRecord, Checkpoint
from bridge.store.schema import checkpoints, records


async def iter_chain_batches(
    engine: AsyncEngine, *, after: int = 0, batch: int = 10_000
) -> AsyncGenerator[Sequence[Any], None]:
    """Batches of rows ``(*ChainFields, hash, ciphertext)`` in seq order, read ahead.

    For :meth:`bridge.audit.chain.ChainVerifier.feed_rows`; constant memory (two batches).
    """
    cols = (
        records.c.seq,
        records.c.ts,
        records.c.kind,
        records.c.event_id_idx,
        records.c.room_idx,
        records.c.sender_idx,
        records.c.type_idx,
        records.c.key_id,
        records.c.nonce,
        records.c.ct_digest,
        records.c.origin_ts,
        records.c.hash,
        records.c.ciphertext,
    )
    query = select(*cols).order_by(records.c.seq).limit(batch)

    async def fetch(last: int) -> Sequence[Any]:
        async with engine.connect() as conn:
            return (await conn.execute(query.where(records.c.seq > last))).all()

    async with contextlib.aclosing(prefetched(fetch, after)) as batches:
        async for rows in batches:
            yield rows


async def iter_chain(
    engine: AsyncEngine, *, after: int = 0, batch: int = 10_000
) -> AsyncGenerator[ChainRecord, None]:
    """Stream every record's hashed fields, stored hash and ciphertext, in seq order."""
    async with contextlib.aclosing(iter_chain_batches(engine, after=after, batch=batch)) as it:
        async for rows in it:
            for r in rows:
                yield ChainRecord(ChainFields(*r[:11]), r[11], r[12])


async def prefetched(
    fetch: Callable[[int], Awaitable[Sequence[Any]]], after: int
) -> AsyncGenerator[Sequence[Any], None]:
    """Batches of rows keyed by their first column (seq), the next one read ahead.

    While the caller works through one batch (CPU: hashing, decrypting), the database
    driver already reads the next one (I/O, and SQLite steps without holding the GIL).
    """
    task = asyncio.ensure_future(fetch(after))
    try:
        while True:
            rows = await task
            if not rows:
                return
            task = asyncio.ensure_future(fetch(rows[-1][0]))
            await asyncio.sleep(0)  # let the read start before the caller's CPU work
            yield rows
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def load_checkpoints(engine: AsyncEngine) -> list[Checkpoint]:
    """Every checkpoint stored in the database, by seq."""
    async with engine.connect() as conn:
        rows = await conn.execute(
            select(
                checkpoints.c.seq,
                checkpoints.c.head_hash,
                checkpoints.c.ts,
                checkpoints.c.record_count,
                checkpoints.c.key_id,
                checkpoints.c.signature,
            ).order_by(checkpoints.c.seq)
        )
        return [
            Checkpoint(seq, bytes(h), ts, n, kid, bytes(sig)) for seq, h, ts, n, kid, sig in rows
        ]
