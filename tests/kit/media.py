"""For the in-room media checks: a homeserver's authenticated media endpoint to fetch from,
a checker on a fresh store, and queueing checks the way the worker commits them."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import ClientSession, web
from aiohttp.test_utils import TestServer

from bridge.attachments.pool import ExtractionPool
from bridge.config import Config
from bridge.pipeline.live_policy import build_engine
from bridge.pipeline.media_checks import MediaChecker
from bridge.store import Store
from bridge.store.media import MediaCheck

DOWNLOAD_ROUTE = "/_matrix/client/v1/media/download/{server}/{media}"


@dataclass
class MediaHomeserver:
    """Where the fake serves (``url``), and every media ID asked for, in order."""

    url: str
    fetched: list[str] = field(default_factory=list)


@contextlib.asynccontextmanager
async def media_homeserver(
    files: dict[str, bytes], token: str | None = None
) -> AsyncIterator[MediaHomeserver]:
    """Serve ``files`` by media ID (read at each request: the caller may add files later);
    404 ``M_NOT_FOUND`` for others. With ``token``, every request must carry it."""
    served = MediaHomeserver("")

    async def download(request: web.Request) -> web.Response:
        if token is not None:
            assert request.headers["Authorization"] == f"Bearer {token}"
        media_id = request.match_info["media"]
        served.fetched.append(media_id)
        if media_id not in files:
            return web.json_response({"errcode": "M_NOT_FOUND"}, status=404)
        return web.Response(body=files[media_id])

    app = web.Application()
    app.add_routes([web.get(DOWNLOAD_ROUTE, download)])
    server = TestServer(app)
    await server.start_server()
    served.url = str(server.make_url("")).rstrip("/")
    try:
        yield served
    finally:
        await server.close()


async def queue_checks(store: Store, checks: Sequence[MediaCheck]) -> None:
    """Commit ``checks`` to the media check queue (under the operational key)."""
    await store.keys.op_key()

    async def run(conn: Any) -> None:
        await store.media.insert(conn, checks)

    await store.records.write(run)


@dataclass
class CheckerRig:
    """A media checker on a fresh store, with its one-worker extraction pool."""

    store: Store
    checker: MediaChecker
    pool: ExtractionPool


@contextlib.asynccontextmanager
async def media_checker(config: Config, db: Path, management: str) -> AsyncIterator[CheckerRig]:
    """A :class:`MediaChecker` for ``config`` (its live policy) on a SQLite store at ``db``;
    ``management`` is the management room's ID."""
    engine = build_engine(config)
    store = await Store.open(f"sqlite+aiosqlite:///{db}")
    pool = ExtractionPool(1, 768 * 1024 * 1024)
    try:
        async with ClientSession() as session:
            checker = MediaChecker(
                store, session, lambda: config, lambda: engine, pool, lambda: management
            )
            yield CheckerRig(store, checker, pool)
    finally:
        pool.close()
        await store.close()
