"""Fixtures shared by unit and integration tests: a fresh store on each backend."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from bridge.store import Store
from bridge.store.schema import metadata

POSTGRES_URL = os.environ.get("BRIDGE_TEST_POSTGRES_URL", "")
BACKENDS = ["sqlite", "postgresql"]


async def fresh_store_url(backend: str, tmp_path: Path) -> str:
    """A database URL with no bridge tables in it."""
    if backend == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'bridge.db'}"
    if not POSTGRES_URL:
        pytest.skip("PostgreSQL tests need BRIDGE_TEST_POSTGRES_URL (e.g. set by .ci/run)")
    engine = create_async_engine(POSTGRES_URL)
    async with engine.begin() as conn:
        await conn.run_sync(metadata.drop_all)
    await engine.dispose()
    return POSTGRES_URL


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """A fresh store, once on SQLite and once on PostgreSQL."""
    url = await fresh_store_url(request.param, tmp_path)
    s = await Store.open(url)
    yield s
    await s.close()
