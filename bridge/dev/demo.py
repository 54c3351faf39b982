"""``python -m bridge demo``: a throwaway Synapse with the bridge, to try it with a client.

Everything lives in a temporary directory (Synapse on SQLite, the bridge on SQLite) on
loopback ports, and is removed on Ctrl-C unless ``--keep`` is given.

The demo's DLP policy blocks payment card numbers and reports a watch-list phrase to the
management room. After start, a second user sends three messages: one allowed, one with a
test card number (Synapse refuses it: the refusal is printed) and one with the watch-list
phrase (a notice appears in the management room).
"""

from __future__ import annotations

import secrets
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import FrameType

from bridge.dev.devstack import BridgeProcess, BridgeStartError, DevStack, prepare_stack
from bridge.dev.devsynapse import (
    HomeserverRequestError,
    SynapseNotInstalledError,
    SynapseStartError,
)

TEST_CARD = "4111 1111 1111 1111"  # a well-known test number: passes Luhn, charges nothing
WATCHED = "project falcon"
DEMO_DLP = {
    "detectors": {"card": ["block", "notify"]},
    "keywords": [{"name": "watchlist", "keywords": [WATCHED], "action": "notify"}],
}


def _join_management_room(hs_url: str, token: str, timeout: float = 30) -> str | None:
    """Accept the bridge's invite to the management room for the demo user."""
    import json

    deadline = time.monotonic() + timeout
    headers = {"Authorization": f"Bearer {token}"}
    while time.monotonic() < deadline:
        req = urllib.request.Request(  # noqa: S310 - loopback URL we built
            f"{hs_url}/_matrix/client/v3/sync?timeout=0", headers=headers
        )
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
            invites = list(json.loads(resp.read()).get("rooms", {}).get("invite", {}))
        if invites:
            room = invites[0]
            join = urllib.request.Request(  # noqa: S310
                f"{hs_url}/_matrix/client/v3/join/{urllib.parse.quote(room)}",
                data=b"{}",
                headers={**headers, "Content-Type": "application/json"},
                method="POST",
            )
            urllib.request.urlopen(join, timeout=10).close()  # noqa: S310
            return room
        time.sleep(0.5)
    return None


def _send(stack: DevStack, token: str, room: str, body: str) -> str:
    path = (
        f"/_matrix/client/v3/rooms/{urllib.parse.quote(room)}/send/m.room.message/"
        f"demo-{secrets.token_hex(6)}"
    )
    result = stack.synapse.request(
        "PUT", path, {"msgtype": "m.text", "body": body}, access_token=token
    )
    return str(result["event_id"])


def _wait_for_notice(
    stack: DevStack, token: str, room: str, needle: str, timeout: float = 30
) -> str | None:
    """The bot's notice containing ``needle`` in ``room``, if it arrives in time."""
    path = f"/_matrix/client/v3/rooms/{urllib.parse.quote(room)}/messages?dir=b&limit=30"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in stack.synapse.request("GET", path, access_token=token).get("chunk", []):
            body = event.get("content", {}).get("body", "")
            if event.get("sender", "").startswith("@policybot:") and needle in body:
                return str(body)
        time.sleep(0.5)
    return None


def show_dlp(stack: DevStack, admin_token: str, management_room: str | None) -> None:
    """As a second user, send an allowed, a blocked and a reported message; print what
    happened. Never raises: a failed step is printed and the demo goes on."""
    print("\nDLP demo: @alice:localhost sends three messages in the room 'DLP demo' …")
    try:
        _, token = stack.synapse.register_user("alice", secrets.token_urlsafe(9))
        room = stack.synapse.request(
            "POST",
            "/_matrix/client/v3/createRoom",
            {"name": "DLP demo", "invite": ["@admin:localhost"]},
            access_token=token,
        )["room_id"]
    except Exception as e:  # the demo goes on without this part
        print(f"  (could not set up the DLP demo: {e})")
        return
    try:
        _send(stack, token, room, "Hello! The quarterly numbers look good.")
        print("  1. 'Hello! The quarterly numbers look good.'  -> sent (no rule matches)")
    except Exception as e:
        print(f"  1. the allowed message failed unexpectedly: {e}")
    try:
        _send(stack, token, room, f"my card is {TEST_CARD}, can you book the flight?")
        print("  2. the message with a test card number was NOT refused (is the gate running?)")
    except HomeserverRequestError as e:
        print(
            f"  2. 'my card is {TEST_CARD[:4]} …' -> refused by Synapse, HTTP {e.status} "
            f"{e.errcode}.\n     Synapse's refusal reads: {e.error}\n     (Element shows only "
            "'not sent'; the bot also tells the sender in a 'Policy notices' room)"
        )
    except Exception as e:
        print(f"  2. the card message failed unexpectedly: {e}")
    try:
        _send(stack, token, room, f"any news on {WATCHED}?")
        print(f"  3. 'any news on {WATCHED}?'  -> sent; the rule 'watchlist' only notifies")
    except Exception as e:
        print(f"  3. the watch-list message failed unexpectedly: {e}")
        return
    if not management_room:
        print("     (no management room joined: the notice cannot be shown here)")
        return
    try:
        found = _wait_for_notice(stack, admin_token, management_room, "keyword:watchlist")
    except Exception as e:
        found = None
        print(f"     (could not read the management room: {e})")
    if found:
        print(f"     The management room got: {found}")
    else:
        print("     (no notice in the management room yet; look there in a moment)")


