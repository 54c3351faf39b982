"""``python -m bridge demo``: a throwaway Synapse with the bridge, to try it with a client.

Everything lives in a temporary directory (Synapse on SQLite, the bridge on SQLite) on
loopback ports, and is removed on Ctrl-C unless ``--keep`` is given.
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

from .devstack import BridgeProcess, BridgeStartError, prepare_stack
from .devsynapse import SynapseNotInstalledError, SynapseStartError


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


def run_demo(port: int = 0, keep: bool = False) -> int:
    """Start the demo stack and wait for Ctrl-C. Returns an exit code."""
    workdir = Path(tempfile.mkdtemp(prefix="policy-bridge-demo-"))
    password = secrets.token_urlsafe(9)
    stack = prepare_stack(workdir, permissions={"@admin:localhost": "admin"})
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
        stack.synapse.register_user("admin", password, admin=True)
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
        print(
            "\n"
            "The demo is running.\n"
            f"  Homeserver URL : {stack.synapse.url}\n"
            "  User           : @admin:localhost\n"
            f"  Password       : {password}\n"
            f"  Management room: {room or '(not joined yet: accept the invite)'}\n"
            "\n"
            "Log in with any Matrix client (e.g. Element: 'Edit' homeserver, paste the URL),\n"
            "open the management room and type:  !policy help\n"
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
    finally:
        print("Stopping …", flush=True)
        bridge.stop()
        stack.synapse.stop()
        if keep:
            print(f"Kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
