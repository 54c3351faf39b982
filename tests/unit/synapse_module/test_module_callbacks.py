"""The Synapse module's callbacks against a fake gate: what is sent, what Synapse gets back,
the fail modes, the refusal to load on a Synapse lacking a callback, and logs without text."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote, unquote

import pytest
from policy_bridge_synapse.config import parse_module_config
from policy_bridge_synapse.module import UNREACHABLE, PolicyBridgeModule
from policy_bridge_synapse.transport import Reply
from synapse.api.room_versions import RoomVersions
from synapse.events import make_event_from_dict
from synapse.logging.context import ContextRequest, LoggingContext
from synapse.media._base import FileInfo, ThumbnailInfo
from synapse.media.media_storage import ReadableFileWrapper
from synapse.module_api import NOT_SPAM
from synapse.module_api.errors import Codes, ConfigError
from synapse.types import RoomAlias

SECRET = "kingfisher-7f3a-marker"
BASE = "http://gate.test/_bridge/antispam"


class FakeApi:
    """The part of Synapse's ModuleApi the module uses, with 1.163's registration signature."""

    def __init__(self) -> None:
        self.callbacks: dict[str, Any] = {}

    def register_spam_checker_callbacks(
        self,
        *,
        check_event_for_spam: Any = None,
        should_drop_federated_event: Any = None,
        user_may_join_room: Any = None,
        user_may_invite: Any = None,
        federated_user_may_invite: Any = None,
        user_may_send_3pid_invite: Any = None,
        user_may_create_room: Any = None,
        user_may_create_room_alias: Any = None,
        user_may_publish_room: Any = None,
        user_may_send_state_event: Any = None,
        check_username_for_spam: Any = None,
        check_registration_for_spam: Any = None,
        check_media_file_for_spam: Any = None,
        check_login_for_spam: Any = None,
    ) -> None:
        given = {k: v for k, v in locals().items() if k != "self" and v is not None}
        self.callbacks.update(given)

    async def sleep(self, seconds: float) -> None:
        return None


class OldApi:
    """A Synapse before 1.132: no user_may_send_state_event."""

    def __init__(self) -> None:
        self.callbacks: dict[str, Any] = {}

    def register_spam_checker_callbacks(
        self,
        *,
        check_event_for_spam: Any = None,
        user_may_invite: Any = None,
        user_may_create_room: Any = None,
        check_media_file_for_spam: Any = None,
    ) -> None:
        self.callbacks.update({"check_event_for_spam": check_event_for_spam})


class FakeTransport:
    """Records requests; answers from a queue (a Reply, or an exception to raise)."""

    def __init__(self, *answers: Reply | Exception) -> None:
        self.answers = list(answers)
        self.requests: list[tuple[str, dict[str, str], bytes, float]] = []

    async def post(
        self, url: str, headers: Mapping[str, str], body: bytes | BinaryIO, time_limit: float
    ) -> Reply:
        data = body if isinstance(body, bytes) else body.read()
        self.requests.append((url, dict(headers), data, time_limit))
        answer = self.answers.pop(0) if self.answers else Reply(200, b"{}")
        if isinstance(answer, Exception):
            raise answer
        return answer

    def last_json(self) -> Any:
        return json.loads(self.requests[-1][2])


def deny(errcode: str = "M_FORBIDDEN", error: str = "blocked by rule dlp:x") -> Reply:
    return Reply(403, json.dumps({"errcode": errcode, "error": error}).encode())


def make(
    *answers: Reply | Exception, api: Any = None, version: str = "1.163.2", **options: Any
) -> tuple[PolicyBridgeModule, FakeTransport, Any]:
    config = parse_module_config({"base_url": BASE, "authorization": "tok", **options})
    transport = FakeTransport(*answers)
    api = api or FakeApi()
    module = PolicyBridgeModule(config, api, transport=transport, synapse_version=version)
    return module, transport, api


def message_event() -> Any:
    return make_event_from_dict(
        {
            "type": "m.room.message",
            "room_id": "!r:corp.example",
            "sender": "@alice:corp.example",
            "content": {"msgtype": "m.text", "body": f"the code is {SECRET}"},
            "origin_server_ts": 1,
            "auth_events": [],
            "prev_events": [],
            "depth": 3,
            "hashes": {"sha256": "x"},
            "signatures": {},
        },
        RoomVersions.V10,
    )


def test_registers_the_configured_callbacks() -> None:
    _, _, api = make()
    assert set(api.callbacks) == {
        "check_event_for_spam",
        "user_may_invite",
        "federated_user_may_invite",
        "user_may_join_room",
        "user_may_create_room",
        "user_may_send_state_event",
        "check_media_file_for_spam",
        "user_may_create_room_alias",
    }
    _, _, api = make(enabled_callbacks=["user_may_invite"])
    assert set(api.callbacks) == {"user_may_invite"}


def test_refuses_to_load_without_a_callback() -> None:
    with pytest.raises(ConfigError) as e:
        make(api=OldApi())
    assert "user_may_send_state_event: this Synapse (1.163.2) has no such" in e.value.msg
    assert "user_may_join_room" in e.value.msg
    with pytest.raises(ConfigError) as e:
        make(enabled_callbacks=["accept_make_join"])
    assert "accept_make_join: this Synapse (1.163.2) has no such spam-checker callback" in (
        e.value.msg
    )
    with pytest.raises(ConfigError) as e:
        make(version="1.131.0", enabled_callbacks=["user_may_create_room"])
    assert "does not pass the full context (needs Synapse 1.132 or later)" in e.value.msg
    # What this Synapse has loads fine, whatever its version.
    make(api=OldApi(), version="1.120.0", enabled_callbacks=["check_event_for_spam"])


async def test_event_is_sent_in_client_format_and_refusal_reaches_synapse() -> None:
    module, transport, _ = make(deny())
    result = await module.check_event_for_spam(message_event())
    assert result == (Codes.FORBIDDEN, {"error": "blocked by rule dlp:x"})
    url, headers, _, limit = transport.requests[0]
    assert url == f"{BASE}/check_event_for_spam"
    assert headers["Authorization"] == "Bearer tok"
    assert headers["Content-Type"] == "application/json"
    assert limit == 10
    event = transport.last_json()["event"]
    assert event["content"]["body"] == f"the code is {SECRET}"
    assert event["event_id"].startswith("$")
    assert {"auth_events", "prev_events", "hashes", "signatures", "depth"}.isdisjoint(event)
    assert await module.check_event_for_spam(message_event()) == NOT_SPAM


async def test_bodies_of_each_callback() -> None:
    module, transport, _ = make()
    assert await module.user_may_invite("@a:x", "@b:y", "!r:x") == NOT_SPAM
    assert transport.last_json() == {"inviter": "@a:x", "invitee": "@b:y", "room_id": "!r:x"}
    assert await module.user_may_join_room("@a:x", "!r:x", True) == NOT_SPAM
    assert transport.last_json() == {"user": "@a:x", "room": "!r:x", "is_invited": True}
    room_config = {"name": "n", "initial_state": [{"type": "m.room.encryption", "content": {}}]}
    assert await module.user_may_create_room("@a:x", room_config) == NOT_SPAM
    assert transport.last_json() == {"user_id": "@a:x", "room_config": room_config}
    assert (
        await module.user_may_send_state_event("@a:x", "!r:x", "m.room.topic", "", {"topic": "t"})
        == NOT_SPAM
    )
    assert transport.last_json() == {
        "user_id": "@a:x",
        "room_id": "!r:x",
        "event_type": "m.room.topic",
        "state_key": "",
        "content": {"topic": "t"},
    }
    alias = RoomAlias.from_string("#launch:x")
    assert await module.user_may_create_room_alias("@a:x", alias) == NOT_SPAM
    assert transport.last_json() == {"user_id": "@a:x", "room_alias": "#launch:x"}
    assert [r[0].rsplit("/", 1)[1] for r in transport.requests] == [
        "user_may_invite",
        "user_may_join_room",
        "user_may_create_room",
        "user_may_send_state_event",
        "user_may_create_room_alias",
    ]


async def test_state_event_refusal_is_a_code_only() -> None:
    """Synapse 1.163 takes only a Codes from user_may_send_state_event."""
    module, _, _ = make(deny("M_FORBIDDEN"), deny("M_NOT_A_CODE_WE_KNOW"))
    args = ("@a:x", "!r:x", "m.room.topic", "", {"topic": "t"})
    assert await module.user_may_send_state_event(*args) is Codes.FORBIDDEN
    assert await module.user_may_send_state_event(*args) is Codes.FORBIDDEN


async def test_errcodes_map_to_synapse_codes() -> None:
    module, _, _ = make(deny("M_TOO_LARGE", "too big"), Reply(400, b'{"error": 5}'))
    assert await module.user_may_invite("@a:x", "@b:y", "!r") == (
        Codes.TOO_LARGE,
        {"error": "too big"},
    )
    assert await module.user_may_invite("@a:x", "@b:y", "!r") == (
        Codes.FORBIDDEN,
        {"error": "refused by policy"},
    )


@pytest.mark.parametrize(
    "failure",
    [
        ConnectionRefusedError("refused"),
        TimeoutError(),
        Reply(500, b'{"errcode": "M_UNKNOWN", "error": "boom"}'),
        Reply(200, b"not json"),
        Reply(403, b"<html>forbidden</html>"),
    ],
)
async def test_fail_modes_per_callback(failure: Reply | Exception) -> None:
    # Defaults: check_event_for_spam fails open, everything else closed.
    module, _, _ = make(failure, failure, failure)
    assert await module.check_event_for_spam(message_event()) == NOT_SPAM
    refused = (Codes.UNKNOWN, {"error": UNREACHABLE})
    assert await module.user_may_create_room("@a:x", {"name": SECRET}) == refused
    assert (
        await module.user_may_send_state_event("@a:x", "!r", "m.room.topic", "", {})
        is Codes.UNKNOWN
    )
    # Configured the other way round.
    module, _, _ = make(
        failure,
        failure,
        fail_open={"check_event_for_spam": False, "user_may_create_room": True},
    )
    assert await module.check_event_for_spam(message_event()) == refused
    assert await module.user_may_create_room("@a:x", {"name": SECRET}) == NOT_SPAM


async def test_logs_never_hold_content(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    module, _, _ = make(
        deny(error=f"refused: {SECRET}"),
        ConnectionRefusedError(f"cannot reach {SECRET}"),
        Reply(500, SECRET.encode()),
        Reply(200, b"{}"),
    )
    await module.check_event_for_spam(message_event())
    await module.user_may_create_room("@a:x", {"topic": SECRET})
    await module.user_may_send_state_event("@a:x", "!r", "m.room.name", "", {"name": SECRET})
    await module.user_may_invite("@a:x", f"@{SECRET}:y", "!r")
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert SECRET not in text
    assert "gate refused check_event_for_spam (HTTP 403, M_FORBIDDEN" in text
    assert "gate call user_may_create_room failed after" in text
    assert "ConnectionRefusedError; failing closed (refused)" in text
    assert "HttpStatus (HTTP 500); failing closed" in text
    assert all(r.exc_info is None for r in caplog.records)


def media(tmp_path: Path, data: bytes) -> ReadableFileWrapper:
    path = tmp_path / "file"
    path.write_bytes(data)
    return ReadableFileWrapper(clock=None, path=str(path))  # type: ignore[arg-type]


def thumbnail() -> ThumbnailInfo:
    return ThumbnailInfo(width=32, height=32, method="scale", type="image/png", length=4)


async def test_media_is_streamed_with_the_contract_headers(tmp_path: Path) -> None:
    module, transport, _ = make(Reply(200, b"{}"), deny(error="card number in upload"))
    data = b"%PDF-1.7 " + bytes(range(256)) * 10
    info = FileInfo(server_name=None, file_id="abcDEF123")
    assert await module.check_media_file_for_spam(media(tmp_path, data), info) == NOT_SPAM
    url, headers, body, limit = transport.requests[0]
    assert url == f"{BASE}/check_media_file_for_spam"
    assert body == data
    assert limit == 60
    assert headers["Content-Type"] == "application/octet-stream"
    assert headers["Authorization"] == "Bearer tok"
    assert headers["X-Bridge-Media-Kind"] == "upload"
    assert headers["X-Bridge-Media-Id"] == "abcDEF123"
    assert headers["X-Bridge-Media-Length"] == str(len(data))
    assert "X-Bridge-Media-Over-Limit" not in headers
    remote = FileInfo(server_name="other.example", file_id="rem1")
    assert await module.check_media_file_for_spam(media(tmp_path, b"x"), remote) == (
        Codes.FORBIDDEN,
        {"error": "card number in upload"},
    )
    assert transport.requests[1][1]["X-Bridge-Media-Kind"] == "remote"


async def test_media_over_limit_is_announced_with_an_empty_body(tmp_path: Path) -> None:
    module, transport, _ = make(media_max_bytes=100, media_timeout=5)
    info = FileInfo(server_name=None, file_id="big")
    assert await module.check_media_file_for_spam(media(tmp_path, b"a" * 101), info) == NOT_SPAM
    _, headers, body, limit = transport.requests[0]
    assert body == b""
    assert headers["X-Bridge-Media-Over-Limit"] == "1"
    assert headers["X-Bridge-Media-Length"] == "101"
    assert limit == 5
    assert await module.check_media_file_for_spam(media(tmp_path, b"a" * 100), info) == NOT_SPAM
    assert transport.requests[1][2] == b"a" * 100


async def test_media_by_path_sends_the_path_and_no_bytes(tmp_path: Path) -> None:
    module, transport, _ = make(deny(error="card number in upload"), media_delivery="path")
    store = tmp_path / "media store"
    store.mkdir()
    info = FileInfo(server_name=None, file_id="abc")
    wrapper = media(store, b"%PDF-1.7 card")
    assert await module.check_media_file_for_spam(wrapper, info) == (
        Codes.FORBIDDEN,
        {"error": "card number in upload"},
    )
    [(_, headers, body, _)] = transport.requests
    assert body == b""
    assert headers["X-Bridge-Media-Path"] == str(store / "file").replace(" ", "%20")
    assert headers["X-Bridge-Media-Length"] == "13"


async def test_media_by_path_falls_back_to_the_bytes_when_the_gate_cannot_read_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    unreadable = Reply(409, b'{"errcode": "BRIDGE_MEDIA_PATH_UNREADABLE", "error": "no store"}')
    module, transport, _ = make(unreadable, Reply(200, b"{}"), media_delivery="path")
    info = FileInfo(server_name=None, file_id="abc")
    with caplog.at_level(logging.INFO, logger="policy_bridge_synapse"):
        assert await module.check_media_file_for_spam(media(tmp_path, b"%PDF-x"), info) == NOT_SPAM
    first, second = transport.requests
    assert first[2] == b"" and "X-Bridge-Media-Path" in first[1]
    assert second[2] == b"%PDF-x" and "X-Bridge-Media-Path" not in second[1]
    assert "shared_media_store" in caplog.text
    # Any other 409 is a refusal, not a request for the bytes.
    other = Reply(409, b'{"errcode": "M_FORBIDDEN", "error": "no"}')
    module, transport, _ = make(other, media_delivery="path")
    assert await module.check_media_file_for_spam(media(tmp_path, b"x"), info) == (
        Codes.FORBIDDEN,
        {"error": "no"},
    )
    assert len(transport.requests) == 1


async def test_media_over_limit_by_path_is_still_announced_without_a_path(tmp_path: Path) -> None:
    module, transport, _ = make(media_max_bytes=3, media_delivery="path")
    info = FileInfo(server_name=None, file_id="big")
    assert await module.check_media_file_for_spam(media(tmp_path, b"abcd"), info) == NOT_SPAM
    [(_, headers, body, _)] = transport.requests
    assert headers["X-Bridge-Media-Over-Limit"] == "1" and "X-Bridge-Media-Path" not in headers
    assert body == b""


def request_context(requester: str | None, url: str = "/_matrix/media/v3/upload") -> LoggingContext:
    """The logging context Synapse runs a request's handlers in, with its requester."""
    request = ContextRequest(
        request_id="POST-1",
        ip_address="127.0.0.1",
        site_tag="client",
        requester=requester,
        authenticated_entity=requester,
        method="POST",
        url=url,
        protocol="1.1",
        user_agent="test",
    )
    return LoggingContext(name="POST-1", server_name="corp.example", request=request)


