"""``python -m bridge demo``: starts, prints working credentials, cleans up on Ctrl-C."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

import pytest
from synapse_fixtures import require_synapse

pytestmark = pytest.mark.integration

START_TIMEOUT = 240.0


def _pump(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _read_until(lines: queue.Queue[str | None], marker: str, seen: list[str]) -> bool:
    """Collect lines until one holding ``marker`` (True), EOF or the deadline (False)."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        if line is None:
            return False
        seen.append(line)
        if marker in line:
            return True
    return False


def _field(output: str, label: str) -> str:
    m = re.search(rf"^\s*{label}\s*:\s*(\S+)", output, re.MULTILINE)
    assert m, f"no {label!r} line in:\n{output}"
    return m.group(1)


def test_demo_prints_working_credentials_and_cleans_up() -> None:
    require_synapse(antispam=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridge", "demo"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
    seen: list[str] = []
    try:
        running = _read_until(lines, "Press Ctrl-C", seen)
        output = "".join(seen)
        assert running, f"the demo did not come up:\n{output}"
        assert "The demo is running" in output

        where = re.search(r"Starting a throwaway Synapse in (\S+) ", output)
        assert where, output
        workdir = Path(where.group(1))
        assert workdir.is_dir()
        url = _field(output, "Homeserver URL")
        user = _field(output, "User")
        password = _field(output, "Password")
        room = _field(output, "Management room")
        assert url.startswith("http://127.0.0.1:")

        with urllib.request.urlopen(f"{url}/_matrix/client/versions", timeout=10) as resp:
            assert resp.status == 200
            assert json.load(resp)["versions"]

        login = urllib.request.Request(
            f"{url}/_matrix/client/v3/login",
            data=json.dumps(
                {
                    "type": "m.login.password",
                    "identifier": {"type": "m.id.user", "user": user},
                    "password": password,
                }
            ).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(login, timeout=10) as resp:
            session = json.load(resp)
        assert session["user_id"] == user
        # The demo user is already in the management room the bridge created.
        assert room.startswith("!")
        joined = urllib.request.Request(
            f"{url}/_matrix/client/v3/joined_rooms",
            headers={"Authorization": f"Bearer {session['access_token']}"},
        )
        with urllib.request.urlopen(joined, timeout=10) as resp:
            assert room in json.load(resp)["joined_rooms"]
        # The demo user meets the policy on new rooms too: not a Synapse server admin (for
        # those Synapse skips the room-creation check), so a card in a topic is refused.
        create = urllib.request.Request(
            f"{url}/_matrix/client/v3/createRoom",
            data=json.dumps({"name": "pay", "topic": "card 4111 1111 1111 1111"}).encode(),
            headers={
                "Authorization": f"Bearer {session['access_token']}",
                "Content-Type": "application/json",
            },
            method="POST",
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(create, timeout=10)
        assert refused.value.code == 403

        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
        rest: list[str] = []
        _read_until(lines, "\0never\0", rest)  # drain to EOF
        assert code == 0, "".join(seen + rest)
        assert not workdir.exists()
    finally:
        if proc.poll() is None:
            # Let the demo stop its Synapse and bridge; kill it only if it hangs.
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
