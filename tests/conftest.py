"""Fixtures shared by unit and integration tests: a fresh store on each backend."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from bridge.store import Store

POSTGRES_URL = os.environ.get("BRIDGE_TEST_POSTGRES_URL", "")
BACKENDS = ["sqlite", "postgresql"]


async def fresh_store_url(backend: str, tmp_path: Path) -> str:
    """A database URL with no bridge tables in it.

    On PostgreSQL each test gets a database of its own (created here, left for the server's
    owner to clean up with the rest of the test cluster), so tests never see each other's
    tables, also when several runs share one server.
    """
    if backend == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'bridge.db'}"
    if not POSTGRES_URL:
        pytest.skip("PostgreSQL tests need BRIDGE_TEST_POSTGRES_URL (e.g. set by .ci/run)")
    name = f"bridge_test_{uuid.uuid4().hex[:12]}"
    engine = create_async_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    async with engine.connect() as conn:
        await conn.execute(text(f'CREATE DATABASE "{name}"'))
    await engine.dispose()
    _created.append(name)
    return make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)


_created: list[str] = []


@pytest.fixture(scope="session", autouse=True)
def _drop_test_databases() -> Iterator[None]:
    """Drop the per-test PostgreSQL databases at the end of the session."""
    yield
    if not (POSTGRES_URL and _created):
        return

    async def drop() -> None:
        engine = create_async_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
        async with engine.connect() as conn:
            for name in _created:
                await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        await engine.dispose()

    asyncio.run(drop())


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """A fresh store, once on SQLite and once on PostgreSQL."""
    url = await fresh_store_url(request.param, tmp_path)
    s = await Store.open(url)
    yield s
    await s.close()


@contextlib.asynccontextmanager
async def in_background(coro: Coroutine[Any, Any, Any]) -> AsyncIterator[asyncio.Task[Any]]:
    """Run ``coro`` (a serve-forever loop) as a task during the block, then cancel it."""
    task = asyncio.create_task(coro)
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