def run_demo(port: int = 0, keep: bool = False) -> int:
    """Start the demo stack and wait for Ctrl-C. Returns an exit code."""
    workdir = Path(tempfile.mkdtemp(prefix="policy-bridge-demo-"))
    password = secrets.token_urlsafe(9)
    stack = prepare_stack(
        workdir,
        permissions={"@admin:localhost": "admin"},
        # e2ee: the bot joins encrypted rooms as an E2EE member (docs/e2ee.md); the compliance
        # console on the bridge's loopback listener (plain HTTP: no Secure cookies)
        bridge_options={
            "dlp": DEMO_DLP,
            "e2ee": {"enabled": True},
            "console": {"enabled": True, "secure_cookies": False},
        },
        shared_media=True,  # one host: the module names uploads, the bridge reads them
    )
    if port:
        stack.synapse.port = port
    bridge = BridgeProcess(stack.config_path, workdir / "bridge.log", stack.bridge_port)
    stopping = False

    def on_signal(_sig: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    try:
        print(f"Starting a throwaway Synapse in {workdir} …", flush=True)
        stack.synapse.start()
        # not a Synapse server admin: Synapse skips the room-creation, invite and state
        # checks for those, so the demo user would see no policy on new rooms
        stack.synapse.register_user("admin", password, admin=False)
        print("Starting the policy bridge …", flush=True)
        bridge.start(timeout=90)
        login = stack.synapse.request(
            "POST",
            "/_matrix/client/v3/login",
            {
                "type": "m.login.password",
                "identifier": {"type": "m.id.user", "user": "admin"},
                "password": password,
            },
        )
        room = _join_management_room(stack.synapse.url, login["access_token"])
        show_dlp(stack, login["access_token"], room)
        print(
            "\n"
            "The demo is running.\n"
            f"  Homeserver URL : {stack.synapse.url}\n"
            "  User           : @admin:localhost\n"
            f"  Password       : {password}\n"
            f"  Management room: {room or '(not joined yet: accept the invite)'}\n"
            f"  Console        : {stack.bridge_url}/console/ (same user and password)\n"
            "\n"
            "Log in with any Matrix client (e.g. Element: 'Edit' homeserver, paste the URL),\n"
            "open the management room and type:  !policy help\n"
            "What to look at:\n"
            "  - the management room: the notice about the watch-list message from @alice\n"
            "    (rule keyword:watchlist, with a masked excerpt);\n"
            "  - the room 'DLP demo' (accept the invite): the allowed messages are there,\n"
            "    the card number never reached the server;\n"
            "  - an encrypted room: create one, invite @policybot:localhost; it joins, says\n"
            "    (encrypted) that the room is archived, and checks messages after the fact;\n"
            f"  - try it yourself: send a message containing {TEST_CARD} (refused), or type\n"
            "    in the management room:  !policy dlp test my card is " + TEST_CARD + "\n"
            f"Bridge log: {workdir / 'bridge.log'}  Synapse log: {stack.synapse.log_path}\n"
            "Press Ctrl-C to stop and clean up.",
            flush=True,
        )
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        while not stopping:
            if not bridge.running:
                print("The bridge stopped unexpectedly:\n" + bridge.log_tail(), file=sys.stderr)
                return 1
            time.sleep(0.5)
        return 0
    except (SynapseNotInstalledError, SynapseStartError, BridgeStartError) as e:
        print(f"demo failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C while starting: clean up, without a traceback
        print("\nInterrupted while starting.", flush=True)
        return 130
    finally:
        # a second Ctrl-C must not cut the clean-up short (leaving Synapse running)
        signal.signal(signal.SIGINT, on_signal)
        print("Stopping …", flush=True)
        bridge.stop()
        stack.synapse.stop()
        if keep:
            print(f"Kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
