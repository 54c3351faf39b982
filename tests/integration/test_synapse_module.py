"""The project's Synapse module in a real Synapse, in front of the real bridge.

Room creation judged as a whole (encryption, DLP of the initial topic, invites to excluded
servers), state events judged with their content, the per-callback fail modes with the
bridge down (and Synapse's log without any message text), and compatibility: the same bridge
behind synapse-http-antispam. Every user here is an ordinary user: Synapse skips
user_may_create_room, user_may_invite and user_may_send_state_event for its server admins.
"""

from __future__ import annotations

import asyncio
import secrets
import signal
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from matrix_client import MatrixError, MatrixTestClient, wait_for
from synapse_fixtures import require_synapse, start_test_synapse

from bridge.dev.devstack import BridgeProcess, DevStack, prepare_stack
from bridge.dev.devsynapse import GateModule, free_port

pytestmark = pytest.mark.integration

SERVER = "localhost"
ENCRYPTION = {
    "type": "m.room.encryption",
    "state_key": "",
    "content": {"algorithm": "m.megolm.v1.aes-sha2"},
}
RULES: dict[str, Any] = {
    "dlp": {"keywords": [{"name": "codenames", "keywords": ["kingfisher"]}]},
    "federation": {"mode": "denylist", "servers": ["evil.example"]},
}
UNREACHABLE = "the policy service could not check this request; try again later"


@dataclass
class Running:
    dev: DevStack
    bridge: BridgeProcess
    alice: tuple[str, str]
    bob: tuple[str, str]

    def client(self, who: tuple[str, str]) -> MatrixTestClient:
        return MatrixTestClient(self.dev.synapse.url, who[0], who[1])

    def metric(self, callback: str, result: str) -> float:
        with urllib.request.urlopen(f"{self.dev.bridge_url}/metrics", timeout=5) as r:
            text = r.read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith("bridge_gate_decisions_total{") and (
                f'callback="{callback}"' in line and f'result="{result}"' in line
            ):
                total += float(line.rsplit(" ", 1)[1])
        return total


def start(workdir: Path, **options: Any) -> Running:
    dev = prepare_stack(workdir, bridge_options=RULES, **options)
    dev.synapse.start()
    alice = dev.synapse.register_user("alice", "alice-pw")
    bob = dev.synapse.register_user("bob", "bob-pw")
    bridge = BridgeProcess(dev.config_path, workdir / "bridge.log", dev.bridge_port)
    try:
        bridge.start()
    except Exception:
        dev.synapse.stop()
        raise
    return Running(dev, bridge, alice, bob)


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    require_synapse()
    run = start(
        tmp_path_factory.mktemp("module-stack"),
        fail_open={"user_may_send_state_event": True},
        module_options={"timeout": 3},
    )
    try:
        yield run
    finally:
        run.bridge.stop()
        run.dev.synapse.stop()


async def test_module_is_loaded(running: Running) -> None:
    log = running.dev.synapse.log_path.read_text("utf-8")
    assert "policy bridge module: forwarding check_event_for_spam" in log
    assert "user_may_create_room, user_may_send_state_event" in log


async def test_encrypted_dm_allowed_then_refused_where_encryption_is_forbidden(
    running: Running,
) -> None:
    dm = {"preset": "trusted_private_chat", "is_direct": True, "invite": [running.bob[0]]}
    async with running.client(running.alice) as alice:
        # Encryption is not forbidden globally: an encrypted DM is created as Element makes it.
        room = await alice.create_room(initial_state=[ENCRYPTION], **dm)
        assert (await alice.get_state(room, "m.room.encryption"))["algorithm"]

        running.dev.set_bridge_options("dlp", {"forbid_encryption": True})
        assert running.bridge.proc is not None
        running.bridge.proc.send_signal(signal.SIGHUP)

        async def refused() -> MatrixError | None:
            try:
                await alice.create_room(initial_state=[ENCRYPTION], **dm)
            except MatrixError as e:
                return e
            return None

        err = await wait_for(refused, timeout=20, message="the reload to take effect")
        assert err.status == 403 and err.errcode == "M_FORBIDDEN"
        assert "Create the room without encryption" in err.error
        # The same DM without encryption is fine.
        await alice.create_room(**dm)
    running.dev.set_bridge_options("dlp", {"forbid_encryption": False})
    running.bridge.proc.send_signal(signal.SIGHUP)


