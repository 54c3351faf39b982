"""Bad input, fuzzed: the HTTP endpoints, the command parser, replies, the DLP normaliser.

Hypothesis drives the real code with random and adversarial input (huge bodies, deep JSON,
invalid UTF-8, lone surrogates escaped in JSON, wrong types everywhere, 10k-character
strings, HTML injection in command arguments):

- the transaction endpoint and the gate endpoints (aiohttp test server, real Store on
  SQLite, real AppserviceAPI / Gate / PolicyEngine / AuditSink) never answer 5xx and every
  client error is a 4xx with a Matrix errcode;
- tokenize + the command registry never raise anything but CommandError;
- bot replies never carry unescaped HTML from arguments (the worker's real command path);
- the DLP normaliser and the policy engine never raise.

Every test sets ``max_examples`` explicitly; the number of cases actually run is counted
and printed at the end of the module (``CASES``).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.app import build_registry
from bridge.archive.sink import AuditSink
from bridge.commands import CommandError, tokenize
from bridge.config import Config
from bridge.http.gate import JUDGED, Gate
from bridge.http.transactions import AppserviceAPI
from bridge.pipeline.live_policy import build_engine
from bridge.pipeline.worker import Worker
from bridge.policy.normalize import clean, fold, html_to_text, normalize
from bridge.store import Store
from tests.kit.config import make_config
from tests.kit.services import Services

T = TypeVar("T")

HS_TOKEN = "hs-fuzz-token-xxxxxxxxxxxxxxxxxx"
GATE_TOKEN = "gate-fuzz-token-xxxxxxxxxxxxxxxx"
HS_AUTH = {"Authorization": f"Bearer {HS_TOKEN}"}
GATE_AUTH = {"Authorization": f"Bearer {GATE_TOKEN}"}
MAX_BODY = 256 * 1024
DOMAIN = "corp.example"
ADMIN = f"@boss:{DOMAIN}"
MGMT = f"!mgmt:{DOMAIN}"
ROOM = f"!room:{DOMAIN}"

CASES: Counter[str] = Counter()
FUZZ = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=False,
)

INJECTIONS = [
    "<img src=x onerror=alert(1)>",
    "<script>alert(1)</script>",
    '"><svg/onload=alert(1)>',
    "<a href='javascript:alert(1)'>x</a>",
    "</code><iframe src=//evil>",
    "<b>bold</b>",
    "&lt;img src=x&gt;",
    "<mx-reply><blockquote>fake</blockquote></mx-reply>",
]


def fuzz_config(tmp: Path) -> Config:
    return make_config(
        {
            "homeserver": {"domain": DOMAIN},
            "bridge": {"permissions": {ADMIN: "admin", f"@eve:{DOMAIN}": "auditor"}},
            "dlp": {
                "keywords": [
                    {"name": "codename", "keywords": ["project nightingale"], "action": "block"},
                    {"name": "watch", "keywords": ["falcon"], "action": ["warn", "notify"]},
                ],
                "regexes": [{"name": "ticket", "pattern": "SEC-[0-9]{4,}", "action": "notify"}],
                "detectors": {"card": "block", "private_key": "block", "jwt": "notify"},
            },
        },
        base_dir=tmp,
    )


# -- an event loop of our own (hypothesis tests are synchronous) ---------------------------


class Harness:
    """The HTTP app and a worker over one SQLite store, on a private event loop."""

    def __init__(self, tmp: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.config = fuzz_config(tmp)
        self.run(self._open(tmp))

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    async def _open(self, tmp: Path) -> None:
        self.store = await Store.open(f"sqlite+aiosqlite:///{tmp / 'fuzz.db'}")
        # what commands see of the bridge (live policy, room enforcer, management room)
        self.services = Services(self.store, self.config, MGMT)
        self.policy = self.services.policy
        self.sink = AuditSink(self.store)
        # As in the bridge: refusals wait for the sink to commit their record.
        self.sink_task = asyncio.ensure_future(self.sink.run())
        app = web.Application(client_max_size=MAX_BODY)
        app.add_routes(AppserviceAPI(self.store, HS_TOKEN).routes())
        gate = Gate("/_bridge/antispam", GATE_TOKEN, lambda: self.policy.engine, self.sink)
        app.add_routes(gate.routes())
        self.client = TestClient(TestServer(app))
        await self.client.start_server()
        self.worker = Worker(
            self.store,
            lambda: self.config,
            lambda: self.policy.engine,
            build_registry(),
            self.services,
        )
        self.worker.tracker.joined_rooms = {MGMT, ROOM}
        for room in (MGMT, ROOM):
            await self.store.rooms.upsert(room, joined=True)

    def request(
        self, method: str, path: str, data: bytes, headers: dict[str, str]
    ) -> tuple[int, Any]:
        async def go() -> tuple[int, Any]:
            async with self.client.request(method, path, data=data, headers=headers) as r:
                raw = await r.read()
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw
                return r.status, body

        return self.run(go())

    def close(self) -> None:
        async def shut() -> None:
            if self.sink_task.done():  # it serves forever unless a record broke it
                self.sink_task.result()
            self.sink_task.cancel()
            await self.services.scheduler.stop(5.0)
            await self.sink.flush()  # gate decisions with odd strings must be storable
            await self.client.close()
            await self.store.close()

        try:
            self.run(shut())
        finally:
            self.loop.close()


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    h = Harness(tmp_path_factory.mktemp("fuzz"))
    yield h
    h.close()


@pytest.fixture(scope="module", autouse=True)
def _report_cases(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    total = sum(CASES.values())
    lines = [f"fuzz cases run: {total}"] + [f"  {k}: {v}" for k, v in sorted(CASES.items())]
    plugins = request.config.pluginmanager
    reporter = plugins.get_plugin("terminalreporter")
    capture = plugins.get_plugin("capturemanager")
    if reporter is None or capture is None:  # pragma: no cover
        print("\n".join(lines))
        return
    with capture.global_and_fixture_disabled():  # shown even when output is captured
        reporter.write_line("")
        for line in lines:
            reporter.write_line(line)


def assert_client_error_or_ok(status: int, body: Any, *, what: str) -> None:
    assert status < 500, (what, status, body)
    if status >= 400:
        assert isinstance(body, dict), (what, status, body)
        assert str(body.get("errcode", "")).startswith("M_"), (what, status, body)
        assert isinstance(body.get("error"), str), (what, status, body)


# -- strategies ----------------------------------------------------------------------------

# Every code point, lone surrogates included.
any_char = st.one_of(st.characters(), st.characters(categories=["Cs"]))
any_text = st.text(any_char, max_size=40)
long_text = st.builds(
    lambda c, n: c * n, st.sampled_from('a<"\\\u200b\U0001f600 '), st.integers(1, 10_000)
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    any_text,
)
json_values = st.recursive(
    scalars,
    lambda kids: st.one_of(st.lists(kids, max_size=5), st.dictionaries(any_text, kids, max_size=5)),
    max_leaves=25,
)
wrong = st.one_of(json_values, long_text, st.sampled_from(INJECTIONS))
event_keys = st.sampled_from(
    [
        "event_id",
        "room_id",
        "sender",
        "type",
        "content",
        "origin_server_ts",
        "state_key",
        "unsigned",
        "redacts",
    ]
)


@st.composite
def events(draw: st.DrawFn) -> dict[str, Any]:
    """Event-shaped objects with any field missing or of the wrong type."""
    ev: dict[str, Any] = {
        "event_id": f"$fuzz{draw(st.integers(0, 10**9))}:{DOMAIN}",
        "room_id": draw(st.sampled_from([ROOM, MGMT, "!other:x"])),
        "sender": draw(st.sampled_from([ADMIN, f"@joe:{DOMAIN}", "@x:remote.example"])),
        "type": draw(
            st.sampled_from(
                [
                    "m.room.message",
                    "m.room.member",
                    "m.room.server_acl",
                    "m.room.retention",
                    "m.room.encryption",
                    "m.reaction",
                    "m.space.child",
                    "m.room.create",
                    "x.custom",
                ]
            )
        ),
        "origin_server_ts": draw(st.integers(0, 2**41)),
        "content": {
            "msgtype": "m.text",
            "body": draw(st.one_of(any_text, long_text, st.sampled_from(INJECTIONS))),
        },
    }
    for key in draw(st.lists(event_keys, max_size=4)):
        ev[key] = draw(wrong)
    if draw(st.booleans()):
        ev["content"] = draw(st.one_of(wrong, st.dictionaries(any_text, wrong, max_size=4)))
    return ev


def deep(n: int, kind: str) -> bytes:
    if kind == "list":
        return b"[" * n + b"]" * n
    return b'{"a":' * n + b"1" + b"}" * n


raw_bodies = st.one_of(
    st.binary(max_size=300),  # invalid UTF-8 and friends
    st.builds(lambda n, k: deep(n, k), st.integers(1, 300_000), st.sampled_from(["list", "dict"])),
    st.builds(lambda b: json.dumps(b).encode(), json_values),
    st.sampled_from(
        [
            b'{"events": [{"event_id": "\\ud800", "content": {"body": "\\udfff x"}}]}',
            b'{"events": [{"event_id": "$s:x", "room_id": "!\\udbff:x", "sender": "@\\ud800:x"}]}',
            b'{"events": [{"event_id": "$n:x", "origin_server_ts": 1' + b"0" * 5000 + b"}]}",
            b'{"events": [{"event_id": "$f:x", "origin_server_ts": 1e999}]}',
            b'{"events": [{"event_id": "$nul\\u0000:x", "type": "m.room.message"}]}',
            b'{"events": []}',
            b'{"events": null}',
            b"\xef\xbb\xbf{}",
            b"",
            b"null",
        ]
    ),
)


def not_a_dot_segment(name: str) -> bool:
    """More than dots: "." and ".." are path steps the client resolves (never a txnId)."""
    return name.strip(".") != ""


def txn_body(draw_events: list[Any]) -> bytes:
    return json.dumps({"events": draw_events}).encode()


# -- the transaction endpoint ---------------------------------------------------------------


@settings(FUZZ, max_examples=400)
@given(
    body=st.one_of(
        raw_bodies, st.builds(txn_body, st.lists(st.one_of(events(), wrong), max_size=6))
    ),
    txn=st.one_of(
        st.text(any_char, min_size=1, max_size=30).filter(not_a_dot_segment),
        st.integers(0, 10**12).map(str),
    ),
    auth=st.sampled_from(["good", "good", "good", "none", "wrong", "empty", "basic"]),
)
def test_transaction_endpoint_never_fails_on_bad_input(
    harness: Harness, body: bytes, txn: str, auth: str
) -> None:
    CASES["transactions"] += 1
    headers = {
        "good": HS_AUTH,
        "none": {},
        "wrong": {"Authorization": "Bearer nope"},
        "empty": {"Authorization": "Bearer "},
        "basic": {"Authorization": f"Basic {HS_TOKEN}"},
    }[auth]
    path = "/_matrix/app/v1/transactions/" + quote(txn.encode("utf-8", "surrogatepass"), safe="")
    status, reply = harness.request("PUT", path, body, headers)
    assert_client_error_or_ok(status, reply, what=body[:200])
    if auth != "good":
        assert status in (401, 403)


@settings(FUZZ, max_examples=25)
@given(size=st.integers(MAX_BODY + 1, 4 * MAX_BODY), chunk=st.sampled_from([b"x", b"[", b"\xff"]))
def test_huge_bodies_are_refused_with_413(harness: Harness, size: int, chunk: bytes) -> None:
    CASES["huge bodies"] += 1
    status, reply = harness.request(
        "PUT", "/_matrix/app/v1/transactions/huge", chunk * size, HS_AUTH
    )
    assert status == 413, (status, reply)
    assert reply["errcode"] == "M_TOO_LARGE"


def test_transactions_with_odd_strings_are_stored_and_readable(harness: Harness) -> None:
    """Lone surrogates, NULs and 10k-character fields are archived and read back exactly."""
    CASES["odd strings stored"] += 1
    odd = [
        {
            "event_id": "$sur\ud800:x",
            "room_id": "!r\udfff:x",
            "sender": "@\ud800:x",
            "type": "m.room.message",
            "content": {"body": "lone \udc00 surrogate"},
        },
        {
            "event_id": "$nul:x",
            "room_id": ROOM,
            "type": "m.room.message",
            "content": {"body": "nul \x00 byte", "k\x00": 1},
        },
        {
            "event_id": "$long:x",
            "room_id": ROOM,
            "sender": "@" + "s" * 10_000,
            "type": "t" * 10_000,
            "content": {"body": "b" * 10_000},
        },
    ]
    body = json.dumps({"events": odd}).encode()
    status, reply = harness.request("PUT", "/_matrix/app/v1/transactions/odd", body, HS_AUTH)
    assert status == 200, reply

    async def read_back() -> list[dict[str, Any]]:
        return [r["data"] async for r in harness.store.reader.iter(kind="event")]

    stored = harness.run(read_back())
    for ev in odd:
        assert ev in stored


# -- the gate --------------------------------------------------------------------------------


@st.composite
def gate_calls(draw: st.DrawFn) -> tuple[str, bytes]:
    name = draw(
        st.one_of(
            st.sampled_from([*JUDGED, "ping", "user_may_create_room"]),
            st.text(
                st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="/?#%"),
                min_size=1,
                max_size=20,
            ).filter(not_a_dot_segment),
        )
    )
    shape = draw(st.integers(0, 3))
    if shape == 0:
        return name, draw(raw_bodies)
    if shape == 1:
        body: dict[str, Any] = {"event": draw(st.one_of(events(), wrong))}
    elif shape == 2:
        keys = ["inviter", "invitee", "room_id", "user", "room", "is_invited", "id"]
        body = {
            k: draw(st.one_of(st.sampled_from([ADMIN, ROOM, "@x:remote.example"]), wrong))
            for k in draw(st.lists(st.sampled_from(keys), max_size=7))
        }
    else:
        body = draw(st.dictionaries(any_text, wrong, max_size=5))
    return name, json.dumps(body).encode()


@settings(FUZZ, max_examples=500)
@given(call=gate_calls(), good_auth=st.booleans() | st.just(True))
def test_gate_endpoints_never_fail_on_bad_input(
    harness: Harness, call: tuple[str, bytes], good_auth: bool
) -> None:
    CASES["gate"] += 1
    name, body = call
    headers = GATE_AUTH if good_auth else {"Authorization": "Bearer nope"}
    status, reply = harness.request("POST", f"/_bridge/antispam/{name}", body, headers)
    assert_client_error_or_ok(status, reply, what=(name, body[:200]))
    if not good_auth:
        assert status == 403


def test_gate_decisions_about_odd_events_reach_the_archive(harness: Harness) -> None:
    """A denied event whose room, sender and type are odd strings is still audited."""
    CASES["gate odd audit"] += 1
    for sender in ("@\ud800:x", "@" + "s" * 10_000, "@nul\x00:x"):
        event = {
            "event_id": "$g:x",
            "room_id": "!\udfff:x",
            "sender": sender,
            "type": "m.room.message",
            "content": {"body": "project nightingale"},
        }
        status, reply = harness.request(
            "POST",
            "/_bridge/antispam/check_event_for_spam",
            json.dumps({"event": event}).encode(),
            GATE_AUTH,
        )
        assert status == 403 and "codename" in reply["error"], reply
    harness.run(harness.sink.flush())
    assert harness.sink.pending == 0


# -- the command parser ----------------------------------------------------------------------

REGISTRY = build_registry()
WORDS = sorted({w for spec in REGISTRY.specs for w in spec.words})
FLAGS = sorted({f"--{f.name}" for spec in REGISTRY.specs for f in spec.flags})
command_words = st.lists(
    st.one_of(
        st.sampled_from(WORDS),
        st.sampled_from(FLAGS),
        st.sampled_from(FLAGS).map(lambda f: f + "="),
        st.sampled_from(['"', "'", "\u201c", "\u2019", "\\", "--", "-", "#", "\x00"]),
        st.sampled_from(INJECTIONS),
        any_text,
    ),
    max_size=12,
).map(" ".join)


@settings(FUZZ, max_examples=2000)
@given(text=st.one_of(command_words, any_text, long_text))
def test_command_parser_raises_only_command_errors(text: str) -> None:
    CASES["command parser"] += 1
    try:
        REGISTRY.parse(tokenize(text), "!policy")
    except CommandError as e:
        assert str(e)


# -- replies never carry HTML from arguments -------------------------------------------------

ALLOWED_TAGS = {"p", "ul", "ol", "li", "br", "code", "pre", "em", "strong", "b", "i"}
TAG = re.compile(r"<\s*/?\s*([a-zA-Z][^\s/>]*)")

injected = st.one_of(
    st.sampled_from(INJECTIONS),
    st.builds(lambda a, b: a + b, st.sampled_from(INJECTIONS), any_text),
)


@st.composite
def hostile_commands(draw: st.DrawFn) -> str:
    spec = draw(st.sampled_from(REGISTRY.specs))
    parts = list(spec.words)
    for _ in spec.args:
        parts.append(json.dumps(draw(injected)))  # quoted: one argument, HTML intact
    for flag in draw(st.lists(st.sampled_from(spec.flags or (None,)), max_size=2)):
        if flag is not None:
            parts.append(f"--{flag.name}")
            if flag.value is not None:
                parts.append(json.dumps(draw(injected)))
    if draw(st.booleans()):
        parts.append(draw(injected))  # junk: "unexpected …" echoes it
    if draw(st.integers(0, 9)) == 0:
        parts = [draw(injected)]  # unknown command echoes its words
    return "!policy " + " ".join(parts)


@settings(FUZZ, max_examples=300)
@given(
    body=hostile_commands(),
    sender=st.sampled_from([ADMIN, ADMIN, f"@eve:{DOMAIN}", "@stranger:x"]),
    room=st.sampled_from([MGMT, ROOM]),
)
def test_replies_never_contain_html_from_arguments(
    harness: Harness, body: str, sender: str, room: str
) -> None:
    CASES["command replies"] += 1
    event = {
        "event_id": f"$cmd{time.time_ns()}:{DOMAIN}",
        "room_id": room,
        "sender": sender,
        "type": "m.room.message",
        "origin_server_ts": int(time.time() * 1000),
        "content": {"msgtype": "m.text", "body": body},
    }

    async def go() -> list[Any]:
        before = {a.id for a in await harness.store.actions.due(now=10**12, limit=100_000)}
        await harness.store.queue.ingest(f"cmd-{time.time_ns()}", [event])
        while await harness.worker.run_once():
            pass
        after = await harness.store.actions.due(now=10**12, limit=100_000)
        return [a for a in after if a.id not in before and a.kind == "send_notice"]

    notices = harness.run(go())
    replies = [n for n in notices if n.payload.get("reply_to") == event["event_id"]]
    assert replies, f"no reply to {body!r}"
    for n in notices:
        html = n.payload.get("html") or ""
        tags = {t.lower() for t in TAG.findall(html)}
        assert tags <= ALLOWED_TAGS, (body, html[:500])
        assert "<img" not in html.lower() and "<script" not in html.lower(), html[:500]


# -- DLP normaliser and engine ---------------------------------------------------------------

html_fragments = st.lists(
    st.one_of(
        any_text,
        st.sampled_from(
            [
                "<b>",
                "</b>",
                "<br>",
                "<p>",
                "<mx-reply>",
                "</mx-reply>",
                "<a href='x'>",
                "</a>",
                "<img alt='project nightingale'>",
                "&#x0;",
                "&#xD800;",
                "&amp;",
                "&",
                "<",
                ">",
                "<!--",
                "-->",
                "<![CDATA[",
                "<?x",
                "<",
                "\u200b",
                "\u0336",
            ]
        ),
    ),
    max_size=30,
).map("".join)


@settings(FUZZ, max_examples=1500)
@given(text=st.one_of(any_text, long_text, html_fragments, st.text(any_char, max_size=2000)))
def test_normaliser_never_raises(text: str) -> None:
    CASES["normaliser"] += 1
    c = clean(text)
    assert isinstance(c, str) and isinstance(fold(c), str)
    assert normalize(text) == fold(c)
    assert isinstance(html_to_text(text), str)


ENGINE_CONFIG: dict[str, Callable[[], Any]] = {}


def _engine() -> Any:
    if "engine" not in ENGINE_CONFIG:
        engine = build_engine(fuzz_config(Path("/tmp")))
        ENGINE_CONFIG["engine"] = lambda: engine
    return ENGINE_CONFIG["engine"]()


@settings(FUZZ, max_examples=1000)
@given(
    event=st.one_of(events(), st.dictionaries(any_text, wrong, max_size=6)),
    formatted=st.one_of(st.none(), html_fragments, wrong),
)
def test_policy_engine_never_raises(event: dict[str, Any], formatted: Any) -> None:
    CASES["policy engine"] += 1
    if formatted is not None and isinstance(event.get("content"), dict):
        event["content"]["format"] = "org.matrix.custom.html"
        event["content"]["formatted_body"] = formatted
    engine = _engine()
    verdict = engine.check_event(event)
    for finding in verdict.findings:
        assert isinstance(finding.message, str)
    if isinstance(event.get("sender"), str) and isinstance(event.get("room_id"), str):
        engine.check_invite(event["sender"], "@x:remote.example", event["room_id"])
        engine.check_local_join(event["sender"], event["room_id"], True)
        engine.check_remote_join(event["sender"], event["room_id"])
