"""Faults survived, each against a real Synapse with the bridge as a child process.

Every test builds its own throwaway stack (``prepare_stack`` in a temp directory) so a
fault in one cannot leak into another, and stops everything it started in ``finally``:

- Synapse restarted while the bridge runs;
- the database (a private PostgreSQL cluster made with ``initdb``/``pg_ctl``) stopped and
  started again while messages keep coming;
- the gate unreachable, with ``check_event_for_spam`` failing open (the default) and closed;
- an unusable data directory at start (under a regular file, a read-only mount, a full disk);
- SIGTERM while transactions are arriving.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import pwd
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import User, accept_invites
from helpers import bot_replies
from matrix_client import MatrixError, MatrixTestClient, wait_for
from ruamel.yaml import YAML
from synapse_fixtures import require_synapse

from bridge.audit.crypto import BlindIndexer
from bridge.audit.keyring import Keyring
from bridge.dev.devstack import BridgeProcess, DevStack, prepare_stack
from bridge.dev.devsynapse import free_port
from bridge.store import Store
from tests.kit.store import count_events

pytestmark = pytest.mark.integration

ADMIN = "@admin:localhost"
KEYWORD = "project nightingale"


# -- a stack per test -----------------------------------------------------------------------


@dataclass
class FaultStack:
    """One Synapse + bridge, owned by a single test."""

    dev: DevStack
    bridge: BridgeProcess
    admin: User
    count_rows: Callable[[], Any] | None = None  # async: event_id_idx of every event record
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def bot(self) -> str:
        return f"@policybot:{self.dev.server_name}"

    @property
    def data_dir(self) -> Path:
        return self.dev.workdir / "data"

    def client(self, user: User | None = None) -> MatrixTestClient:
        user = user or self.admin
        return MatrixTestClient(self.dev.synapse.url, user.user_id, user.token)

    def config(self) -> dict[str, Any]:
        return self.dev.bridge_config()

    async def stored_counts(self, event_ids: Iterable[str]) -> dict[str, int]:
        """How often each event is in the archive (found through its blind index)."""
        ids = list(event_ids)
        keyring = Keyring.load(self.data_dir / "audit-keyring.json")
        index = BlindIndexer(keyring.index_key)
        by_idx = {index("event_id", e): e for e in ids}
        counts = dict.fromkeys(ids, 0)
        if self.count_rows is not None:
            rows = await self.count_rows()
        else:
            with contextlib.closing(sqlite3.connect(self.data_dir / "bridge.db")) as db:
                rows = [
                    r[0] for r in db.execute("SELECT event_id_idx FROM records WHERE kind='event'")
                ]
        for idx in rows:
            key = bytes(idx)
            if key in by_idx:
                counts[by_idx[key]] += 1
        return counts

    async def wait_stored_once(self, event_ids: list[str], timeout: float = 60) -> None:
        """Wait until every event is stored, then check none is stored twice."""

        async def all_stored() -> bool:
            return all((await self.stored_counts(event_ids)).values())

        await wait_for(all_stored, timeout=timeout, interval=0.5, message="every event stored")
        counts = await self.stored_counts(event_ids)
        assert set(counts.values()) == {1}, {e: n for e, n in counts.items() if n != 1}


@contextlib.contextmanager
def fault_stack(
    workdir: Path, *, start_bridge: bool = True, **prepare: Any
) -> Iterator[FaultStack]:
    """Prepare and start Synapse (+ the bridge); stop both whatever happens."""
    require_synapse(antispam=True)
    dev = prepare_stack(workdir, **prepare)
    bridge = BridgeProcess(dev.config_path, workdir / "bridge.log", dev.bridge_port)
    try:
        dev.synapse.start()
        admin = User(*dev.synapse.register_user("admin", "admin-pw", admin=True))
        if start_bridge:
            bridge.start()
        yield FaultStack(dev, bridge, admin)
    finally:
        bridge.stop()
        dev.synapse.stop()


async def management_room(fs: FaultStack) -> str:
    # On PostgreSQL the bridge is ready (serving gate and ingest) before it holds the leader
    # lease and creates the room; an initial sync before that is cached by Synapse.
    async def leading() -> bool:
        return "leader work started" in bridge_log(fs)

    await wait_for(leading, timeout=30, message="the leader's start")
    async with fs.client() as admin:
        [room] = await accept_invites(admin, timeout=30)
    return room


async def command(fs: FaultStack, room: str, text: str, timeout: float = 30) -> str:
    async with fs.client() as admin:
        cmd = await admin.send_text(room, text)
        [reply] = await bot_replies(admin, room, fs.bot, cmd, timeout=timeout)
        return str(reply["content"]["body"])


def bridge_log(fs: FaultStack) -> str:
    return (fs.dev.workdir / "bridge.log").read_text("utf-8", "replace")


# -- Synapse restarted ------------------------------------------------------------------------


async def test_synapse_restart_while_bridge_runs(tmp_path: Path) -> None:
    with fault_stack(tmp_path) as fs:
        mgmt = await management_room(fs)
        async with fs.client() as admin:
            room = await admin.create_room(name="restart")
            before = [await admin.send_text(room, f"before {i}") for i in range(15)]
        await fs.wait_stored_once(before)

        await asyncio.to_thread(fs.dev.synapse.restart)
        assert fs.bridge.running, "the bridge died when Synapse went away:\n" + fs.bridge.log_tail()

        async with fs.client() as admin:
            after = [await admin.send_text(room, f"after {i}") for i in range(15)]
        await fs.wait_stored_once(before + after)
        assert "Policy bridge status" in await command(fs, mgmt, "!policy status")
        assert fs.bridge.running


async def test_reused_txn_id_with_new_events_is_stored(store: Store) -> None:
    """Synapse on SQLite numbers transactions from 1 again after a restart."""

    def txn(*ids: str) -> list[dict[str, Any]]:
        return [{"event_id": i, "room_id": "!r:x", "type": "m.room.message"} for i in ids]

    first = await store.queue.ingest("1", txn("$a", "$b"))
    retry = await store.queue.ingest("1", txn("$a", "$b"))
    reused = await store.queue.ingest("1", txn("$c"))
    again = await store.queue.ingest("1", txn("$c"))
    assert (first.stored, retry.duplicate, reused.stored, again.duplicate) == (2, True, 1, True)
    assert [await count_events(store, e) for e in ("$a", "$b", "$c")] == [1, 1, 1]
    work = await store.queue.pending()
    assert [[s.event["event_id"] for s in w.events] for w in work] == [["$a", "$b"], ["$c"]]


# -- the database unreachable -----------------------------------------------------------------


def _pg_bindir() -> Path | None:
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0,
    )
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class PrivateCluster:
    """A PostgreSQL cluster of this test's own: initdb'd in a temp dir, on a free port.

    initdb refuses to run as root, so as root the cluster belongs to the ``postgres`` OS
    user (in a directory it owns) and every pg_ctl call runs through ``runuser``.
    """

    def __init__(self) -> None:
        bindir = _pg_bindir()
        if bindir is None:
            pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
        self.bindir = bindir
        self.port = free_port()
        self.owner: str | None = None
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("running as root and there is no 'postgres' OS user for initdb")
            if shutil.which("runuser") is None:
                pytest.skip("running as root and runuser is missing (initdb refuses root)")
            self.owner = "postgres"
        self.root = Path(tempfile.mkdtemp(prefix="bridge-pg-"))
        self.root.chmod(0o755)
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        if self.owner:
            shutil.chown(self.root, self.owner, self.owner)

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.owner:
            cmd = ["runuser", "-u", self.owner, "--", *cmd]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def init(self) -> None:
        result = self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-sync",
            check=False,
        )
        if result.returncode != 0:
            shutil.rmtree(self.root, ignore_errors=True)
            pytest.skip(f"initdb failed here: {result.stderr.strip()[-300:]}")

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
            " -c max_connections=50"
        )
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def destroy(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "stop", check=False)
        shutil.rmtree(self.root, ignore_errors=True)

    async def event_indexes(self) -> list[bytes]:
        import asyncpg

        conn = await asyncpg.connect(
            host="127.0.0.1", port=self.port, user="postgres", database="postgres"
        )
        try:
            rows = await conn.fetch("SELECT event_id_idx FROM records WHERE kind='event'")
        finally:
            await conn.close()
        return [bytes(r[0]) for r in rows]


async def test_database_unreachable_for_a_while(tmp_path: Path) -> None:
    cluster = PrivateCluster()
    try:
        cluster.init()
        cluster.start()
        with fault_stack(tmp_path, database_url=cluster.url) as fs:
            fs.count_rows = cluster.event_indexes
            mgmt = await management_room(fs)
            async with fs.client() as admin:
                room = await admin.create_room(name="db outage")
                before = [await admin.send_text(room, f"before {i}") for i in range(10)]
            await fs.wait_stored_once(before)

            cluster.stop("fast")
            async with fs.client() as admin:
                during = [await admin.send_text(room, f"during {i}") for i in range(10)]

            # Synapse pushes the new events and gets 503s; the bridge must stay up.
            async def refused() -> bool:
                return "asking Synapse to retry" in bridge_log(fs)

            await wait_for(refused, timeout=30, message="a transaction refused with 5xx")
            # Long enough for the worker's idle poll (every 5 s) to meet the outage too.
            await asyncio.sleep(6)
            assert fs.bridge.running, "bridge died with the database:\n" + fs.bridge.log_tail()

            cluster.start()
            async with fs.client() as admin:
                after = [await admin.send_text(room, f"after {i}") for i in range(10)]
            # Synapse's own retry may be 8-16 s away or more; the bridge's redelivery nudge
            # (an appservice ping as soon as the database answers) makes it retry at once.
            await fs.wait_stored_once(before + during + after, timeout=90)
            assert "database is back: asked the homeserver to redeliver" in bridge_log(fs)
            assert "Policy bridge status" in await command(fs, mgmt, "!policy status")
            assert fs.bridge.running
            assert fs.bridge.stop() == 0, fs.bridge.log_tail()

            verify = subprocess.run(
                [sys.executable, "-m", "bridge", "audit", "verify", "-c", str(fs.dev.config_path)],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert verify.returncode == 0, verify.stdout + verify.stderr
    finally:
        cluster.destroy()


# -- the gate unreachable ---------------------------------------------------------------------


def _dlp_block_keyword() -> dict[str, Any]:
    return {"dlp": {"keywords": [{"name": "codename", "keywords": [KEYWORD], "action": "block"}]}}


async def test_gate_down_fails_open_then_ingest_redacts(tmp_path: Path) -> None:
    with fault_stack(tmp_path, bridge_options=_dlp_block_keyword()) as fs:
        user = User(*fs.dev.synapse.register_user("alice"))
        async with fs.client(user) as alice:
            room = await alice.create_room(
                name="fail open",
                invite=[fs.bot],
                power_level_content_override={"users": {fs.bot: 100}},
            )

            async def bot_joined() -> bool:
                return fs.bot in await alice.joined_members(room)

            await wait_for(bot_joined, timeout=30, message="the bot to join")
            # The gate is up: the keyword is refused before it exists.
            with pytest.raises(MatrixError) as exc:
                await alice.send_text(room, f"about {KEYWORD}")
            assert exc.value.status == 403 and "codename" in exc.value.error

            assert fs.bridge.stop() == 0
            # Gate unreachable, check_event_for_spam fails open (the module's default).
            leaked = await alice.send_text(room, f"while down: {KEYWORD}")
            harmless = await alice.send_text(room, "while down: nothing to see")

            await asyncio.to_thread(fs.bridge.start)  # its startup ping flushes the backlog

            async def redacted() -> bool:
                event = await alice.get_event(room, leaked)
                return not event.get("content") and "redacted_because" in event.get("unsigned", {})

            await wait_for(redacted, timeout=60, interval=0.5, message="the leaked event redacted")
            kept = await alice.get_event(room, harmless)
            assert kept["content"]["body"] == "while down: nothing to see"
        await fs.wait_stored_once([leaked, harmless])


async def test_gate_down_fails_closed_when_configured(tmp_path: Path) -> None:
    with fault_stack(tmp_path, fail_open={"check_event_for_spam": False}) as fs:
        async with fs.client() as admin:
            room = await admin.create_room(name="fail closed")
            first = await admin.send_text(room, "gate up")
            assert fs.bridge.stop() == 0
            with pytest.raises(MatrixError) as exc:
                await admin.send_text(room, "gate down")
            assert exc.value.errcode == "M_UNKNOWN", exc.value
            await asyncio.to_thread(fs.bridge.start)
            last = await admin.send_text(room, "gate back")
            bodies = [e.get("content", {}).get("body") for e in await admin.messages(room, 20)]
            assert "gate down" not in bodies
        await fs.wait_stored_once([first, last])  # the startup ping flushes Synapse's queue


# -- an unusable data directory at start --------------------------------------------------------

EXIT_CONFIG = 3
EXIT_DATA_DIR = 6


def _run_bridge(config: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge", "run", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _assert_clean_failure(result: subprocess.CompletedProcess[str], path: Path, why: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == EXIT_DATA_DIR, output
    assert "Traceback" not in output, output
    assert str(path) in output, output
    assert why in output, output


@contextlib.contextmanager
def tmpfs(path: Path, *options: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", ",".join(("size=256k", *options)), "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


async def test_unusable_data_dir_is_a_clear_error(tmp_path: Path) -> None:
    """A data_dir under a regular file, on a read-only mount, on a full disk.

    chmod cannot make a directory read-only for root, so the read-only and disk-full cases
    use tmpfs mounts (skipped where mounting is not allowed); the first case runs anywhere.
    Synapse is not needed: the data directory is checked before anything else starts.
    """
    dev = prepare_stack(tmp_path / "stack")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")

    def with_data_dir(data_dir: Path) -> None:
        # Edit through YAML: ruamel folds long values onto a second line.
        y = YAML()
        doc = y.load(dev.config_path.read_text("utf-8"))
        doc["data_dir"] = str(data_dir)
        with dev.config_path.open("w", encoding="utf-8") as fh:
            y.dump(doc, fh)

    with_data_dir(blocker / "data")
    _assert_clean_failure(_run_bridge(dev.config_path), blocker / "data", "Not a directory")

    if os.geteuid() != 0:
        read_only = tmp_path / "ro"
        read_only.mkdir(mode=0o500)
        with_data_dir(read_only)
        _assert_clean_failure(_run_bridge(dev.config_path), read_only, "Permission denied")
        return

    with tmpfs(tmp_path / "ro", "ro") as read_only:
        with_data_dir(read_only / "data")
        _assert_clean_failure(
            _run_bridge(dev.config_path), read_only / "data", "Read-only file system"
        )
        with_data_dir(read_only)
        _assert_clean_failure(_run_bridge(dev.config_path), read_only, "Read-only file system")

    with tmpfs(tmp_path / "full") as full:
        filler = full / "filler"
        with filler.open("wb", buffering=0) as fh, contextlib.suppress(OSError):
            while True:
                fh.write(b"\0" * 4096)
        with_data_dir(full)
        _assert_clean_failure(_run_bridge(dev.config_path), full, "No space left on device")


# -- SIGTERM ---------------------------------------------------------------------------------


async def test_sigterm_exits_cleanly_and_never_acks_without_commit(tmp_path: Path) -> None:
    with fault_stack(tmp_path) as fs:
        cfg = fs.config()
        hs_token = cfg["appservice"]["hs_token"]
        base = f"{fs.dev.bridge_url}/_matrix/app/v1/transactions/"
        acked: list[str] = []
        unavailable: list[str] = []
        answered_after_sigterm: list[int] = []
        stop = asyncio.Event()
        terminated = asyncio.Event()

        async def pusher(n: int, session: aiohttp.ClientSession) -> None:
            i = 0
            while not stop.is_set():
                event_id = f"$sigterm-{n}-{i}:localhost"
                body = {
                    "events": [
                        {
                            "event_id": event_id,
                            "room_id": "!sigterm:localhost",
                            "sender": "@pusher:localhost",
                            "type": "m.room.message",
                            "origin_server_ts": int(time.time() * 1000),
                            "content": {"msgtype": "m.text", "body": f"push {i}"},
                        }
                    ]
                }
                try:
                    async with session.put(
                        base + f"sigterm-{n}-{i}",
                        json=body,
                        headers={"Authorization": f"Bearer {hs_token}"},
                    ) as r:
                        if terminated.is_set():
                            answered_after_sigterm.append(r.status)
                        if r.status == 200:
                            acked.append(event_id)
                        elif r.status == 503:
                            assert (await r.json())["errcode"] == "M_UNKNOWN"
                            unavailable.append(event_id)
                        else:
                            raise AssertionError(f"unexpected status {r.status} during shutdown")
                except (TimeoutError, aiohttp.ClientConnectionError):
                    await asyncio.sleep(0.01)  # listener gone: Synapse would retry later
                i += 1

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            tasks = [asyncio.create_task(pusher(n, session)) for n in range(4)]
            try:
                await wait_for(_async(lambda: len(acked) >= 40), timeout=30, message="40 acks")
                assert fs.bridge.proc is not None
                fs.bridge.proc.terminate()
                terminated.set()
                code = await asyncio.to_thread(fs.bridge.proc.wait, 30)
            finally:
                stop.set()
                await asyncio.gather(*tasks)
        assert code == 0, fs.bridge.log_tail()
        assert "bridge stopped" in bridge_log(fs)
        counts = await fs.stored_counts(acked)
        assert set(counts.values()) == {1}, {e: n for e, n in counts.items() if n != 1}
        print(
            f"SIGTERM: {len(acked)} acknowledged, {len(unavailable)} refused with 503, "
            f"{len(answered_after_sigterm)} answered after the signal"
        )


def _async(fn: Callable[[], bool]) -> Callable[[], Any]:
    async def wrapped() -> bool:
        return fn()

    return wrapped


# -- a registration Synapse does not know ---------------------------------------------------------


WRONG_AS_TOKEN = "not-the-registered-token-0123456789"


async def test_as_token_unknown_to_synapse_is_a_clear_config_error(tmp_path: Path) -> None:
    """The most common setup mistake: Synapse does not load our registration (or has other
    tokens). One line saying what to check, exit code 3, no traceback."""
    with fault_stack(tmp_path, start_bridge=False) as fs:
        result = subprocess.run(
            [sys.executable, "-m", "bridge", "run", "-c", str(fs.dev.config_path)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env={**os.environ, "POLICY_BRIDGE__APPSERVICE__AS_TOKEN": WRONG_AS_TOKEN},
        )
    output = result.stdout + result.stderr
    assert result.returncode == EXIT_CONFIG, output
    assert "refused the bridge's as_token (M_UNKNOWN_TOKEN)" in output, output
    assert "app_service_config_files" in output, output
    assert "Traceback" not in output, output
    assert WRONG_AS_TOKEN not in output, output  # a secret, even a wrong one