async def test_a_named_predecessor_lends_no_exception_and_upgrades_are_judged(
    running: Running,
) -> None:
    """Encryption forbidden globally, allowed in one room by exception: bob names that room as
    the ``predecessor`` of a new encrypted room (Synapse lets any createRoom body do so) and
    is refused; a real upgrade of an encrypted room is judged too (Synapse sends
    user_may_create_room a synthesised body with the copied m.room.encryption)."""
    assert running.bridge.proc is not None
    async with running.client(running.alice) as alice, running.client(running.bob) as bob:

        async def encrypted_room() -> str | None:
            try:  # an earlier test's reload (encryption allowed again) may still be on its way
                return await alice.create_room(name="lax", initial_state=[ENCRYPTION])
            except MatrixError:
                return None

        lax = await wait_for(encrypted_room, timeout=20, message="encryption to be allowed")
        running.dev.set_bridge_options(
            "dlp", {"forbid_encryption": True, "rooms": {lax: {"forbid_encryption": False}}}
        )
        running.bridge.proc.send_signal(signal.SIGHUP)

        async def refused_plain() -> MatrixError | None:
            try:
                await bob.create_room(initial_state=[ENCRYPTION])
            except MatrixError as e:
                return e
            return None

        await wait_for(refused_plain, timeout=20, message="the reload to take effect")
        spoof = {"predecessor": {"room_id": lax}}
        with pytest.raises(MatrixError) as err:
            await bob.create_room(creation_content=spoof, initial_state=[ENCRYPTION])
        assert err.value.status == 403
        assert "rules of its own" in err.value.error  # and the encryption (unit tests)
        # The real upgrade would leave the room's own rules behind (they are keyed by its ID),
        # and make an encrypted room in the global scope: refused too.
        with pytest.raises(MatrixError) as err:
            await alice.request(
                "POST", f"/_matrix/client/v3/rooms/{lax}/upgrade", {"new_version": "12"}
            )
        assert err.value.status == 403 and "rules of its own" in err.value.error
    running.dev.set_bridge_options("dlp", {"forbid_encryption": False, "rooms": {}})
    running.bridge.proc.send_signal(signal.SIGHUP)


async def test_initial_topic_with_a_keyword_is_refused(running: Running) -> None:
    before = running.metric("user_may_create_room", "deny")
    async with running.client(running.alice) as alice:
        with pytest.raises(MatrixError) as err:
            await alice.create_room(name="plans", topic="the kingfisher launch")
        assert err.value.status == 403
        assert "keyword:codenames" in err.value.error
        with pytest.raises(MatrixError):
            await alice.create_room(
                initial_state=[{"type": "m.room.topic", "content": {"topic": "kingfisher"}}]
            )
        await alice.create_room(name="plans", topic="the launch")
    assert running.metric("user_may_create_room", "deny") == before + 2


async def test_invite_of_an_excluded_server_in_create_room_is_refused(running: Running) -> None:
    async with running.client(running.alice) as alice:
        with pytest.raises(MatrixError) as err:
            await alice.create_room(name="partners", invite=["@eve:evil.example"])
        assert err.value.status == 403
        assert "evil.example" in err.value.error
        rooms = await alice.request("GET", "/_matrix/client/v3/joined_rooms")
        names = []
        for room in rooms["joined_rooms"]:
            state = await alice.get_state(room, "m.room.name")
            names.append((state or {}).get("name"))
        assert "partners" not in names  # refused before the room existed


async def test_state_event_with_a_keyword_is_refused(running: Running) -> None:
    before = running.metric("user_may_send_state_event", "deny")
    async with running.client(running.alice) as alice:
        room = await alice.create_room(name="state")
        with pytest.raises(MatrixError) as err:
            await alice.send_state(room, "m.room.topic", "", {"topic": "kingfisher soon"})
        assert err.value.status == 403 and err.value.errcode == "M_FORBIDDEN"
        await alice.send_state(room, "m.room.topic", "", {"topic": "soon"})
        assert (await alice.get_state(room, "m.room.topic"))["topic"] == "soon"
    # Refused by user_may_send_state_event (Synapse passes on its code, not the text).
    assert running.metric("user_may_send_state_event", "deny") == before + 1


