"""The pre-send gate: the HTTP side of the Synapse module (the project's own
``policy_bridge_synapse``, or ``synapse-http-antispam``: both speak this protocol).

Synapse calls ``POST {base_url}/{callback}`` before it accepts an event, invite or join, and
(with the project's module) before it creates a room (``user_may_create_room``: the whole
createRoom body) or takes a state event through the state API (``user_may_send_state_event``).
2xx with a JSON body allows; 403 with ``{"errcode", "error"}`` denies, and the error text
reaches the sender's client. Answers come from the in-memory policy engine. A decision
with findings (a refusal, or a rule that only notifies or audits) is answered once its
audit record is committed by the background sink (bounded by :data:`DENY_AUDIT_WAIT`);
while the store is down, a decision that lets the event through is answered at once and
its record waits in the sink's memory (refusals still wait, bounded).

The cost of one call is bounded. Synapse asks the module *before* its own size check, so an
event over its limit of 64 KiB (:data:`MAX_EVENT_BYTES`, measured as Synapse does: compact
UTF-8 JSON) is refused here with ``M_TOO_LARGE`` before it is judged, and a request body
that cannot hold a legal event is refused before it is read. Events above
:data:`INLINE_JUDGE_BYTES` are judged on a small thread pool, so that while one is judged
the event loop keeps answering health checks, transactions and other gate calls.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web

from bridge import metrics
from bridge.archive.sink import AuditSink
from bridge.audit.kinds import AuditKind
from bridge.http.transactions import bearer_token, matrix_error, token_matches
from bridge.policy.engine import PolicyEngine
from bridge.policy.model import Verdict
from bridge.policy.notices import new_ref
from bridge.policy.overrides import Grant, OverrideBook, override_digest
from bridge.store import AuditEntry

log = logging.getLogger(__name__)

#: Seconds an audited decision (a refusal, a notify or audit finding) may wait for its
#: audit record's commit before answering Synapse.
DENY_AUDIT_WAIT = 1.0
#: Synapse's limit on the size of an event (its canonical JSON), in bytes.
MAX_EVENT_BYTES = 65_536
#: The largest request that can carry a legal event: the JSON the module sends escapes
#: non-ASCII characters (up to 12 bytes for one 4-byte character), plus the wrapper.
MAX_REQUEST_BYTES = 3 * MAX_EVENT_BYTES + 16_384
#: Request bodies up to this size are judged on the event loop (a few hundred microseconds);
#: larger ones on the gate's thread pool.
INLINE_JUDGE_BYTES = 8_192
#: Threads judging large events; more large events wait their turn, not the event loop.
JUDGE_THREADS = 2

# Callbacks we judge. Any other callback the module is configured to send is allowed.
JUDGED = (
    "check_event_for_spam",
    "user_may_invite",
    "federated_user_may_invite",
    "user_may_join_room",
    "accept_make_join",
    "user_may_create_room",
    "user_may_send_state_event",
    "user_may_create_room_alias",
)


def _str(body: Mapping[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str):
        raise ValueError(f"'{key}' must be a string")
    return value


def _too_large(what: str, size: int, limit: int) -> web.Response:
    return matrix_error(
        413,
        "M_TOO_LARGE",
        f"{what} is too large: {size} bytes, at most {limit} are allowed",
    )


async def _read_json(request: web.Request) -> tuple[Any, int]:
    """The JSON body and its size, or the Matrix error response to send instead (413, 400)."""
    length = request.content_length
    if length is not None and length > MAX_REQUEST_BYTES:
        return _too_large("the request", length, MAX_REQUEST_BYTES), length
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return matrix_error(413, "M_TOO_LARGE", "request body too large"), 0
    if len(raw) > MAX_REQUEST_BYTES:
        return _too_large("the request", len(raw), MAX_REQUEST_BYTES), len(raw)
    try:
        return json.loads(raw), len(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return matrix_error(400, "M_NOT_JSON", "body is not valid JSON"), len(raw)


def event_size(event: Mapping[str, Any]) -> int:
    """Bytes of ``event`` as compact UTF-8 JSON, the way Synapse measures its size limit."""
    try:
        return len(json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode())
    except (TypeError, ValueError, RecursionError):
        return MAX_EVENT_BYTES + 1


def override_used(grant: Grant, subject: Mapping[str, Any]) -> AuditEntry:
    """The audit record of an override's one use."""
    return AuditEntry(
        kind=AuditKind.OVERRIDE,
        room_id=grant.room_id,
        sender=grant.sender,
        type="used",
        data={
            "ref": grant.ref,
            "rule": grant.rule,
            "justification": grant.justification,
            "event_id": subject.get("event_id"),
            "outcome": "used",
        },
    )


