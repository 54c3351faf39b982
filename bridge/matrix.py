"""The bot's connection to the homeserver (mautrix ``ClientAPI``) and the admin API.

Only the executor and the startup sequence use this; everything else asks the executor.
We use mautrix's plain ``ClientAPI`` rather than ``IntentAPI``: the executor decides itself
when to join and how to retry, and must see rate-limit hints (``retry_after_ms``), which
this module attaches to the raised errors.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast
from urllib.parse import quote

from aiohttp import ClientError, ClientSession, ClientTimeout
from mautrix.api import HTTPAPI, Method, Path
from mautrix.client import ClientAPI
from mautrix.errors import MatrixRequestError, make_request_error
from mautrix.types import UserID
from mautrix.util.logging import TraceLogger
from yarl import URL

log = logging.getLogger(__name__)


class HomeserverUnreachable(Exception):
    """The homeserver did not answer within the startup timeout."""


class BridgeHTTPAPI(HTTPAPI):
    """mautrix HTTPAPI that keeps ``retry_after_ms`` on rate-limit errors and never retries
    by itself (the executor owns retries)."""

    async def _send(
        self,
        method: Method,
        url: URL,
        content: Any,
        query_params: dict[str, str],
        headers: dict[str, str],
    ) -> tuple[Any, Any]:
        request = self.session.request(
            str(method), url, data=content, params=query_params, headers=headers
        )
        async with request as response:
            if 200 <= response.status < 300:
                return await response.json(), response
            text = await response.text()
            errcode = message = None
            retry_after_ms: int | None = None
            try:
                body = await response.json(content_type=None)
                errcode, message = body.get("errcode"), body.get("error")
                if isinstance(body.get("retry_after_ms"), int):
                    retry_after_ms = body["retry_after_ms"]
            except (ValueError, AttributeError):
                pass
            if retry_after_ms is None and response.headers.get("Retry-After", "").isdigit():
                retry_after_ms = int(response.headers["Retry-After"]) * 1000
            err = make_request_error(
                http_status=response.status, text=text, errcode=errcode, message=message
            )
            err.retry_after_ms = retry_after_ms  # type: ignore[attr-defined]
            raise err


def make_client(
    homeserver_url: str, as_token: str, bot_mxid: str, session: ClientSession
) -> ClientAPI:
    """A mautrix client acting as the appservice bot."""
    api = BridgeHTTPAPI(
        homeserver_url,
        as_token,
        client_session=session,
        default_retry_count=0,
        log=cast(TraceLogger, logging.getLogger("bridge.http")),
    )
    return ClientAPI(mxid=UserID(bot_mxid), api=api)


async def wait_for_homeserver(
    session: ClientSession, url: str, give_up_after: float, *, interval: float = 1.0
) -> None:
    """Wait until ``/_matrix/client/versions`` answers, with backoff and clear log lines."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + give_up_after if give_up_after else None
    delay = interval
    attempt = 0
    while True:
        attempt += 1
        try:
            async with session.get(
                f"{url}/_matrix/client/versions", timeout=ClientTimeout(total=10)
            ) as resp:
                if resp.status == 200:
                    log.info("homeserver %s is up", url)
                    return
                problem = f"HTTP {resp.status}"
        except (ClientError, TimeoutError, OSError) as e:
            problem = str(e) or e.__class__.__name__
        if deadline is not None and loop.time() + delay > deadline:
            raise HomeserverUnreachable(
                f"homeserver {url} not reachable after {give_up_after:.0f}s ({problem})"
            )
        log.warning(
            "waiting for homeserver %s (attempt %d: %s); next try in %.0fs",
            url,
            attempt,
            problem,
            delay,
        )
        await asyncio.sleep(delay)
        delay = min(delay * 2, 30)