async def test_an_alias_with_a_keyword_is_refused(running: Running) -> None:
    """PUT /directory/room/{alias} reaches the gate (user_may_create_room_alias)."""
    async with running.client(running.alice) as alice:
        room = await alice.create_room(name="aliases")
        with pytest.raises(MatrixError) as err:
            await alice.request(
                "PUT",
                f"/_matrix/client/v3/directory/room/%23kingfisher-launch:{SERVER}",
                {"room_id": room},
            )
        assert err.value.status == 403 and "keyword:codenames" in err.value.error
        await alice.request(
            "PUT", f"/_matrix/client/v3/directory/room/%23launch:{SERVER}", {"room_id": room}
        )


async def test_bridge_down_fails_per_callback_and_synapse_logs_no_text(
    running: Running,
) -> None:
    """Runs last: stops the bridge. check_event_for_spam (default) and
    user_may_send_state_event (configured) fail open; room creation and invites closed."""
    marker = "marker-" + secrets.token_hex(12)
    async with running.client(running.alice) as alice:
        room = await alice.create_room(name="before the outage")
        assert running.bridge.stop() == 0
        await alice.send_text(room, f"message text {marker}")
        await alice.send_state(room, "m.room.topic", "", {"topic": f"topic {marker}"})
        with pytest.raises(MatrixError) as err:
            await alice.create_room(name=f"name {marker}", topic=f"topic {marker}")
        assert (err.value.status, err.value.errcode, err.value.error) == (
            403,
            "M_UNKNOWN",
            UNREACHABLE,
        )
        with pytest.raises(MatrixError) as err:
            await alice.invite(room, running.bob[0])
        assert err.value.errcode == "M_UNKNOWN"
        bodies = [e["content"].get("body") for e in await alice.messages(room, 10)]
        assert f"message text {marker}" in bodies
    await asyncio.sleep(0.5)  # let Synapse flush its log
    log = running.dev.synapse.log_path.read_text("utf-8")
    assert marker not in log
    assert "gate call user_may_create_room failed after" in log
    assert "failing closed (refused)" in log and "failing open (allowed)" in log


@pytest.fixture(scope="module")
def antispam_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    require_synapse(antispam=True)
    run = start(tmp_path_factory.mktemp("antispam-stack"), gate_module=GateModule.HTTP_ANTISPAM)
    try:
        yield run
    finally:
        run.bridge.stop()
        run.dev.synapse.stop()


async def test_compatible_with_synapse_http_antispam(antispam_stack: Running) -> None:
    """The same gate behind synapse-http-antispam: messages and invites judged as before;
    room creation (its module forwards the user alone) is not judged."""
    run = antispam_stack
    log = run.dev.synapse.config["modules"][0]
    assert log["module"] == "synapse_http_antispam.HTTPAntispam"
    async with run.client(run.alice) as alice:
        room = await alice.create_room(name="compat", topic="kingfisher")
        with pytest.raises(MatrixError) as err:
            await alice.send_text(room, "the kingfisher plan")
        assert err.value.status == 403 and "keyword:codenames" in err.value.error
        with pytest.raises(MatrixError) as err:
            await alice.invite(room, "@eve:evil.example")
        assert "evil.example" in err.value.error
        await alice.send_text(room, "harmless")