async def test_media_names_the_user_whose_request_it_is(tmp_path: Path) -> None:
    module, transport, _ = make()
    info = FileInfo(server_name=None, file_id="abc")
    with request_context("@alice:corp.example"):
        await module.check_media_file_for_spam(media(tmp_path, b"%PDF-x"), info)
    with request_context(None):
        await module.check_media_file_for_spam(media(tmp_path, b"%PDF-x"), info)
    await module.check_media_file_for_spam(media(tmp_path, b"%PDF-x"), info)  # no request
    assert transport.requests[0][1]["X-Bridge-Media-User"] == "@alice:corp.example"
    assert "X-Bridge-Media-User" not in transport.requests[1][1]
    assert "X-Bridge-Media-User" not in transport.requests[2][1]


async def test_an_uploads_file_name_is_sent_and_a_long_one_cut_and_flagged(
    tmp_path: Path,
) -> None:
    module, transport, _ = make()
    upload = FileInfo(server_name=None, file_id="abc")
    remote = FileInfo(server_name="other.example", file_id="abc")
    url = "/_matrix/media/v3/upload?filename=Q3%20card%204111%C3%A9.pdf&access_token=<redacted>"
    with request_context("@alice:corp.example", url):
        await module.check_media_file_for_spam(media(tmp_path, b"x"), upload)
        await module.check_media_file_for_spam(media(tmp_path, b"x"), remote)
    long_name = "é" * 3000  # 6 encoded bytes each: over the header's bound
    with request_context("@alice:corp.example", f"/upload?filename={quote(long_name)}"):
        await module.check_media_file_for_spam(media(tmp_path, b"x"), upload)
    first, second, third = (headers for _, headers, _, _ in transport.requests)
    assert unquote(first["X-Bridge-Media-Name"]) == "Q3 card 4111é.pdf"
    assert "X-Bridge-Media-Name-Truncated" not in first
    assert "X-Bridge-Media-Name" not in second  # remote media: no name of the user's
    assert third["X-Bridge-Media-Name-Truncated"] == "1"
    assert len(third["X-Bridge-Media-Name"]) <= 6000
    assert long_name.startswith(unquote(third["X-Bridge-Media-Name"]))


