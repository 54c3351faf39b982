"""Proves the throwaway-Synapse harness: startup, registration, lifted rate limits, and the
gate modules (the project's own and synapse-http-antispam) wired to an HTTP gate speaking the
same protocol."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from aiohttp import web
from matrix_client import MatrixError, MatrixTestClient, wait_for
from synapse_fixtures import start_test_synapse

from bridge.dev.devsynapse import GateModule, SynapseServer, free_port

pytestmark = pytest.mark.integration

GATE_TOKEN = "gate-test-token"


@pytest.fixture
def plain_synapse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SynapseServer]:
    """Synapse with no appservice and no antispam module."""
    server = start_test_synapse(tmp_path_factory, [], antispam=None, name="plain")
    yield server
    server.stop()


async def test_plain_synapse_lifts_rate_limits(plain_synapse: SynapseServer) -> None:
    hs = plain_synapse
    assert hs.startup_seconds is not None
    print(f"Synapse started in {hs.startup_seconds:.2f}s")
    alice_id, alice_token = hs.register_user("alice", "alice-pw")
    # Bob keeps Synapse's per-user defaults: only the config's lifted limits apply to him.
    bob_id, bob_token = await hs.async_register_user("bob", "bob-pw", lift_ratelimit=False)
    assert alice_id == "@alice:localhost"
    assert bob_id == "@bob:localhost"

    async with (
        MatrixTestClient(hs.url, alice_id, alice_token) as alice,
        MatrixTestClient(hs.url, bob_id, bob_token) as bob,
    ):
        assert await alice.whoami() == alice_id
        room_id = await alice.create_room(name="harness", topic="t", invite=[bob_id])
        await bob.join(room_id)
        members = await alice.joined_members(room_id)
        assert set(members) == {alice_id, bob_id}

        # Sequential sends far beyond the default 0.2 msg/s, burst 10 limit.
        started = time.monotonic()
        sent = [await alice.send_text(room_id, f"message {i}") for i in range(50)]
        # And a concurrent burst from a user without a per-user override.
        sent_bob = await asyncio.gather(*(bob.send_text(room_id, f"bob {i}") for i in range(20)))
        elapsed = time.monotonic() - started
        print(f"70 messages accepted in {elapsed:.2f}s")
        assert len(set(sent)) == 50 and len(set(sent_bob)) == 20

        events = await bob.messages(room_id, limit=200)
        bodies = [e["content"].get("body") for e in events if e["type"] == "m.room.message"]
        assert [f"message {i}" for i in range(50)] == [
            b for b in reversed(bodies) if b and b.startswith("message ")
        ]
        assert {f"bob {i}" for i in range(20)} <= set(bodies)

        # State helpers.
        assert (await alice.get_state(room_id, "m.room.name"))["name"] == "harness"
        assert await alice.get_state(room_id, "org.example.missing") is None
        await alice.send_state(room_id, "org.example.thing", "k", {"v": 1})
        assert await alice.get_state(room_id, "org.example.thing", "k") == {"v": 1}

        # Redaction and kick.
        await alice.redact(room_id, sent[0], reason="cleanup")
        redacted = await alice.get_event(room_id, sent[0])
        assert redacted["content"] == {}
        await alice.kick(room_id, bob_id, reason="bye")
        assert set(await alice.joined_members(room_id)) == {alice_id}
        with pytest.raises(MatrixError) as err:
            await bob.send_text(room_id, "after kick")
        assert err.value.errcode == "M_FORBIDDEN"

    # Restart keeps users and rooms.
    hs.restart()
    async with MatrixTestClient(hs.url, alice_id, alice_token) as alice:
        await alice.send_text(room_id, "after restart")
        latest = await alice.messages(room_id, limit=1)
        assert latest[0]["content"]["body"] == "after restart"


class FakeGate:
    """A minimal synapse-http-antispam endpoint: denies messages containing 'forbidden'."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.unauthorized = 0

    async def handle(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {GATE_TOKEN}":
            self.unauthorized += 1
            return web.json_response({"errcode": "M_UNAUTHORIZED", "error": "bad"}, status=401)
        callback = request.match_info["callback"]
        body = await request.json()
        self.calls.append((callback, body))
        if callback == "check_event_for_spam":
            content = body["event"].get("content", {})
            if "forbidden" in str(content.get("body", "")):
                return web.json_response(
                    {"errcode": "M_FORBIDDEN", "error": "blocked by rule X"}, status=403
                )
        if callback == "user_may_invite" and body["invitee"].startswith("@blocked"):
            return web.json_response(
                {"errcode": "M_FORBIDDEN", "error": "invites to this user are blocked"},
                status=403,
            )
        return web.json_response({})


@pytest.fixture
async def fake_gate() -> AsyncIterator[tuple[FakeGate, str]]:
    gate = FakeGate()
    app = web.Application()
    app.router.add_post("/{callback}", gate.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    yield gate, f"http://127.0.0.1:{port}"
    await runner.cleanup()


@pytest.mark.parametrize("module", list(GateModule))
async def test_antispam_module_reaches_gate(
    tmp_path_factory: pytest.TempPathFactory, fake_gate: tuple[FakeGate, str], module: GateModule
) -> None:
    """Both modules speak the same protocol to the same gate (compatibility)."""
    gate, gate_url = fake_gate
    # Start in a thread: the gate runs on this event loop and must keep serving.
    hs = await asyncio.to_thread(
        start_test_synapse,
        tmp_path_factory,
        [],
        {"base_url": gate_url, "authorization": GATE_TOKEN, "module": module},
        False,
        name="antispam",
    )
    try:
        alice_id, alice_token = await hs.async_register_user("alice", "pw")
        bob_id, _ = await hs.async_register_user("bob", "pw")
        await hs.async_register_user("blocked", "pw")
        async with MatrixTestClient(hs.url, alice_id, alice_token) as alice:
            room_id = await alice.create_room(name="gated", topic="t")
            # Synapse fact worth knowing: the events createRoom writes (create, member,
            # power levels, name, topic, initial_state) never reach check_event_for_spam;
            # only the project's module forwards the createRoom body (user_may_create_room).
            if module is GateModule.POLICY_BRIDGE:
                assert [cb for cb, _ in gate.calls] == ["user_may_create_room"]
                created = gate.calls[0][1]
                assert created["user_id"] == alice_id
                assert created["room_config"]["name"] == "gated"
                assert created["room_config"]["topic"] == "t"
                gate.calls.clear()
            assert gate.calls == []
            allowed_id = await alice.send_text(room_id, "hello, world")

            with pytest.raises(MatrixError) as err:
                await alice.send_text(room_id, "this is forbidden text")
            assert err.value.status == 403
            assert err.value.errcode == "M_FORBIDDEN"
            assert err.value.error == "blocked by rule X"

            await alice.invite(room_id, bob_id)
            # Membership events are judged by user_may_invite / user_may_join_room only.
            assert [cb for cb, _ in gate.calls][-1] == "user_may_invite"
            with pytest.raises(MatrixError) as err:
                await alice.invite(room_id, "@blocked:localhost")
            assert err.value.errcode == "M_FORBIDDEN"
            assert err.value.error == "invites to this user are blocked"

            bodies = [e["content"].get("body") for e in await alice.messages(room_id, 20)]
            assert "hello, world" in bodies
            assert "this is forbidden text" not in bodies
            assert any(
                cb == "check_event_for_spam" and b["event"].get("event_id") == allowed_id
                for cb, b in gate.calls
            )
        callbacks = {cb for cb, _ in gate.calls}
        assert {"check_event_for_spam", "user_may_invite"} <= callbacks
        assert gate.unauthorized == 0
    finally:
        await hs.async_stop()


@pytest.mark.parametrize(
    ("module", "message"),
    [
        (GateModule.HTTP_ANTISPAM, "Failed to connect to antispam server"),
        (
            GateModule.POLICY_BRIDGE,
            "the policy service could not check this request; try again later",
        ),
    ],
)
async def test_antispam_unreachable_gate(
    tmp_path_factory: pytest.TempPathFactory, module: GateModule, message: str
) -> None:
    """With the gate down, check_event_for_spam fails open (module default) while
    user_may_invite fails closed with M_UNKNOWN."""
    dead_url = f"http://127.0.0.1:{free_port()}"
    settings: dict[str, Any] = {"base_url": dead_url, "module": module}
    if module is GateModule.POLICY_BRIDGE:
        settings.update(authorization=GATE_TOKEN, fail_open={"user_may_create_room": True})
    hs = await asyncio.to_thread(
        start_test_synapse, tmp_path_factory, [], settings, False, name="deadgate"
    )
    try:
        alice_id, alice_token = await hs.async_register_user("alice", "pw")
        bob_id, _ = await hs.async_register_user("bob", "pw")
        async with MatrixTestClient(hs.url, alice_id, alice_token) as alice:
            room_id = await alice.create_room()
            await alice.send_text(room_id, "forbidden but the gate is down")
            with pytest.raises(MatrixError) as err:
                await alice.invite(room_id, bob_id)
            assert err.value.errcode == "M_UNKNOWN"
            assert err.value.error == message
    finally:
        await hs.async_stop()


def test_config_only_no_start(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Config generation works without starting anything (and without importing synapse)."""
    workdir = tmp_path_factory.mktemp("cfg")
    server = SynapseServer(
        workdir,
        server_name="example.test",
        antispam={
            "base_url": "http://127.0.0.1:1/",
            "fail_open": {"user_may_invite": True},
            "module": "synapse_http_antispam.HTTPAntispam",
        },
        retention=True,
        extra_config={"rc_message": {"per_second": 5}, "max_upload_size": "1M"},
    )
    cfg = server.config
    assert cfg["server_name"] == "example.test"
    assert cfg["rc_message"] == {"per_second": 5, "burst_count": 1_000_000}
    assert cfg["rc_login"]["failed_attempts"]["burst_count"] == 1_000_000
    assert cfg["max_upload_size"] == "1M"
    module = cfg["modules"][0]
    assert module["module"] == "synapse_http_antispam.HTTPAntispam"
    assert module["config"]["base_url"] == "http://127.0.0.1:1"
    assert "check_event_for_spam" in module["config"]["enabled_callbacks"]
    assert module["config"]["enabled_callbacks"] == [
        "check_event_for_spam",
        "user_may_invite",
        "federated_user_may_invite",
        "user_may_join_room",
    ]
    assert cfg["retention"]["enabled"] is True
    # The project's own module is the default; it forwards more callbacks, takes options.
    ours = SynapseServer(
        tmp_path_factory.mktemp("cfg2"),
        antispam={"base_url": "http://127.0.0.1:1/", "options": {"timeout": 2}},
    ).config["modules"][0]
    assert ours["module"] == "policy_bridge_synapse.PolicyBridgeModule"
    assert ours["config"]["timeout"] == 2
    assert {"user_may_create_room", "user_may_send_state_event"} <= set(
        ours["config"]["enabled_callbacks"]
    )
    assert (workdir / "example.test.signing.key").read_text().startswith("ed25519 a_")
    assert not server.running


async def test_wait_for_times_out() -> None:
    async def never() -> bool:
        return False

    with pytest.raises(TimeoutError):
        await wait_for(never, timeout=0.2, interval=0.05)
    counter = {"n": 0}

    async def third_time() -> int:
        counter["n"] += 1
        return counter["n"] if counter["n"] >= 3 else 0

    assert await wait_for(third_time, timeout=2, interval=0.01) == 3


def test_unsupported_callback_is_explained(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Synapse 1.163 has no accept_make_join spam-checker callback: the module then kills
    Synapse at startup, and the harness says why in plain words."""
    from bridge.dev.devsynapse import SynapseStartError

    settings = {
        "base_url": f"http://127.0.0.1:{free_port()}",
        "enabled_callbacks": ["check_event_for_spam", "accept_make_join"],
        "module": GateModule.HTTP_ANTISPAM,
    }
    try:
        hs = start_test_synapse(tmp_path_factory, [], settings, name="badcb")
    except SynapseStartError as err:
        assert "does not support the spam-checker callback 'accept_make_join'" in str(err)
        assert "TypeError" in str(err)  # the log tail is included
    else:
        hs.stop()
        pytest.skip("this Synapse supports accept_make_join; add it to the defaults")


def test_own_module_refuses_to_load_without_a_callback(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The project's module checks Synapse's registration function before registering: a
    configured callback Synapse lacks stops startup with a message naming it; a config
    mistake names the key."""
    from bridge.dev.devsynapse import SynapseStartError

    settings: dict[str, Any] = {
        "base_url": f"http://127.0.0.1:{free_port()}",
        "authorization": GATE_TOKEN,
        "enabled_callbacks": ["check_event_for_spam", "accept_make_join"],
    }
    with pytest.raises(SynapseStartError) as err:
        start_test_synapse(tmp_path_factory, [], settings, name="ownbadcb")
    assert "The policy bridge's Synapse module refused to load: accept_make_join: this" in str(
        err.value
    )
    assert "has no such spam-checker callback" in str(err.value)
    with pytest.raises(SynapseStartError) as err:
        start_test_synapse(tmp_path_factory, [], {"base_url": "bridge:1"}, name="ownbadcfg")
    assert "modules.<item 0>.config.base_url" in str(err.value)
    assert "is not an http(s) URL with a host" in str(err.value)
