"""Federation limits at the gate, through HTTP, with the bodies Synapse really sends.

The real ``synapse_http_antispam.HTTPAntispam`` module is instantiated with a stand-in
for Synapse's ``SimpleHttpClient`` that forwards its ``post_json_get_json`` calls to the
real :class:`bridge.http.gate.Gate` aiohttp app (real PolicyEngine, real AuditSink on a SQLite
store). So the JSON bodies are the module's own (``federated_user_may_invite`` gets the
invite event formatted by Synapse's ``format_event_for_client_v2``), and each answer is
checked twice: the raw HTTP reply (200 ``{}`` or 403 with an errcode) and what the
module makes of it for Synapse (``NOT_SPAM`` or ``(Codes.FORBIDDEN, {"error": …})``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from synapse.api.errors import Codes, HttpResponseException
from synapse.api.room_versions import RoomVersions
from synapse.events import make_event_from_dict
from synapse.module_api import NOT_SPAM
from synapse_http_antispam import HTTPAntispam

from bridge.archive.sink import AuditSink
from bridge.http.gate import Gate
from bridge.pipeline.live_policy import build_engine
from bridge.policy.engine import PolicyEngine
from bridge.store import Store
from tests.kit.config import make_config

OWN = "corp.example"
TOKEN = "gate-federation-token-xxxxxxxxxx"
BASE = "/_bridge/antispam"
BOB = f"@bob:{OWN}"
ALICE = f"@alice:{OWN}"
OUR_ROOM = f"!room:{OWN}"
STRICT_ROOM = f"!strict:{OWN}"
V12_ROOM = "!Xq3cX1YgSyGmqDZdWD9xcGC7WkUk1lA-5YbxCFIbd3A"  # no server part
CALLBACKS = [
    "user_may_invite",
    "federated_user_may_invite",
    "user_may_join_room",
    "accept_make_join",
]


class SynapseHttpClient:
    """Synapse's ``SimpleHttpClient.post_json_get_json``, served by the aiohttp test client.

    Like Synapse it raises ``HttpResponseException(code, phrase, body)`` for non-2xx.
    """

    def __init__(self, client: TestClient) -> None:
        self.client = client
        self.replies: list[tuple[str, dict[str, Any], int, Any]] = []

    async def post_json_get_json(
        self, uri: str, post_json: Any, headers: Mapping[str, list[str]] | None = None
    ) -> Any:
        path = urlsplit(uri).path
        sent = {k: v[0] for k, v in (headers or {}).items()}
        sent["Content-Type"] = "application/json"
        async with self.client.post(path, data=json.dumps(post_json), headers=sent) as r:
            raw = await r.read()
            status, phrase = r.status, r.reason or ""
        body = json.loads(raw)
        self.replies.append((path.rsplit("/", 1)[-1], post_json, status, body))
        if not 200 <= status < 300:
            raise HttpResponseException(status, phrase, raw)
        return body


class ModuleApi:
    """The slice of Synapse's ModuleApi the antispam module uses."""

    def __init__(self, http_client: SynapseHttpClient) -> None:
        self.http_client = http_client
        self.callbacks: dict[str, Any] = {}

    def register_spam_checker_callbacks(self, **callbacks: Any) -> None:
        self.callbacks.update(callbacks)


@dataclass
class Synapse:
    """The antispam module as Synapse runs it, pointed at the bridge's gate."""

    module: Any
    http: SynapseHttpClient
    store: Store
    sink: AuditSink

    def last_reply(self) -> tuple[str, dict[str, Any], int, Any]:
        return self.http.replies[-1]


def engine_for(federation: Mapping[str, Any], tmp: Path) -> PolicyEngine:
    config = make_config(
        {
            "homeserver": {"domain": OWN},
            "federation": dict(federation),
        },
        base_dir=tmp,
    )
    return build_engine(config)


@pytest.fixture
async def synapse(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Synapse]:
    engine = engine_for(request.param, tmp_path)
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'gate.db'}")
    sink = AuditSink(store)
    sink_task = asyncio.ensure_future(sink.run())
    app = web.Application()
    app.add_routes(Gate(BASE, TOKEN, lambda: engine, sink).routes())
    client = TestClient(TestServer(app))
    await client.start_server()
    http = SynapseHttpClient(client)
    api = ModuleApi(http)
    module = HTTPAntispam(
        {
            "base_url": str(client.make_url(BASE)),
            "authorization": TOKEN,
            "enabled_callbacks": CALLBACKS,
        },
        api,
    )
    assert set(api.callbacks) == set(CALLBACKS)
    try:
        yield Synapse(module, http, store, sink)
    finally:
        sink_task.cancel()
        await sink.flush()
        await client.close()
        await store.close()