class Gate:
    """aiohttp handlers answering the antispam module from the current policy engine."""

    def __init__(
        self,
        base_path: str,
        token: str,
        engine: Callable[[], PolicyEngine],
        sink: AuditSink | None,
        on_blocked: Callable[[Mapping[str, Any], Verdict], None] | None = None,
        overrides: OverrideBook | None = None,
    ) -> None:
        self.base_path = base_path
        self.token = token
        self.engine = engine
        self.sink = sink
        # Told about refused events (which never reach the ingest path) so that `notify`
        # rules still reach the management room. Must not block: it only schedules work.
        self.on_blocked = on_blocked
        # Overrides with justification (one resend of one refused message; see its module).
        self.overrides = overrides
        self._pool: ThreadPoolExecutor | None = None

    def close(self) -> None:
        """Stop the judging threads (idle ones exit at once; none is needed to stop)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    async def _judge(
        self, name: str, body: Mapping[str, Any], size: int
    ) -> tuple[Verdict, dict[str, Any]]:
        """:meth:`judge` on the event loop for small bodies, on the thread pool for large."""
        if size <= INLINE_JUDGE_BYTES:
            return self.judge(name, body)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(JUDGE_THREADS, thread_name_prefix="gate-judge")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self.judge, name, body)

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post(self.base_path + "/ping", self.ping),
            web.post(self.base_path + "/{callback:[^/]+}", self.callback),
        ]

    def _authorized(self, request: web.Request) -> bool:
        return token_matches(bearer_token(request), self.token)

    async def ping(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return matrix_error(403, "M_FORBIDDEN", "invalid gate token")
        body, _ = await _read_json(request)
        if isinstance(body, web.Response):
            return body
        req_id = body.get("id") if isinstance(body, dict) else None
        return web.json_response({"id": req_id, "status": "ok"})

    async def callback(self, request: web.Request) -> web.Response:
        name = request.match_info["callback"]
        if not self._authorized(request):
            log.warning("gate call %s refused: bad or missing token", name)
            return matrix_error(403, "M_FORBIDDEN", "invalid gate token")
        if name not in JUDGED:  # allowed unread (e.g. a file, when no media gate is wired)
            return web.json_response({})
        started = time.perf_counter()
        body, size = await _read_json(request)
        if isinstance(body, web.Response):
            if body.status == 413:
                metrics.GATE_DECISIONS.labels(name, "deny", "too_large").inc()
            return body
        if not isinstance(body, dict):
            return matrix_error(400, "M_BAD_JSON", "expected a JSON object")
        event = body.get("event")
        # The request is never smaller than the compact UTF-8 JSON of its event (escapes
        # only grow it), so only a larger request can carry an event over the limit.
        if isinstance(event, dict) and size > MAX_EVENT_BYTES:
            event_bytes = event_size(event)
            if event_bytes > MAX_EVENT_BYTES:
                metrics.GATE_DECISIONS.labels(name, "deny", "too_large").inc()
                log.info("gate refused %s: event of %d bytes", name, event_bytes)
                return _too_large("the event", event_bytes, MAX_EVENT_BYTES)
        try:
            verdict, subject = await self._judge(name, body, size)
        except ValueError as e:
            return matrix_error(400, "M_BAD_JSON", str(e))
        finding = verdict.first_block
        rule = finding.rule if finding else ""
        # Overridable refusals are remembered by a digest keyed with the gate token.
        digest = override_digest(self.token, name, body, verdict)
        if digest and self.overrides is not None:
            sender, room = str(subject.get("sender")), str(subject.get("room_id"))
            grant = self.overrides.consume(sender, room, digest, time.time())
            if grant is not None:
                metrics.GATE_DECISIONS.labels(name, "allow", "override").inc()
                await self._record(override_used(grant, subject), refusal=False)
                log.info("gate allowed %s for %s: override %s", name, sender, grant.ref)
                return web.json_response({})
        metrics.GATE_DECISIONS.labels(name, "deny" if finding else "allow", rule).inc()
        for f in verdict.findings:
            if f.category == "dlp":
                metrics.DLP_HITS.labels(f.rule, "gate").inc()
        metrics.GATE_LATENCY.labels(name).observe(time.perf_counter() - started)
        if finding is None:
            if verdict.findings:  # notify/audit rules: as durable as a refusal
                await self._record(self._audit_entry(name, subject, verdict), refusal=False)
            return web.json_response({})
        subject["ref"] = new_ref()  # named in the sender's notice and in the audit record
        await self._record(self._audit_entry(name, subject, verdict), refusal=True)
        log.info(
            "gate denied %s for %s in %s (event %s): rule %s",
            name,
            subject.get("sender"),
            subject.get("room_id"),
            subject.get("event_id") or "-",
            finding.rule,
        )
        if self.on_blocked is not None:
            try:
                self.on_blocked({**subject, "digest": digest}, verdict)
            except Exception:
                log.exception("reporting a refused event failed")
        return matrix_error(403, finding.errcode, finding.message)

    def judge(self, name: str, body: Mapping[str, Any]) -> tuple[Verdict, dict[str, Any]]:
        """Run one callback through the engine; returns the verdict and what it was about."""
        engine = self.engine()
        if name in ("check_event_for_spam", "federated_user_may_invite"):
            event = body.get("event")
            if not isinstance(event, dict):
                raise ValueError("'event' must be an object")
            subject = {
                "event_id": event.get("event_id"),
                "room_id": event.get("room_id"),
                "sender": event.get("sender"),
                "type": event.get("type"),
            }
            if name == "check_event_for_spam":
                return engine.check_event(event), subject
            return engine.check_federated_invite(event), subject
        if name == "user_may_invite":
            inviter, invitee, room = (
                _str(body, "inviter"),
                _str(body, "invitee"),
                _str(body, "room_id"),
            )
            subject = {"sender": inviter, "invitee": invitee, "room_id": room}
            return engine.check_invite(inviter, invitee, room), subject
        if name == "user_may_join_room":
            user, room = _str(body, "user"), _str(body, "room")
            is_invited = bool(body.get("is_invited", False))
            subject = {"sender": user, "room_id": room}
            return engine.check_local_join(user, room, is_invited), subject
        if name == "user_may_create_room":
            return self._judge_create_room(engine, body)
        if name == "user_may_create_room_alias":
            user, alias = _str(body, "user_id"), _str(body, "room_alias")
            subject = {"sender": user, "type": "m.room.aliases"}  # the alias may be the secret
            return engine.check_room_alias(user, alias), subject
        if name == "user_may_send_state_event":
            user, room = _str(body, "user_id"), _str(body, "room_id")
            etype, key = _str(body, "event_type"), _str(body, "state_key")
            content = body.get("content")
            if not isinstance(content, dict):
                raise ValueError("'content' must be an object")
            subject = {"sender": user, "room_id": room, "type": etype, "state_key": key}
            return engine.check_state_event(user, room, etype, key, content), subject
        user, room = _str(body, "user"), _str(body, "room")
        return engine.check_remote_join(user, room), {"sender": user, "room_id": room}

    @staticmethod
    def _judge_create_room(
        engine: PolicyEngine, body: Mapping[str, Any]
    ) -> tuple[Verdict, dict[str, Any]]:
        """``user_may_create_room``: the createRoom body as a whole (our Synapse module sends
        it as ``room_config``; synapse-http-antispam sends the user alone: nothing to judge)."""
        user = _str(body, "user_id")
        config = body.get("room_config", {})
        if not isinstance(config, dict):
            raise ValueError("'room_config' must be an object")
        creation = config.get("creation_content")
        predecessor = creation.get("predecessor") if isinstance(creation, dict) else None
        old_room = predecessor.get("room_id") if isinstance(predecessor, dict) else None
        subject = {
            "sender": user,
            "room_id": old_room if isinstance(old_room, str) else None,
            "type": "m.room.create",
            "is_direct": config.get("is_direct") is True,
        }
        return engine.check_create_room(user, config), subject

    async def _record(self, entry: AuditEntry, *, refusal: bool) -> None:
        """A decision is evidence: answer once its record is committed (grouped with the
        others of the moment), but never hold Synapse for long; it stays queued anyway.

        While the store is down, a decision that lets the event through does not wait (the
        record waits in memory, written when the store is back; a crash meanwhile loses it).
        """
        if self.sink is None:
            return
        if not refusal and self.sink.store_down:
            self.sink.submit(entry)
            return
        if not await self.sink.record(entry, DENY_AUDIT_WAIT):
            what = "refusal" if refusal else "decision"
            log.warning("gate %s answered before its audit record was committed", what)

    @staticmethod
    def _audit_entry(name: str, subject: Mapping[str, Any], verdict: Verdict) -> AuditEntry:
        return AuditEntry(
            kind=AuditKind.GATE,
            room_id=subject.get("room_id"),
            sender=subject.get("sender"),
            type=subject.get("type"),
            data={
                "callback": name,
                "decision": "deny" if verdict.blocked else "allow",
                "subject": dict(subject),
                "findings": [
                    {
                        "rule": f.rule,
                        "category": f.category,
                        "actions": sorted(f.actions),
                        "message": f.message,
                        "excerpt": f.excerpt,
                    }
                    for f in verdict.findings
                ],
            },
        )
