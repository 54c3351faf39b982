"""``python -m bridge demo`` shows a blocked message and the management-room notice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from synapse_fixtures import require_synapse

pytestmark = pytest.mark.integration


def test_demo_shows_a_refusal_and_a_notice() -> None:
    require_synapse(antispam=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridge", "demo"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("Press Ctrl-C"):
                break
        out = "".join(lines)
        assert "The demo is running." in out, out
        assert "-> sent (no rule matches)" in out, out
        assert "refused by Synapse, HTTP 403 M_FORBIDDEN" in out, out
        [shown] = [line for line in lines if "Synapse's refusal reads:" in line]
        assert "detector:card" in shown and "1111 1111" not in shown, shown
        assert "The management room got: Policy keyword:watchlist matched" in out, out
        assert "What to look at:" in out
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