def invite_event(sender: str, invitee: str, room_id: str) -> Any:
    """A federated invite as Synapse holds it (an EventBase)."""
    return make_event_from_dict(
        {
            "type": "m.room.member",
            "room_id": room_id,
            "sender": sender,
            "state_key": invitee,
            "content": {"membership": "invite", "displayname": "Bob"},
            "origin_server_ts": 1_700_000_000_000,
            "auth_events": [],
            "prev_events": [],
            "depth": 5,
            "hashes": {"sha256": "aGFzaA"},
            "signatures": {},
        },
        RoomVersions.V10,
    )


def refusal(text: str) -> tuple[Any, dict[str, str]]:
    return Codes.FORBIDDEN, {"error": text}


async def expect_allowed(s: Synapse, outcome: Any) -> None:
    assert outcome == NOT_SPAM
    _name, _body, status, reply = s.last_reply()
    assert (status, reply) == (200, {})


async def expect_denied(s: Synapse, outcome: Any, message: str) -> None:
    _name, _body, status, reply = s.last_reply()
    assert (status, reply) == (403, {"errcode": "M_FORBIDDEN", "error": message})
    assert outcome == refusal(message)


INTERNAL = {"mode": "internal"}
ALLOWLIST = {"mode": "allowlist", "servers": ["partner.example", "*.friends.example"]}
DENYLIST = {"mode": "denylist", "servers": ["evil.example", "*.bad.example"]}
MIXED = {  # an allowlist globally, one room internal
    "mode": "allowlist",
    "servers": ["partner.example"],
    "rooms": {STRICT_ROOM: {"mode": "internal"}},
}


def not_allowed(prefix: str, server: str) -> str:
    return f"{prefix}federation with {server} is not allowed by company policy"


# -- federated_user_may_invite: a remote user invites one of ours ---------------------------

FEDERATED_INVITES = [
    # (policy, inviter, room, refused server or None)
    (INTERNAL, "@x:partner.example", "!r:partner.example", "partner.example"),
    (INTERNAL, "@e:evil.example", "!r:evil.example", "evil.example"),
    (ALLOWLIST, "@p:partner.example", "!r:partner.example", None),
    (ALLOWLIST, "@f:chat.friends.example", "!r:chat.friends.example", None),
    (ALLOWLIST, "@e:evil.example", "!r:evil.example", "evil.example"),
    (ALLOWLIST, "@ip:[10.0.0.1]:8448", "!r:[10.0.0.1]:8448", "[10.0.0.1]:8448"),
    (DENYLIST, "@p:partner.example", "!r:partner.example", None),
    (DENYLIST, "@e:evil.example", "!r:evil.example", "evil.example"),
    (DENYLIST, "@b:x.bad.example", "!r:x.bad.example", "x.bad.example"),
    # the room's own scope decides: the invite names our room
    (MIXED, "@p:partner.example", OUR_ROOM, None),
    (MIXED, "@p:partner.example", STRICT_ROOM, "partner.example"),
]


@pytest.mark.parametrize(
    ("synapse", "inviter", "room", "refused"),
    FEDERATED_INVITES,
    indirect=["synapse"],
)
async def test_federated_user_may_invite(
    synapse: Synapse, inviter: str, room: str, refused: str | None
) -> None:
    event = invite_event(inviter, BOB, room)
    outcome = await synapse.module.federated_user_may_invite(event)
    name, body, _status, _reply = synapse.last_reply()
    # The body is the module's: the invite in client format, with its event ID.
    assert name == "federated_user_may_invite" and set(body) == {"event"}
    sent = body["event"]
    assert sent["event_id"] == event.event_id
    assert (sent["sender"], sent["state_key"], sent["room_id"]) == (inviter, BOB, room)
    assert sent["content"]["membership"] == "invite"
    assert "signatures" not in sent and "auth_events" not in sent
    if refused is None:
        await expect_allowed(synapse, outcome)
    else:
        if refused.startswith("["):
            message = not_allowed("invite refused: ", refused) + (
                " (servers named by an IP address are refused)"
            )
        else:
            message = not_allowed("invite refused: ", refused)
        await expect_denied(synapse, outcome, message)


# -- user_may_invite: one of ours invites someone ------------------------------------------

INVITES = [
    # (policy, invitee, room, refused server or None)
    (INTERNAL, ALICE, OUR_ROOM, None),
    (INTERNAL, "@x:partner.example", OUR_ROOM, "partner.example"),
    (ALLOWLIST, ALICE, OUR_ROOM, None),
    (ALLOWLIST, "@p:partner.example", OUR_ROOM, None),
    (ALLOWLIST, "@f:a.friends.example", OUR_ROOM, None),
    (ALLOWLIST, "@e:evil.example", OUR_ROOM, "evil.example"),
    (DENYLIST, ALICE, OUR_ROOM, None),
    (DENYLIST, "@p:partner.example", OUR_ROOM, None),
    (DENYLIST, "@e:evil.example", OUR_ROOM, "evil.example"),
    (DENYLIST, "@b:deep.x.bad.example", OUR_ROOM, "deep.x.bad.example"),
    (MIXED, "@p:partner.example", OUR_ROOM, None),
    (MIXED, "@p:partner.example", STRICT_ROOM, "partner.example"),
    (MIXED, ALICE, STRICT_ROOM, None),
]


