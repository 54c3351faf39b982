"""A signed head at all times: the real bridge, killed with SIGKILL in the middle of a
stream of messages from a real Synapse, leaves an archive whose unsigned tail is no older
than ``audit.checkpoint_interval``, as ``python -m bridge audit verify`` reports it.

Only the interval job signs here (``checkpoint_every`` is out of reach and a killed bridge
signs nothing at shutdown).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import User
from matrix_client import MatrixTestClient, wait_for
from synapse_fixtures import require_synapse

from bridge.dev.devstack import BridgeProcess, DevStack, prepare_stack

pytestmark = pytest.mark.integration

INTERVAL_S = 2.0


@contextlib.contextmanager
def killable_stack(workdir: Path) -> Iterator[tuple[DevStack, BridgeProcess, User]]:
    require_synapse(antispam=True)
    dev = prepare_stack(
        workdir,
        bridge_options={
            "audit": {"checkpoint_interval": f"{INTERVAL_S:g}s", "checkpoint_every": 10_000_000}
        },
    )
    bridge = BridgeProcess(dev.config_path, workdir / "bridge.log", dev.bridge_port)
    try:
        dev.synapse.start()
        admin = User(*dev.synapse.register_user("admin", "admin-pw", admin=True))
        bridge.start()
        yield dev, bridge, admin
    finally:
        bridge.stop()
        dev.synapse.stop()


def checkpoints_since(db: Path, ts_ms: int) -> int:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        query = "SELECT count(*) FROM checkpoints WHERE ts > ?"
        return int(conn.execute(query, (ts_ms,)).fetchone()[0])


def unsigned_tail(db: Path) -> tuple[int, int | None]:
    """Records after the last checkpoint, and the archive time of the first of them."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        signed = conn.execute("SELECT coalesce(max(seq), 0) FROM checkpoints").fetchone()[0]
        last = conn.execute("SELECT coalesce(max(seq), 0) FROM records").fetchone()[0]
        first = conn.execute("SELECT ts FROM records WHERE seq = ?", (signed + 1,)).fetchone()
    return last - signed, first[0] if first else None


async def test_sigkill_mid_stream_leaves_a_signed_head_within_the_interval(
    tmp_path: Path,
) -> None:
    with killable_stack(tmp_path) as (dev, bridge, admin):
        db = dev.workdir / "data" / "bridge.db"
        async with MatrixTestClient(dev.synapse.url, admin.user_id, admin.token) as client:
            room = await client.create_room(name="signed head")
            sent: list[str] = []
            stop = asyncio.Event()

            async def stream() -> None:
                while not stop.is_set():
                    sent.append(await client.send_text(room, f"stream {len(sent)}"))
                    await asyncio.sleep(0.02)

            started = int(time.time() * 1000)
            task = asyncio.create_task(stream())
            try:
                # the interval job signs twice while the stream runs: a head exists to keep
                async def signed_twice() -> bool:
                    return checkpoints_since(db, started) >= 2

                await wait_for(
                    signed_twice, timeout=60, interval=0.2, message="two interval checkpoints"
                )

                # kill late in an interval: an unsigned tail of several records, the oldest
                # a second old (the job signs it at 1.5 s)
                async def tail_a_second_old() -> bool:
                    n, first = unsigned_tail(db)
                    return n >= 3 and first is not None and time.time() * 1000 - first >= 1000

                await wait_for(
                    tail_a_second_old, timeout=60, interval=0.05, message="an unsigned tail"
                )
                assert len(sent) > 10, "the stream is not flowing"
                bridge.kill()  # SIGKILL mid-stream: no shutdown checkpoint
            finally:
                stop.set()
                await task
        verify = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "bridge", "audit", "verify", "-c", str(dev.config_path)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    out = verify.stdout
    assert verify.returncode == 0, out + verify.stderr
    assert "audit chain OK" in out, out
    head = re.search(r"signed head: seq (\d+), signed", out)
    assert head and int(head.group(1)) > 0, out
    tail = re.search(
        r"unsigned tail: (\d+) records, the oldest unsigned for [\d.]+s, "
        r"spanning ([\d.]+)s up to the last record",
        out,
    )
    assert tail and int(tail.group(1)) >= 1, out
    # what the bridge left unsigned when it died: no older than the interval
    assert float(tail.group(2)) <= INTERVAL_S, out
