"""The appservice API the homeserver calls: transactions, ping, user and room queries.

A transaction is acknowledged only after its events and work-queue entry are committed;
anything that prevents the commit answers 5xx so Synapse retries the same txnId.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from bridge import metrics
from bridge.audit import codec
from bridge.store import Store, StoreUnavailable

log = logging.getLogger(__name__)

PREFIX = "/_matrix/app/v1"


def matrix_error(status: int, errcode: str, error: str, **extra: Any) -> web.Response:
    """A JSON error response in the Matrix format."""
    return web.json_response({"errcode": errcode, "error": error, **extra}, status=status)


def token_matches(supplied: str | None, expected: str) -> bool:
    """Constant-time token comparison (also for different lengths)."""
    if not supplied or not expected:
        return False
    return hmac.compare_digest(supplied.encode("utf-8"), expected.encode("utf-8"))


def bearer_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token:
        return token.strip()
    return None


class AppserviceAPI:
    """Handlers for ``/_matrix/app/v1``. ``on_committed`` wakes the worker."""

    def __init__(
        self,
        store: Store,
        hs_token: str,
        *,
        allow_query_token: bool = False,
        on_committed: Callable[[], None] = lambda: None,
        accepting: Callable[[], bool] = lambda: True,
        on_ping: Callable[[], Awaitable[None]] | None = None,
        on_refused: Callable[[], None] | None = None,
        on_ephemeral: Callable[[Mapping[str, Any]], Awaitable[None]] | None = None,
    ) -> None:
        self.store = store
        self.hs_token = hs_token
        self.allow_query_token = allow_query_token
        self.on_committed = on_committed
        self.accepting = accepting
        self.on_ping = on_ping
        self.on_refused = on_refused
        # e2ee: the transaction's to-device messages, device lists and key counts, handed
        # to the bot's device before the 200 (its crypto store commits them)
        self.on_ephemeral = on_ephemeral

    def routes(self) -> list[web.RouteDef]:
        return [
            # any opaque txnId, braces included (the default pattern refuses "{" and "}")
            web.put(PREFIX + "/transactions/{txn_id:[^/]+}", self.put_transaction),
            web.post(PREFIX + "/ping", self.ping),
            web.get(PREFIX + "/users/{user_id}", self.query_not_found),
            web.get(PREFIX + "/rooms/{alias}", self.query_not_found),
            web.get(PREFIX + "/thirdparty/{rest:.*}", self.query_not_found),
        ]

    def _auth_error(self, request: web.Request) -> web.Response | None:
        supplied = bearer_token(request)
        if supplied is None and self.allow_query_token:
            supplied = request.query.get("access_token")
        if supplied is None:
            return matrix_error(401, "M_UNAUTHORIZED", "missing homeserver token")
        if not token_matches(supplied, self.hs_token):
            return matrix_error(403, "M_FORBIDDEN", "invalid homeserver token")
        return None

    async def put_transaction(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        if (err := self._auth_error(request)) is not None:
            metrics.TRANSACTIONS.labels("unauthorized").inc()
            log.warning("transaction refused: bad or missing hs_token from %s", request.remote)
            return err
        if not self.accepting():
            metrics.TRANSACTIONS.labels("unavailable").inc()
            return matrix_error(503, "M_UNKNOWN", "the bridge is shutting down; retry later")
        txn_id = request.match_info["txn_id"]
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            metrics.TRANSACTIONS.labels("too_large").inc()
            return matrix_error(413, "M_TOO_LARGE", "transaction body too large")
        try:
            payload = codec.loads(body)  # orjson where it reads exactly what json.loads reads
        except (ValueError, UnicodeDecodeError, RecursionError):
            metrics.TRANSACTIONS.labels("bad_json").inc()
            return matrix_error(400, "M_NOT_JSON", "body is not valid JSON")
        events = payload.get("events") if isinstance(payload, dict) else None
        if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
            metrics.TRANSACTIONS.labels("bad_json").inc()
            return matrix_error(400, "M_BAD_JSON", "expected an object with an 'events' list")
        try:
            result = await self.store.queue.ingest(txn_id, events)
        except StoreUnavailable as e:
            metrics.TRANSACTIONS.labels("store_unavailable").inc()
            log.error("transaction %s not stored, asking Synapse to retry: %s", txn_id, e)
            if self.on_refused is not None:
                self.on_refused()
            return matrix_error(503, "M_UNKNOWN", "storage unavailable; retry later")
        if self.on_ephemeral is not None and isinstance(payload, dict):
            try:
                await self.on_ephemeral(payload)
            except Exception as e:
                metrics.TRANSACTIONS.labels("e2ee_unavailable").inc()
                log.warning("transaction %s: to-device part not handled (%s)", txn_id, e)
                return matrix_error(503, "M_UNKNOWN", "e2ee not ready; retry later")
        metrics.EVENTS_INGESTED.inc(result.stored)
        metrics.TRANSACTIONS.labels("duplicate" if result.duplicate else "ok").inc()
        metrics.INGEST_LATENCY.observe(time.perf_counter() - started)
        if result.stored:
            self.on_committed()
        if result.duplicate:
            log.info("transaction %s already stored; acknowledged again", txn_id)
        else:
            log.debug(
                "transaction %s: %d events stored, %d duplicates",
                txn_id,
                result.stored,
                result.skipped,
            )
        return web.json_response({})

    async def ping(self, request: web.Request) -> web.Response:
        if (err := self._auth_error(request)) is not None:
            return err
        if self.on_ping is not None:
            await self.on_ping()
        return web.json_response({})

    async def query_not_found(self, request: web.Request) -> web.Response:
        if (err := self._auth_error(request)) is not None:
            return err
        return matrix_error(404, "M_NOT_FOUND", "this appservice does not provision users or rooms")