@pytest.mark.parametrize(("synapse", "invitee", "room", "refused"), INVITES, indirect=["synapse"])
async def test_user_may_invite(
    synapse: Synapse, invitee: str, room: str, refused: str | None
) -> None:
    outcome = await synapse.module.user_may_invite(BOB, invitee, room)
    name, body, _status, _reply = synapse.last_reply()
    assert name == "user_may_invite"
    assert body == {"inviter": BOB, "invitee": invitee, "room_id": room}
    if refused is None:
        await expect_allowed(synapse, outcome)
    else:
        await expect_denied(synapse, outcome, not_allowed("cannot invite: ", refused))


# -- user_may_join_room: one of ours joins a room --------------------------------------------

JOINS = [
    # (policy, room, is_invited, refused server or None)
    (INTERNAL, OUR_ROOM, False, None),
    (INTERNAL, V12_ROOM, False, None),  # a v12 room ID names no server: no decision
    (INTERNAL, "!r:partner.example", True, "partner.example"),
    (ALLOWLIST, "!r:partner.example", True, None),
    (ALLOWLIST, "!r:evil.example", False, "evil.example"),
    (ALLOWLIST, "!r:evil.example", True, "evil.example"),  # an invite does not help
    (DENYLIST, "!r:partner.example", False, None),
    (DENYLIST, "!r:evil.example", True, "evil.example"),
    (DENYLIST, OUR_ROOM, False, None),
]


@pytest.mark.parametrize(("synapse", "room", "is_invited", "refused"), JOINS, indirect=["synapse"])
async def test_user_may_join_room(
    synapse: Synapse, room: str, is_invited: bool, refused: str | None
) -> None:
    outcome = await synapse.module.user_may_join_room(BOB, room, is_invited)
    name, body, _status, _reply = synapse.last_reply()
    assert name == "user_may_join_room"
    assert body == {"user": BOB, "room": room, "is_invited": is_invited}
    if refused is None:
        await expect_allowed(synapse, outcome)
    else:
        await expect_denied(synapse, outcome, not_allowed("cannot join: ", refused))


# -- accept_make_join: a remote user asks to join one of our rooms ---------------------------

REMOTE_JOINS = [
    # (policy, user, room, refused server or None)
    (INTERNAL, "@p:partner.example", OUR_ROOM, "partner.example"),
    (ALLOWLIST, "@p:partner.example", OUR_ROOM, None),
    (ALLOWLIST, "@e:evil.example", OUR_ROOM, "evil.example"),
    (DENYLIST, "@p:partner.example", OUR_ROOM, None),
    (DENYLIST, "@b:x.bad.example", OUR_ROOM, "x.bad.example"),
    (MIXED, "@p:partner.example", STRICT_ROOM, "partner.example"),
]


@pytest.mark.parametrize(("synapse", "user", "room", "refused"), REMOTE_JOINS, indirect=["synapse"])
async def test_accept_make_join(
    synapse: Synapse, user: str, room: str, refused: str | None
) -> None:
    outcome = await synapse.module.accept_make_join(user, room)
    name, body, _status, _reply = synapse.last_reply()
    assert name == "accept_make_join" and body == {"user": user, "room": room}
    if refused is None:
        await expect_allowed(synapse, outcome)
    else:
        await expect_denied(synapse, outcome, not_allowed("cannot join: ", refused))


# -- refusals are audited --------------------------------------------------------------------


@pytest.mark.parametrize("synapse", [ALLOWLIST], indirect=True)
async def test_refusals_are_audited_and_allowed_calls_are_not(synapse: Synapse) -> None:
    await synapse.module.user_may_invite(BOB, "@p:partner.example", OUR_ROOM)
    await synapse.module.federated_user_may_invite(
        invite_event("@e:evil.example", BOB, "!r:evil.example")
    )
    await synapse.module.user_may_join_room(BOB, "!r:evil.example", True)
    await synapse.sink.flush()
    records = [r async for r in synapse.store.reader.iter(kind="gate")]
    assert [(r["data"]["callback"], r["data"]["decision"]) for r in records] == [
        ("federated_user_may_invite", "deny"),
        ("user_may_join_room", "deny"),
    ]
    assert records[0]["sender"] == "@e:evil.example"
    assert records[0]["data"]["findings"][0]["rule"] == "federation:allowlist"
    assert records[1]["sender"] == BOB and records[1]["room_id"] == "!r:evil.example"


@pytest.mark.parametrize("synapse", [INTERNAL], indirect=True)
async def test_a_wrong_token_is_refused_and_the_module_denies(synapse: Synapse) -> None:
    synapse.module._headers = {"Authorization": ["Bearer wrong"]}
    outcome = await synapse.module.user_may_invite(BOB, ALICE, OUR_ROOM)
    _name, _body, status, reply = synapse.last_reply()
    assert (status, reply["errcode"]) == (403, "M_FORBIDDEN")
    assert outcome == refusal("invalid gate token")