class MediaGate:
    """A stand-in for the bridge's media endpoint: records what the module sends."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []

    async def handle(self, request: web.Request) -> web.Response:
        if request.match_info["callback"] != "check_media_file_for_spam":
            return web.json_response({})
        body = await request.read()
        self.received.append((dict(request.headers), body))
        if b"DENY-ME" in body:
            return web.json_response(
                {"errcode": "M_FORBIDDEN", "error": "attachment refused by rule x"}, status=403
            )
        return web.json_response({})


async def test_media_contract_through_real_synapse(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Uploads reach the gate streamed, with the contract's headers; a refusal stops the
    upload; a file over media_max_bytes is announced with an empty body."""
    require_synapse()
    gate = MediaGate()
    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/{callback}", gate.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    settings = {
        "base_url": f"http://127.0.0.1:{port}",
        "authorization": "media-token",
        "options": {"media_max_bytes": 4 << 20},
    }
    hs = await asyncio.to_thread(
        start_test_synapse,
        tmp_path_factory,
        [],
        settings,
        False,
        name="media",
        extra_config={"max_upload_size": "20M"},
    )
    try:
        _, token = await hs.async_register_user("uploader", "pw")

        async def upload(data: bytes) -> tuple[int, Any]:
            async with aiohttp.ClientSession() as session:
                async with session.post(
                    f"{hs.url}/_matrix/media/v3/upload",
                    data=data,
                    headers={
                        "Authorization": f"Bearer {token}",
                        "Content-Type": "application/octet-stream",
                    },
                ) as r:
                    return r.status, await r.json(content_type=None)

        big = secrets.token_bytes(3 << 20)  # 3 MiB: streamed in chunks, arrives whole
        status, answer = await upload(big)
        assert status == 200, answer
        headers, body = gate.received[-1]
        assert body == big
        assert headers["Authorization"] == "Bearer media-token"
        assert headers["Content-Type"] == "application/octet-stream"
        assert headers["X-Bridge-Media-Kind"] == "upload"
        assert headers["X-Bridge-Media-Length"] == str(len(big))
        assert answer["content_uri"].endswith("/" + headers["X-Bridge-Media-Id"])
        assert "X-Bridge-Media-Over-Limit" not in headers

        status, answer = await upload(b"a text file that says DENY-ME")
        assert status == 400 and answer["error"] == "Bad content"  # Synapse's own words

        over = b"x" * ((4 << 20) + 1)
        status, _ = await upload(over)
        assert status == 200
        headers, body = gate.received[-1]
        assert body == b""
        assert headers["X-Bridge-Media-Over-Limit"] == "1"
        assert headers["X-Bridge-Media-Length"] == str(len(over))
        assert len(gate.received) == 3
        log = hs.log_path.read_text("utf-8")
        assert "gate refused check_media_file_for_spam (HTTP 403, M_FORBIDDEN" in log
        assert "DENY-ME" not in log
    finally:
        await hs.async_stop()
        await runner.cleanup()


async def test_a_gate_that_does_not_answer_meets_the_timeout(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A gate that accepts the connection and never answers: each call ends after the
    module's timeout and the callback's fail mode decides (through real Twisted)."""
    require_synapse()
    stalled: list[str] = []

    async def stall(request: web.Request) -> web.Response:
        stalled.append(request.match_info["callback"])
        await asyncio.sleep(30)
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/{callback}", stall)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    settings = {
        "base_url": f"http://127.0.0.1:{port}",
        "authorization": "t",
        "enabled_callbacks": ["check_event_for_spam", "user_may_invite"],
        "options": {"timeout": 1},
    }
    hs = await asyncio.to_thread(
        start_test_synapse, tmp_path_factory, [], settings, False, name="stall"
    )
    try:
        alice = await hs.async_register_user("alice", "pw")
        bob = await hs.async_register_user("bob", "pw")
        async with MatrixTestClient(hs.url, *alice) as client:
            room = await client.create_room()
            started = asyncio.get_running_loop().time()
            await client.send_text(room, "fails open after the timeout")
            with pytest.raises(MatrixError) as err:
                await client.invite(room, bob[0])
            elapsed = asyncio.get_running_loop().time() - started
        assert err.value.errcode == "M_UNKNOWN"
        assert 2 <= elapsed < 10
        assert stalled == ["check_event_for_spam", "user_may_invite"]
        log = hs.log_path.read_text("utf-8")
        assert "gate call user_may_invite failed after" in log
        assert "TimeoutError; failing closed (refused)" in log
        assert "fails open after the timeout" not in log
    finally:
        await hs.async_stop()
        await runner.cleanup()