async def register_bot(client: ClientAPI, localpart: str) -> None:
    """Register the appservice bot user; an existing registration is fine."""
    try:
        await client.api.request(
            Method.POST,
            Path.v3.register,
            {"username": localpart, "type": "m.login.application_service", "inhibit_login": True},
            query_params={"kind": "user"},
        )
        log.info("registered bot user @%s", localpart)
    except MatrixRequestError as e:
        if e.errcode != "M_USER_IN_USE":
            raise


async def ping_homeserver(client: ClientAPI, appservice_id: str, txn_id: str) -> int:
    """Ask the homeserver to ping us back (also makes it retry queued transactions now).

    Returns the round trip in milliseconds as reported by the homeserver.
    """
    resp = await client.api.request(
        Method.POST,
        Path.v1.appservice[appservice_id].ping,
        {"transaction_id": txn_id},
    )
    return int(resp.get("duration_ms", 0))


# Delays between ping attempts after a transient failure: about four minutes in all, which
# outlasts Synapse's own early backoff steps (2, 4, 8, ... seconds).
PING_RETRY_DELAYS: tuple[float, ...] = (1, 2, 4, 8, 15, 30, 30, 60, 60)


def ping_is_transient(error: MatrixRequestError) -> bool:
    """Whether a failed ping may succeed if repeated.

    Synapse answers 502/504 when it could not reach us (or when the ping raced its own retry
    of a queued transaction: it then fails with ``AlreadyCalled``). A 4xx (wrong as_token, no
    URL in the registration) will not fix itself.
    """
    return error.http_status >= 500 or error.http_status == 0


async def ping_until_reached(
    ping: Callable[[], Awaitable[int]],
    delays: Sequence[float] = PING_RETRY_DELAYS,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> tuple[int, int]:
    """Repeat ``ping`` after transient failures until it succeeds.

    Returns ``(round trip ms, attempts)``. Raises the last error when the delays run out or
    the failure is not transient.
    """
    attempt = 0
    while True:
        attempt += 1
        try:
            return await ping(), attempt
        except MatrixRequestError as e:
            if not ping_is_transient(e) or attempt > len(delays):
                raise
            log.info(
                "appservice ping attempt %d failed (%s %s); retrying in %ss",
                attempt,
                e.http_status,
                e.errcode,
                delays[attempt - 1],
            )
            await sleep(delays[attempt - 1])


class AdminAPI:
    """The few Synapse admin API endpoints the bridge uses."""

    def __init__(self, homeserver_url: str, token: str, session: ClientSession) -> None:
        self.api = BridgeHTTPAPI(
            homeserver_url,
            token,
            client_session=session,
            default_retry_count=0,
            log=cast(TraceLogger, logging.getLogger("bridge.http.admin")),
        )

    async def make_room_admin(self, room_id: str, user_id: str) -> None:
        await self.api.request(
            Method.POST,
            f"/_synapse/admin/v1/rooms/{quote(room_id, safe='')}/make_room_admin",
            {"user_id": user_id},
        )

    async def list_rooms(self, batch: int = 500) -> list[str]:
        """Every room on the server (the admin API lists local and joined rooms)."""
        out: list[str] = []
        start: int | None = 0
        while start is not None:
            resp = await self.api.request(
                Method.GET,
                "/_synapse/admin/v1/rooms",
                query_params={"from": str(start), "limit": str(batch)},
            )
            out.extend(r["room_id"] for r in resp.get("rooms", []))
            nxt = resp.get("next_batch")
            start = int(nxt) if nxt is not None else None
        return out

    async def purge_history(
        self, room_id: str, purge_up_to_ts: int, delete_local_events: bool = True
    ) -> str:
        resp = await self.api.request(
            Method.POST,
            f"/_synapse/admin/v1/purge_history/{quote(room_id, safe='')}",
            {"purge_up_to_ts": purge_up_to_ts, "delete_local_events": delete_local_events},
        )
        return str(resp["purge_id"])

    async def purge_status(self, purge_id: str) -> str:
        resp = await self.api.request(
            Method.GET, f"/_synapse/admin/v1/purge_history_status/{quote(purge_id, safe='')}"
        )
        return str(resp.get("status", "unknown"))
