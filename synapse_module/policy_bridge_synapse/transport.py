"""HTTP to the gate over Twisted (what Synapse runs on), streaming file bodies.

Synapse's ``SimpleHttpClient`` takes a request body as one ``bytes`` object; a 50 MiB upload
would be copied into memory. This transport sends a file from disk through Twisted's
``FileBodyProducer`` (read in chunks, paused while the socket is full), bounds the time of
the whole exchange and the size of the answer, and follows Synapse's logging-context rules
(every Deferred is awaited through ``make_deferred_yieldable``). It never logs.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol

from synapse.module_api import make_deferred_yieldable
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

#: The gate answers with a small JSON object; anything larger is not read.
MAX_REPLY_BYTES = 64 * 1024
#: Bytes read from a file per step of the body producer: large enough that a 1 MB file takes
#: few reactor turns (16 KiB steps tripled the time to send one), small enough to stay
#: a modest buffer per upload in flight.
READ_SIZE = 256 * 1024


@dataclass(frozen=True)
class Reply:
    """The gate's answer: status and body."""

    status: int
    body: bytes


class ReplyTooLarge(Exception):
    """The gate's answer was larger than :data:`MAX_REPLY_BYTES`."""


class Transport(Protocol):
    """How the module reaches the gate (a fake in tests)."""

    async def post(
        self,
        url: str,
        headers: Mapping[str, str],
        body: bytes | BinaryIO,
        time_limit: float,
    ) -> Reply:
        """POST ``body`` (bytes, or a file read from its position to its end) to ``url``.

        Raises on a connection problem, a timeout or an oversized reply.
        """
        ...


class _Collect(TwistedProtocol):
    """Collects a response body up to a limit."""

    def __init__(self, done: defer.Deferred[bytes], limit: int) -> None:
        self.done = done
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.done.errback(Failure(ReplyTooLarge()))
            if self.transport is not None:
                _untyped(self.transport).stopProducing()
            return
        self.parts.append(data)

    def connectionLost(self, reason: Failure = ResponseDone) -> None:  # type: ignore[assignment]
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(reason)


def _untyped(provider: object) -> Any:
    """A zope-interface provider for calls plain mypy cannot check (Twisted's own typing
    needs the mypy-zope plugin)."""
    return provider


def _read(response: IResponse) -> defer.Deferred[Reply]:
    done: defer.Deferred[bytes] = defer.Deferred()
    _untyped(response).deliverBody(_Collect(done, MAX_REPLY_BYTES))
    return done.addCallback(lambda body: Reply(response.code, body))


class TwistedTransport:
    """The real transport: one Twisted ``Agent`` with a pool of persistent connections."""

    def __init__(self, reactor: IReactorTime) -> None:
        self.reactor = reactor
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = 10
        pool.cachedConnectionTimeout = 60
        self.agent = Agent(reactor, pool=pool)

    async def post(
        self,
        url: str,
        headers: Mapping[str, str],
        body: bytes | BinaryIO,
        time_limit: float,
    ) -> Reply:
        """POST and read the answer; the whole exchange is bounded by ``time_limit`` seconds."""
        source: BinaryIO = io.BytesIO(body) if isinstance(body, bytes) else body
        producer = FileBodyProducer(source, readSize=READ_SIZE)
        fields = {k.encode("ascii"): [v.encode("ascii")] for k, v in headers.items()}
        sent = self.agent.request(b"POST", url.encode("ascii"), Headers(fields), _untyped(producer))
        answered: defer.Deferred[Reply] = sent.addCallback(_read)
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            answered.cancel()  # aborts the connection, whatever stage it is in

        timer = _untyped(self.reactor).callLater(time_limit, expire)
        try:
            return await make_deferred_yieldable(answered)
        except Exception:
            if expired:  # the cancellation surfaces as Twisted's own errors: say what it was
                raise TimeoutError(f"no answer within {time_limit:g} s") from None
            raise
        finally:
            if timer.active():
                timer.cancel()
