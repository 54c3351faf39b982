"""The enforcement executor against a real store and a fake homeserver on loopback.

The fake homeserver is a real aiohttp server; the executor talks to it through the real
mautrix client from ``bridge.matrix.make_client``. It exists because a real Synapse cannot
be made to answer 429 with a chosen ``retry_after_ms`` or to fail with 502 on demand.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import pytest
from aiohttp import ClientSession, web

from bridge import metrics
from bridge.commands.registry import Reply
from bridge.config import ExecutorConfig
from bridge.matrix import AdminAPI, make_client
from bridge.pipeline import actions
from bridge.pipeline.actions import ActionKind
from bridge.pipeline.enforcement import RoomEnforcement
from bridge.pipeline.executor import Executor
from bridge.policy.rooms import RoomPlan
from bridge.store import ActionRow, NewAction, Store, StoreSettings
from tests.kit.store import get_action

ROOM = "!room:example.org"
BOT = "@policybot:example.org"


@dataclass
class Seen:
    method: str
    path: str  # decoded
    body: Any
    auth: str


@dataclass
class FakeHomeserver:
    """Records every request; answers from a script, else a plausible success."""

    url: str = ""
    seen: list[Seen] = field(default_factory=list)
    # (predicate on (method, path), status, body, headers); the first match is used once.
    script: list[tuple[Callable[[str, str], bool], int, Any, dict[str, str]]] = field(
        default_factory=list
    )
    room_state: list[dict[str, Any]] = field(default_factory=list)

    def fail_next(
        self,
        status: int,
        body: Any,
        *,
        when: Callable[[str, str], bool] = lambda _m, _p: True,
        headers: dict[str, str] | None = None,
        times: int = 1,
    ) -> None:
        for _ in range(times):
            self.script.append((when, status, body, headers or {}))

    def sent(self, method: str, fragment: str) -> list[Seen]:
        return [s for s in self.seen if s.method == method and fragment in s.path]

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        body = json.loads(raw) if raw else None
        path = unquote(request.raw_path.split("?", 1)[0])
        self.seen.append(Seen(request.method, path, body, request.headers.get("Authorization", "")))
        for i, (when, status, answer, headers) in enumerate(self.script):
            if when(request.method, path):
                del self.script[i]
                return web.json_response(answer, status=status, headers=headers)
        if request.method == "GET" and path.endswith("/state"):
            return web.json_response(self.room_state)
        if "/send/" in path or "/state/" in path or "/redact/" in path:
            return web.json_response({"event_id": f"$ev{len(self.seen)}"})
        if path.endswith("/join"):
            return web.json_response({"room_id": path.split("/")[-2]})
        return web.json_response({})


@pytest.fixture
async def homeserver() -> AsyncIterator[FakeHomeserver]:
    fake = FakeHomeserver()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    fake.url = f"http://127.0.0.1:{port}"
    try:
        yield fake
    finally:
        await runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[ClientSession]:
    async with ClientSession() as s:
        yield s


CONFIG = ExecutorConfig(
    max_attempts=3, initial_backoff=10.0, max_backoff=1000.0, rate_per_second=1e6
)


def make_executor(
    store: Store,
    homeserver: FakeHomeserver,
    session: ClientSession,
    *,
    config: ExecutorConfig = CONFIG,
    **kwargs: Any,
) -> Executor:
    client = make_client(homeserver.url, "as-token", BOT, session)
    return Executor(store, client, config, **kwargs)


async def action(store: Store, action_id: str) -> ActionRow:
    row = await get_action(store, action_id)
    assert row is not None
    return row


async def audit_actions(store: Store) -> list[dict[str, Any]]:
    return [r["data"] async for r in store.reader.iter(kind="action")]


def is_send(method: str, path: str) -> bool:
    return method == "PUT" and "/send/" in path


# -- success ------------------------------------------------------------------------------


async def test_send_notice_is_sent_with_the_action_id_as_txn_and_audited(
    store: Store, homeserver: FakeHomeserver, session: ClientSession
) -> None:
    ex = make_executor(store, homeserver, session)
    a = NewAction(
        "send_notice", {"body": "hello", "html": "<b>hello</b>", "reply_to": "$q"}, room_id=ROOM
    )
    await store.actions.enqueue([a])
    assert await ex.run_due() == 1

    [req] = homeserver.sent("PUT", "/send/")
    assert req.path == f"/_matrix/client/v3/rooms/{ROOM}/send/m.room.message/{a.id}"
    assert req.auth == "Bearer as-token"
    assert req.body == {
        "msgtype": "m.notice",
        "body": "hello",
        "format": "org.matrix.custom.html",
        "formatted_body": "<b>hello</b>",
        "m.relates_to": {"m.in_reply_to": {"event_id": "$q"}},
    }
    row = await action(store, a.id)
    assert (row.status, row.attempts) == ("done", 1)
    [record] = await audit_actions(store)
    assert record["action_id"] == a.id
    assert record["outcome"] == "done"
    assert record["result"]["event_id"].startswith("$ev")
    # The message text itself is not copied into the audit record of the action.
    assert "body" not in record["payload"] and "html" not in record["payload"]
    assert await ex.run_due() == 0


async def test_join_marks_the_room_joined(
    store: Store, homeserver: FakeHomeserver, session: ClientSession
) -> None:
    ex = make_executor(store, homeserver, session)
    a = NewAction("join", {}, room_id=ROOM)
    await store.actions.enqueue([a])
    await ex.run_due()
    assert homeserver.sent("POST", "/join")
    assert (await action(store, a.id)).status == "done"
    [room] = await store.rooms.known()
    assert room["room_id"] == ROOM and room["joined"]


async def test_invite_of_someone_already_in_the_room_counts_as_done(
    store: Store, homeserver: FakeHomeserver, session: ClientSession
) -> None:
    ex = make_executor(store, homeserver, session)
    homeserver.fail_next(403, {"errcode": "M_FORBIDDEN", "error": "@u:x is already in the room."})
    a = NewAction("invite", {"user_id": "@u:x"}, room_id=ROOM)
    await store.actions.enqueue([a])
    await ex.run_due()
    assert (await action(store, a.id)).status == "done"
    assert (await audit_actions(store))[0]["result"] == {"already": True}


# -- rate limits and transient failures ----------------------------------------------------


async def test_rate_limit_reschedules_at_retry_after_without_using_an_attempt(
    store: Store, homeserver: FakeHomeserver, session: ClientSession
) -> None:
    ex = make_executor(store, homeserver, session)
    homeserver.fail_next(
        429, {"errcode": "M_LIMIT_EXCEEDED", "error": "Too many", "retry_after_ms": 7000}
    )
    a = NewAction("send_notice", {"body": "x"}, room_id=ROOM)
    await store.actions.enqueue([a])
    waits_before = metrics.REGISTRY.get_sample_value("bridge_rate_limit_waits_total") or 0.0

    before = time.time()
    await ex.run_due()
    after = time.time()

    row = await action(store, a.id)
    assert row.status == "pending"
    assert row.attempts == 0
    assert before + 7.0 <= row.next_at <= after + 7.0
    assert row.last_error == "rate limited"
    assert metrics.REGISTRY.get_sample_value("bridge_rate_limit_waits_total") == waits_before + 1
    # Not due yet: nothing is attempted until the wait is over.
    assert await ex.run_due() == 0
    assert await audit_actions(store) == []

    # Once due, the same action goes through.
    await ex.attempt(row)
    assert (await action(store, a.id)).status == "done"


async def test_rate_limit_falls_back_to_the_retry_after_header(
    store: Store, homeserver: FakeHomeserver, session: ClientSession
) -> None:
    ex = make_executor(store, homeserver, session)
    homeserver.fail_next(
        429, {"errcode": "M_LIMIT_EXCEEDED", "error": "slow down"}, headers={"Retry-After": "3"}
    )
    a = NewAction("redact", {"event_id": "$e"}, room_id=ROOM)
    await store.actions.enqueue([a])
    before = time.time()
    await ex.run_due()
    after = time.time()
    row = await action(store, a.id)
    assert (row.status, row.attempts) == ("pending", 0)
    assert before + 3.0 <= row.next_at <= after + 3.0


async def test_bad_gateway_retries_with_exponential_backoff_then_fails(
    store: Store, homeserver: FakeHomeserver, session: ClientSession
) -> None:
    failures: list[tuple[str, str]] = []

    async def report(row: ActionRow, reason: str) -> None:
        failures.append((row.id, reason))

    ex = make_executor(store, homeserver, session, on_permanent_failure=report)
    homeserver.fail_next(502, {"errcode": "M_UNKNOWN", "error": "Bad Gateway"}, times=3)
    a = NewAction("send_state", {"type": "m.room.topic", "content": {"topic": "t"}}, room_id=ROOM)
    await store.actions.enqueue([a])

    for attempt, delay in ((1, 10.0), (2, 20.0)):
        before = time.time()
        await ex.attempt(await action(store, a.id))
        after = time.time()
        row = await action(store, a.id)
        assert (row.status, row.attempts) == ("pending", attempt)
        assert before + delay <= row.next_at <= after + delay
        assert "HTTP 502" in (row.last_error or "")
        assert failures == []

    await ex.attempt(await action(store, a.id))
    row = await action(store, a.id)
    assert (row.status, row.attempts) == ("failed", 3)
    assert row.last_error == "gave up after 3 attempts: HTTP 502 M_UNKNOWN"
    assert failures == [(a.id, row.last_error)]
    assert len(homeserver.sent("PUT", "/state/")) == 3
    [record] = await audit_actions(store)
    assert (record["outcome"], record["attempts"], record["error"]) == (
        "failed",
        3,
        row.last_error,
    )


async def test_backoff_is_capped_at_max_backoff(
    store: Store, homeserver: FakeHomeserver, session: ClientSession
) -> None:
    config = ExecutorConfig(
        max_attempts=10, initial_backoff=10.0, max_backoff=25.0, rate_per_second=1e6
    )
    ex = make_executor(store, homeserver, session, config=config)
    homeserver.fail_next(503, {"errcode": "M_UNKNOWN", "error": "down"}, times=3)
    a = NewAction("redact", {"event_id": "$e"}, room_id=ROOM)
    await store.actions.enqueue([a])
    for _ in range(3):
        before = time.time()
        await ex.attempt(await action(store, a.id))
        after = time.time()
    row = await action(store, a.id)
    assert row.attempts == 3
    assert before + 25.0 <= row.next_at <= after + 25.0


async def test_unreachable_homeserver_is_a_transient_failure(
    store: Store, session: ClientSession
) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = make_client(f"http://127.0.0.1:{port}", "as-token", BOT, session)
    ex = Executor(store, client, CONFIG)
    a = NewAction("send_notice", {"body": "x"}, room_id=ROOM)
    await store.actions.enqueue([a])
    await ex.run_due()
    row = await action(store, a.id)
    assert (row.status, row.attempts) == ("pending", 1)
    assert (row.last_error or "").startswith("homeserver unreachable")


async def test_retry_of_send_notice_reuses_the_same_txn_id(
    store: Store, homeserver: FakeHomeserver, session: ClientSession
) -> None:
    ex = make_executor(store, homeserver, session)
    homeserver.fail_next(502, {"errcode": "M_UNKNOWN", "error": "Bad Gateway"})
    a = NewAction("send_notice", {"body": "once"}, room_id=ROOM)
    await store.actions.enqueue([a])
    await ex.attempt(await action(store, a.id))
    await ex.attempt(await action(store, a.id))
    sends = homeserver.sent("PUT", "/send/")
    assert len(sends) == 2
    assert {s.path.rsplit("/", 1)[1] for s in sends} == {a.id}
    assert (await action(store, a.id)).status == "done"


# -- permanent failures ----------------------------------------------------------------------


async def test_forbidden_fails_at_once_with_a_readable_reason_and_marks_the_room(
    store: Store, homeserver: FakeHomeserver, session: ClientSession
) -> None:
    ex = make_executor(store, homeserver, session)
    homeserver.fail_next(
        403,
        {"errcode": "M_FORBIDDEN", "error": "You don't have permission to post that to the room."},
    )
    a = NewAction(
        "send_state", {"type": "m.room.server_acl", "content": {"allow": ["*"]}}, room_id=ROOM
    )
    await store.actions.enqueue([a])
    await ex.run_due()
    row = await action(store, a.id)
    assert (row.status, row.attempts) == ("failed", 1)
    assert row.last_error == (
        f"the bot is not allowed to send state events in {ROOM} "
        "(M_FORBIDDEN: You don't have permission to post that to the room.)"
    )
    [room] = await store.rooms.known()
    assert room["room_id"] == ROOM
    assert room["lacking"] == "cannot send state events"
    assert len(homeserver.sent("PUT", "/state/")) == 1


async def test_not_found_is_permanent_and_says_so(
    store: Store, homeserver: FakeHomeserver, session: ClientSession
) -> None:
    ex = make_executor(store, homeserver, session)
    homeserver.fail_next(404, {"errcode": "M_NOT_FOUND", "error": "Unknown room"})
    a = NewAction("leave", {}, room_id=ROOM)
    await store.actions.enqueue([a])
    await ex.run_due()
    row = await action(store, a.id)
    assert row.status == "failed"
    assert (
        row.last_error == f"not found while trying to leave in {ROOM} (M_NOT_FOUND: Unknown room)"
    )


async def test_every_kind_has_a_handler_and_typed_and_stored_kinds_run_alike(
    store: Store, homeserver: FakeHomeserver, session: ClientSession
) -> None:
    ex = make_executor(store, homeserver, session)
    assert set(ex._handlers) == set(ActionKind)
    typed = actions.notice(ROOM, Reply.plain("typed"), reply_to="$q")
    stored = NewAction("send_notice", {"body": "as an older version stored it"}, room_id=ROOM)
    await store.actions.enqueue([typed, stored])
    assert await ex.run_due() == 2
    assert (await action(store, typed.id)).status == "done"
    assert (await action(store, stored.id)).status == "done"
    bodies = [r.body["body"] for r in homeserver.sent("PUT", "/send/m.room.message/")]
    assert sorted(bodies) == ["as an older version stored it", "typed"]


async def test_unknown_kind_and_crashing_handler_fail_alone_and_do_not_wedge_the_queue(
    store: Store, homeserver: FakeHomeserver, session: ClientSession
) -> None:
    ex = make_executor(store, homeserver, session)
    unknown = NewAction("frobnicate", {}, room_id=ROOM, not_before=1.0)
    broken = NewAction("send_notice", {}, room_id=ROOM, not_before=2.0)  # no body: KeyError
    good = NewAction("send_notice", {"body": "still here"}, room_id=ROOM, not_before=3.0)
    await store.actions.enqueue([good, broken, unknown])

    assert await ex.run_due() == 3

    row = await action(store, unknown.id)
    assert (row.status, row.last_error) == ("failed", "unknown action kind 'frobnicate'")
    row = await action(store, broken.id)
    assert (row.status, row.last_error) == ("failed", "internal error: KeyError")
    assert (await action(store, good.id)).status == "done"
    [req] = homeserver.sent("PUT", "/send/")
    assert req.body["body"] == "still here"
    assert await ex.run_due() == 0


async def test_action_without_a_room_fails_clearly(
    store: Store, homeserver: FakeHomeserver, session: ClientSession
) -> None:
    ex = make_executor(store, homeserver, session)
    a = NewAction("kick", {"user_id": "@u:x"})
    await store.actions.enqueue([a])
    await ex.run_due()
    row = await action(store, a.id)
    assert (row.status, row.last_error) == ("failed", "kick needs a room")
    assert homeserver.seen == []


async def test_a_failing_failure_report_does_not_break_the_executor(
    store: Store, homeserver: FakeHomeserver, session: ClientSession
) -> None:
    async def report(_row: ActionRow, _reason: str) -> None:
        raise RuntimeError("management room gone")

    ex = make_executor(store, homeserver, session, on_permanent_failure=report)
    homeserver.fail_next(403, {"errcode": "M_FORBIDDEN", "error": "no"}, when=is_send)
    first = NewAction("send_notice", {"body": "a"}, room_id=ROOM, not_before=1.0)
    second = NewAction("send_notice", {"body": "b"}, room_id=ROOM, not_before=2.0)
    await store.actions.enqueue([first, second])
    await ex.run_due()
    assert (await action(store, first.id)).status == "failed"
    assert (await action(store, second.id)).status == "done"


# -- restart -----------------------------------------------------------------------------------


async def test_pending_actions_survive_reopening_the_store(
    store: Store, homeserver: FakeHomeserver, session: ClientSession
) -> None:
    ex = make_executor(store, homeserver, session)
    homeserver.fail_next(502, {"errcode": "M_UNKNOWN", "error": "Bad Gateway"})
    retried = NewAction("send_notice", {"body": "retried"}, room_id=ROOM)
    untouched = NewAction("redact", {"event_id": "$e", "reason": "dlp"}, room_id=ROOM)
    await ex.attempt(await _enqueued(store, retried))
    await store.actions.enqueue([untouched])

    url = store.db.engine.url.render_as_string(hide_password=False)
    await store.close()
    reopened = await Store.open(
        url, StoreSettings(keyring=store.keyring, signing_key=store.signing_key)
    )
    try:
        row = await action(reopened, retried.id)
        assert (row.status, row.attempts, row.payload) == ("pending", 1, {"body": "retried"})
        row2 = await action(reopened, untouched.id)
        assert (row2.status, row2.attempts, row2.room_id) == ("pending", 0, ROOM)

        ex2 = make_executor(reopened, homeserver, session)
        await ex2.attempt(row)
        await ex2.run_due()
        assert (await action(reopened, retried.id)).attempts == 2
        assert (await action(reopened, retried.id)).status == "done"
        assert (await action(reopened, untouched.id)).status == "done"
        [redact] = homeserver.sent("PUT", "/redact/")
        assert redact.body == {"reason": "dlp"}
        # The retried notice keeps its transaction ID across the restart.
        assert {s.path.rsplit("/", 1)[1] for s in homeserver.sent("PUT", "/send/")} == {retried.id}
    finally:
        await reopened.close()


async def _enqueued(store: Store, a: NewAction) -> ActionRow:
    await store.actions.enqueue([a])
    return await action(store, a.id)


# -- admin API and reconcile ---------------------------------------------------------------------


async def test_make_room_admin_uses_the_admin_api_or_fails_without_a_token(
    store: Store, homeserver: FakeHomeserver, session: ClientSession
) -> None:
    without = make_executor(store, homeserver, session)
    a = NewAction("make_room_admin", {"user_id": BOT}, room_id=ROOM)
    await store.actions.enqueue([a])
    await without.run_due()
    row = await action(store, a.id)
    assert row.status == "failed"
    assert "no Synapse admin token configured (homeserver.admin_token)" in (row.last_error or "")

    admin = AdminAPI(homeserver.url, "admin-token", session)
    ex = make_executor(store, homeserver, session, admin=admin)
    b = NewAction("make_room_admin", {"user_id": BOT}, room_id=ROOM)
    await store.actions.enqueue([b])
    await ex.run_due()
    assert (await action(store, b.id)).status == "done"
    [req] = homeserver.sent("POST", "/make_room_admin")
    assert req.path == f"/_synapse/admin/v1/rooms/{ROOM}/make_room_admin"
    assert req.body == {"user_id": BOT}
    assert req.auth == "Bearer admin-token"


class StubRooms:
    """A RoomEnforcement whose planner returns a fixed plan and records what it saw."""

    def __init__(self, plan: RoomPlan) -> None:
        self.fixed = plan
        self.planned: list[tuple[str, list[dict[str, Any]]]] = []
        self.states: list[tuple[str, list[dict[str, Any]]]] = []
        self.results: list[tuple[str, dict[str, Any]]] = []

    def plan(self, room: str, state: list[dict[str, Any]]) -> RoomPlan:
        self.planned.append((room, state))
        return self.fixed

    def on_state(self, room: str, state: list[dict[str, Any]]) -> None:
        self.states.append((room, state))

    async def on_result(self, room: str, result: dict[str, Any]) -> None:
        self.results.append((room, result))

    def enforcement(self) -> RoomEnforcement:
        return RoomEnforcement(self.plan, self.on_state, self.on_result)


STATE = [
    {
        "type": "m.room.create",
        "state_key": "",
        "sender": "@alice:example.org",
        "content": {"room_version": "12"},
    },
    {"type": "m.room.member", "state_key": "@eve:evil.example", "content": {"membership": "join"}},
]


async def test_reconcile_reads_state_sends_the_plan_and_reports(
    store: Store, homeserver: FakeHomeserver, session: ClientSession
) -> None:
    homeserver.room_state = STATE
    acl = {"allow": ["example.org"], "deny": [], "allow_ip_literals": False}
    stub = StubRooms(
        RoomPlan(
            set_state=(("m.room.server_acl", "", acl),),
            kicks=(("@eve:evil.example", "federation with evil.example is not allowed"),),
            lacking=("power level 100 to send m.room.retention (the bot has 50)",),
            unkickable=(("@alice:evil.example", "a room creator cannot be removed"),),
        )
    )
    ex = make_executor(store, homeserver, session, rooms=stub.enforcement())
    a = NewAction("reconcile", {"reason": "test", "rollout": "r1"}, room_id=ROOM)
    await store.actions.enqueue([a])
    await ex.run_due()

    assert stub.states == [(ROOM, STATE)]
    assert stub.planned == [(ROOM, STATE)]
    assert [s.path for s in homeserver.sent("GET", "/state")] == [
        f"/_matrix/client/v3/rooms/{ROOM}/state"
    ]
    [put] = homeserver.sent("PUT", "/state/")
    assert put.path.startswith(f"/_matrix/client/v3/rooms/{ROOM}/state/m.room.server_acl")
    assert put.body == acl
    [kick] = homeserver.sent("POST", "/kick")
    assert kick.body == {
        "user_id": "@eve:evil.example",
        "reason": "federation with evil.example is not allowed",
    }
    assert (await action(store, a.id)).status == "done"
    assert stub.results == [
        (
            ROOM,
            {
                "sent": ["m.room.server_acl"],
                "kicked": ["@eve:evil.example"],
                "lacking": ["power level 100 to send m.room.retention (the bot has 50)"],
                "unkickable": ["@alice:evil.example: a room creator cannot be removed"],
                "payload": {"reason": "test", "rollout": "r1"},
            },
        )
    ]


async def test_reconcile_of_a_room_in_line_sends_nothing(
    store: Store, homeserver: FakeHomeserver, session: ClientSession
) -> None:
    homeserver.room_state = STATE
    stub = StubRooms(RoomPlan())
    ex = make_executor(store, homeserver, session, rooms=stub.enforcement())
    await store.actions.enqueue([NewAction("reconcile", {"reason": "t"}, room_id=ROOM)])
    await ex.run_due()
    assert [s.method for s in homeserver.seen] == ["GET"]
    [(_room, result)] = stub.results
    assert (result["sent"], result["kicked"]) == ([], [])


async def test_reconcile_failure_is_reported_to_the_room_enforcement(
    store: Store, homeserver: FakeHomeserver, session: ClientSession
) -> None:
    homeserver.room_state = STATE
    homeserver.fail_next(
        403,
        {"errcode": "M_FORBIDDEN", "error": "You don't have permission to kick"},
        when=lambda m, p: m == "POST" and p.endswith("/kick"),
    )
    stub = StubRooms(RoomPlan(kicks=(("@eve:evil.example", "policy"),)))
    ex = make_executor(store, homeserver, session, rooms=stub.enforcement())
    a = NewAction("reconcile", {"reason": "t"}, room_id=ROOM)
    await store.actions.enqueue([a])
    await ex.run_due()
    row = await action(store, a.id)
    assert row.status == "failed"
    # The reason names the step that was refused, not the reconcile as a whole.
    assert row.last_error == (
        f"the bot is not allowed to kick users in {ROOM} "
        "(M_FORBIDDEN: You don't have permission to kick)"
    )
    [(room, result)] = stub.results
    assert room == ROOM
    assert result == {"error": row.last_error, "payload": {"reason": "t"}}


async def test_reconcile_in_a_room_the_bot_cannot_read_says_so(
    store: Store, homeserver: FakeHomeserver, session: ClientSession
) -> None:
    homeserver.fail_next(
        403,
        {"errcode": "M_FORBIDDEN", "error": "User not in room"},
        when=lambda m, p: m == "GET",
    )
    stub = StubRooms(RoomPlan())
    ex = make_executor(store, homeserver, session, rooms=stub.enforcement())
    a = NewAction("reconcile", {"reason": "t"}, room_id=ROOM)
    await store.actions.enqueue([a])
    await ex.run_due()
    row = await action(store, a.id)
    assert (row.status, row.attempts) == ("failed", 1)
    assert row.last_error == (
        f"the bot is not allowed to read the room state in {ROOM} (M_FORBIDDEN: User not in room)"
    )
    assert stub.planned == []


async def test_reconcile_hit_by_a_server_error_is_retried_as_a_whole(
    store: Store, homeserver: FakeHomeserver, session: ClientSession
) -> None:
    homeserver.room_state = STATE
    homeserver.fail_next(
        502,
        {"errcode": "M_UNKNOWN", "error": "Bad Gateway"},
        when=lambda m, p: m == "PUT",
    )
    acl = {"allow": ["example.org"], "deny": [], "allow_ip_literals": False}
    stub = StubRooms(RoomPlan(set_state=(("m.room.server_acl", "", acl),)))
    ex = make_executor(store, homeserver, session, rooms=stub.enforcement())
    a = NewAction("reconcile", {"reason": "t"}, room_id=ROOM)
    await store.actions.enqueue([a])
    await ex.run_due()
    row = await action(store, a.id)
    assert (row.status, row.attempts) == ("pending", 1)
    assert stub.results == []
    await ex.attempt(row)
    assert (await action(store, a.id)).status == "done"
    assert len(homeserver.sent("PUT", "/state/")) == 2
    [(_room, result)] = stub.results
    assert result["sent"] == ["m.room.server_acl"]


async def test_reconcile_without_room_enforcement_fails_permanently(
    store: Store, homeserver: FakeHomeserver, session: ClientSession
) -> None:
    ex = make_executor(store, homeserver, session)
    a = NewAction("reconcile", {"reason": "t"}, room_id=ROOM)
    await store.actions.enqueue([a])
    await ex.run_due()
    row = await action(store, a.id)
    assert (row.status, row.last_error) == ("failed", "room enforcement is not configured")
    assert homeserver.seen == []


async def test_reconcile_with_a_non_list_state_fails_permanently(
    store: Store, homeserver: FakeHomeserver, session: ClientSession
) -> None:
    homeserver.fail_next(200, {"not": "a list"}, when=lambda m, p: m == "GET")
    stub = StubRooms(RoomPlan())
    ex = make_executor(store, homeserver, session, rooms=stub.enforcement())
    a = NewAction("reconcile", {"reason": "t"}, room_id=ROOM)
    await store.actions.enqueue([a])
    await ex.run_due()
    row = await action(store, a.id)
    assert (row.status, row.last_error) == ("failed", "the homeserver returned no state list")
    assert stub.planned == []


# -- legal hold ------------------------------------------------------------------------------


async def test_retention_removals_queued_before_a_hold_are_cancelled_not_run(
    store: Store, homeserver: FakeHomeserver, session: ClientSession
) -> None:
    ex = make_executor(store, homeserver, session)
    held_room = NewAction(
        "redact", {"event_id": "$a", "reason": "retention", "retention": True}, room_id=ROOM
    )
    held_user = NewAction(
        "redact",
        {"event_id": "$b", "reason": "retention", "retention": True, "sender": "@kept:x"},
        room_id="!other:x",
    )
    free = NewAction(
        "redact",
        {"event_id": "$c", "reason": "retention", "retention": True, "sender": "@free:x"},
        room_id="!other:x",
    )
    purge = NewAction("purge_history", {"purge_up_to_ts": 1}, room_id=ROOM)
    dlp = NewAction("redact", {"event_id": "$d", "reason": "dlp"}, room_id=ROOM)
    await store.actions.enqueue([held_room, held_user, free, purge, dlp])
    # The hold arrives after the sweep queued its work.
    await store.holds.set("room", ROOM, True, by="@admin:x")
    await store.holds.set("user", "@kept:x", True, by="@admin:x")
    await ex.run_due()
    statuses = {a.id: (await action(store, a.id)).status for a in (held_room, held_user, purge)}
    assert set(statuses.values()) == {"cancelled"}
    assert (await action(store, free.id)).status == "done"
    # A DLP redaction is not a retention removal: the hold does not stop it.
    assert (await action(store, dlp.id)).status == "done"
    redacted = {
        s.path.split("/redact/")[1].split("/")[0] for s in homeserver.sent("PUT", "/redact/")
    }
    assert redacted == {"$c", "$d"}
    outcomes = {
        r["payload"]["event_id"]: r["outcome"]
        for r in await audit_actions(store)
        if r["kind"] == "redact"
    }
    assert outcomes == {
        "$a": "cancelled: legal hold",
        "$b": "cancelled: legal hold",
        "$c": "done",
        "$d": "done",
    }


async def test_a_user_hold_cancels_a_queued_purge_of_a_room_where_that_user_wrote(
    store: Store, homeserver: FakeHomeserver, session: ClientSession
) -> None:
    admin = AdminAPI(homeserver.url, "admin-token", session)
    ex = make_executor(store, homeserver, session, admin=admin)
    kept, late, free = "!kept:x", "!late:x", "!free:x"

    def message(room: str, sender: str, ts: int) -> dict[str, Any]:
        return {
            "event_id": f"${room[1:5]}{sender[1:5]}{ts}",
            "room_id": room,
            "sender": sender,
            "type": "m.room.message",
            "origin_server_ts": ts,
            "content": {"body": "hi"},
        }

    await store.queue.ingest(
        "t1",
        [
            message(kept, "@held:x", 100),  # before the cutoff: the purge would remove it
            message(late, "@held:x", 5000),  # after the cutoff: the purge keeps it
            message(late, "@other:x", 100),
            message(free, "@other:x", 100),
        ],
    )
    purges = [
        NewAction("purge_history", {"purge_up_to_ts": 1000, "delete_local_events": True}, room_id=r)
        for r in (kept, late, free)
    ]
    await store.actions.enqueue(purges)
    # The hold arrives after the sweep queued the purges.
    await store.holds.set("user", "@held:x", True, by="@admin:x")
    homeserver.fail_next(200, {"purge_id": "p1"}, when=lambda m, p: "/purge_history/" in p, times=2)
    await ex.run_due()
    status = {p.room_id: (await action(store, p.id)) for p in purges}
    assert status[kept].status == "cancelled"
    assert status[kept].last_error == "legal hold: a user on legal hold sent messages in this room"
    assert status[late].status == status[free].status == "done"
    purged = {
        s.path.split("/purge_history/")[1] for s in homeserver.sent("POST", "/purge_history/")
    }
    assert purged == {late, free}
    [audit] = [r for r in await audit_actions(store) if r["outcome"] == "cancelled: legal hold"]
    assert audit["payload"]["purge_up_to_ts"] == 1000
    assert audit["hold"] == "a user on legal hold sent messages in this room"


async def test_policy_notice_creates_the_dm_once_then_reuses_it(
    store: Store, homeserver: FakeHomeserver, session: ClientSession
) -> None:
    from bridge.store.notice_rooms import notice_room, notice_room_owner

    user = "@alice:example.org"
    ex = make_executor(store, homeserver, session)
    homeserver.fail_next(
        200, {"room_id": "!dm:example.org"}, when=lambda m, p: m == "POST" and "createRoom" in p
    )
    first = actions.policy_notice(user, "first", "<p>first</p>", {"ref": "AAAA-BBBB"})
    second = actions.policy_notice(user, "second", "<p>second</p>", {"ref": "CCCC-DDDD"})
    await store.actions.enqueue([first, second])
    assert await ex.run_due() == 2

    [create] = homeserver.sent("POST", "createRoom")
    assert create.body["is_direct"] is True
    assert create.body["invite"] == [user]
    assert create.body["preset"] == "private_chat"
    assert create.body["name"] == "Policy notices"
    sends = homeserver.sent("PUT", "/rooms/!dm:example.org/send/m.room.message/")
    assert [s.body["body"] for s in sends] == ["first", "second"]
    assert sends[0].body["msgtype"] == "m.notice"
    assert sends[0].body["m.mentions"] == {"user_ids": [user]}
    assert await notice_room(store, user) == "!dm:example.org"
    assert await notice_room_owner(store, "!dm:example.org") == user
    records = await audit_actions(store)
    assert [r["result"]["created"] for r in records] == [True, False]
    assert all("body" not in r["payload"] for r in records)
    assert records[0]["payload"]["ref"] == "AAAA-BBBB"


def _warning(joined: bool, local: bool = True) -> NewAction:
    return actions.warn_sender(
        ROOM,
        "@alice:example.org",
        "$msg",
        Reply.plain("in thread"),
        ("in dm", "<p>in dm</p>"),
        joined=joined,
        local=local,
        details={"rule": "keyword:x"},
    )


def _is_encryption_state(method: str, path: str) -> bool:
    return method == "GET" and path.endswith("/state/m.room.encryption/")


async def test_warn_sender_answers_in_a_thread_of_a_readable_room(
    store: Store, homeserver: FakeHomeserver, session: ClientSession
) -> None:
    ex = make_executor(store, homeserver, session)
    homeserver.fail_next(404, {"errcode": "M_NOT_FOUND", "error": "no"}, when=_is_encryption_state)
    a = _warning(joined=True)
    await store.actions.enqueue([a])
    await ex.run_due()
    [sent] = homeserver.sent("PUT", "/send/m.room.message/")
    assert f"/rooms/{ROOM}/" in sent.path and sent.body["body"] == "in thread"
    assert sent.body["m.relates_to"]["rel_type"] == "m.thread"
    assert sent.body["m.mentions"] == {"user_ids": [a.payload["user_id"]]}  # pings the sender
    [record] = await audit_actions(store)
    assert record["result"]["place"] == "thread"
    assert not {"body", "html", "dm_body", "dm_html"} & set(record["payload"])


async def test_warn_sender_goes_to_the_notice_room_when_encrypted_or_not_joined(
    store: Store, homeserver: FakeHomeserver, session: ClientSession
) -> None:
    ex = make_executor(store, homeserver, session)
    homeserver.fail_next(
        200, {"room_id": "!dm:example.org"}, when=lambda m, p: m == "POST" and "createRoom" in p
    )
    encrypted = _warning(joined=True)  # the fake answers the encryption state: encrypted
    outside = _warning(joined=False)
    remote = _warning(joined=False, local=False)
    await store.actions.enqueue([encrypted])
    await ex.run_due()
    await store.actions.enqueue([outside])
    await ex.run_due()
    await store.actions.enqueue([remote])
    await ex.run_due()
    sends = homeserver.sent("PUT", "/send/m.room.message/")
    assert [s.path.split("/rooms/")[1].split("/")[0] for s in sends] == ["!dm:example.org"] * 2
    assert [s.body["body"] for s in sends] == ["in dm", "in dm"]
    assert len(homeserver.sent("POST", "createRoom")) == 1
    places = {r["action_id"]: r["result"]["place"] for r in await audit_actions(store)}
    assert places == {encrypted.id: "notice room", outside.id: "notice room", remote.id: "nowhere"}


def test_a_refusal_because_the_bot_is_not_in_the_room_says_so() -> None:
    """Synapse answers 403 "User … not in room" when the bot is not a member: that is no
    lack of power, and the admin is told to invite or enrol (found in the demo)."""
    from mautrix.errors import make_request_error

    from bridge.pipeline.executor import describe_failure
    from bridge.policy.outcomes import classify, power_problem

    row = ActionRow("a1", ActionKind.REDACT, "!r:x", {}, "pending", 0, 0.0, None)
    outside = make_request_error(
        http_status=403, text="", errcode="M_FORBIDDEN", message="User @bot:x not in room !r:x"
    )
    text = describe_failure(row, outside)
    assert text.startswith("the bot is not a member of !r:x, so it cannot")
    assert "invite it" in text
    lacking = make_request_error(
        http_status=403, text="", errcode="M_FORBIDDEN", message="You don't have permission"
    )
    assert describe_failure(row, lacking).startswith("the bot is not allowed to")
    assert not power_problem(classify({"error": text}))