async def test_media_kinds_skipped_and_chosen(tmp_path: Path) -> None:
    module, transport, _ = make()
    thumb = FileInfo(server_name=None, file_id="t", thumbnail=thumbnail())
    preview = FileInfo(server_name=None, file_id="p", url_cache=True)
    assert await module.check_media_file_for_spam(media(tmp_path, b"x"), thumb) == NOT_SPAM
    assert await module.check_media_file_for_spam(media(tmp_path, b"x"), preview) == NOT_SPAM
    assert transport.requests == []
    module, transport, _ = make(media_kinds=["thumbnail", "url_preview"])
    await module.check_media_file_for_spam(media(tmp_path, b"x"), thumb)
    await module.check_media_file_for_spam(media(tmp_path, b"x"), preview)
    upload = FileInfo(server_name=None, file_id="u")
    await module.check_media_file_for_spam(media(tmp_path, b"x"), upload)
    assert [r[1]["X-Bridge-Media-Kind"] for r in transport.requests] == [
        "thumbnail",
        "url_preview",
    ]


async def test_media_fails_closed_by_default(tmp_path: Path) -> None:
    module, _, _ = make(ConnectionRefusedError())
    info = FileInfo(server_name=None, file_id="u")
    assert await module.check_media_file_for_spam(media(tmp_path, b"x"), info) == (
        Codes.UNKNOWN,
        {"error": UNREACHABLE},
    )
    gone = ReadableFileWrapper(clock=None, path=str(tmp_path / "absent"))  # type: ignore[arg-type]
    assert await module.check_media_file_for_spam(gone, info) == (
        Codes.UNKNOWN,
        {"error": UNREACHABLE},
    )
    module, _, _ = make(ConnectionRefusedError(), fail_open={"check_media_file_for_spam": True})
    assert await module.check_media_file_for_spam(media(tmp_path, b"x"), info) == NOT_SPAM


class EchoTransport(FakeTransport):
    """Answers a ping with its id after a failure and a wrong answer."""

    async def post(
        self, url: str, headers: Mapping[str, str], body: bytes | BinaryIO, time_limit: float
    ) -> Reply:
        assert isinstance(body, bytes)
        self.requests.append((url, dict(headers), body, time_limit))
        if len(self.requests) == 1:
            raise ConnectionRefusedError()
        if len(self.requests) == 2:
            return Reply(200, b'{"id": "other", "status": "ok"}')
        return Reply(200, json.dumps({**json.loads(body), "status": "ok"}).encode())


async def test_ping_at_start_until_answered(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    config = parse_module_config({"base_url": BASE, "authorization": "tok", "do_ping": True})
    transport = EchoTransport()
    PolicyBridgeModule(config, FakeApi(), transport=transport, synapse_version="1.163.2")
    assert [r[0] for r in transport.requests] == [f"{BASE}/ping"] * 3
    text = caplog.text
    assert "gate ping failed: ConnectionRefusedError; retrying" in text
    assert "gate ping got an unexpected answer (HTTP 200); retrying" in text
    assert "gate ping answered (HTTP 200)" in text
