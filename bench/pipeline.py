"""End-to-end benchmark: the real ``bridge run`` process with its worker, fed as Synapse feeds it.

One throwaway stack from the dev harness: a real Synapse (SQLite) for the bot's client, and
``python -m bridge run`` as a child process (``bridge.dev.devstack``). The benchmark then
pushes appservice transactions straight to the bridge, exactly as Synapse pushes them:
``PUT /_matrix/app/v1/transactions/{txnId}`` with the registration's ``hs_token``, sequential
numeric txnIds, 100 realistic client-format events per transaction (``bench/ingest.py``'s
generator), one transaction in flight.

Measured per variant (SQLite; SQLite with DLP on: 10,000 keywords and every detector;
PostgreSQL with ``--postgres``):

- **acknowledged rate**: events / time until the last transaction was answered 200;
- **processed rate**: events / time until the worker has marked every transaction processed
  (polled from the bridge's database every 10 ms: ``transactions.processed``);
- **server CPU per event**: user + system time of the bridge process (all threads, from
  ``/proc/<pid>/stat``) from the first push until the queue is drained, divided by events;
- **lag**: transactions pushed as Synapse would at ``--lag-factor`` (5) x Synapse's maximum
  send rate on this machine (``--synapse-rate``, default the soak's measurement, 42 msg/s;
  ``--measure-synapse S`` measures it in this run, 4 senders for S seconds against the
  first variant's bridge with the gate on): events
  arrive evenly, each push carries what arrived while the previous one was in flight (at most
  100), and an event's lag is the time from its arrival to the moment its transaction is seen
  processed (p50 / p95 / max).

The floor, measured in the same run just before and just after each variant's throughput
part (the mean of the two is the ratio's denominator): ``json.loads`` of the same bodies plus
stdlib sqlite3 inserts of the same events (each re-encoded as the archive does) into a table
with a unique key and two indexes, WAL, ``synchronous=FULL``, one commit per transaction.
On a shared machine the rates move with the load; CPU time moves much less, so the report
also gives the floor's CPU per event (one thread) over the bridge's (``CPU x``).

Requirements: processed (SQLite) >= 1/3 of the floor; lag max < 1 s. Exits 1 otherwise.

    python bench/pipeline.py                  # SQLite and SQLite + DLP, 200 txns each
    python bench/pipeline.py --quick          # 40 transactions, 10 s of lag test
    python bench/pipeline.py --postgres postgresql+asyncpg://postgres@127.0.0.1:5432/test
    python bench/pipeline.py --profile DIR    # py-spy record of the bridge per variant
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import asyncpg
from ruamel.yaml import YAML

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gate_latency import keywords
from ingest import EVENTS_PER_TXN, EventFactory, pct

from bridge.dev.devstack import BridgeProcess, DevStack, prepare_stack
from bridge.policy.dlp import DETECTORS

REQUIRED_RATIO = 1 / 3
MAX_LAG = 1.0
POLL = 0.01
SOAK_SYNAPSE_RATE = 42.0  # msg/s, BENCHMARKS.md "Soak" (4 senders, SQLite, gate on)
TICKS = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------
# The floor
# ---------------------------------------------------------------------------------------


@dataclass
class Floor:
    rate: float  # events/s
    cpu_per_event: float  # seconds (one thread: the process's CPU time)


def floor(bodies: list[bytes], directory: Path) -> Floor:
    """json.loads + sqlite3 inserts (unique key, two indexes, WAL, FULL, commit per txn)."""
    path = directory / f"floor-{uuid.uuid4().hex}.db"
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute(
            "CREATE TABLE events (seq INTEGER PRIMARY KEY, event_id TEXT NOT NULL UNIQUE,"
            " room_id TEXT, sender TEXT, origin_ts INTEGER, data BLOB)"
        )
        db.execute("CREATE INDEX ix_room ON events (room_id)")
        db.execute("CREATE INDEX ix_sender ON events (sender)")
        sql = "INSERT INTO events (event_id, room_id, sender, origin_ts, data) VALUES (?,?,?,?,?)"
        dumps, loads = json.dumps, json.loads
        cpu = time.process_time()
        t = time.perf_counter()
        for body in bodies:
            rows = [
                (
                    e["event_id"],
                    e["room_id"],
                    e["sender"],
                    e["origin_server_ts"],
                    dumps(e, ensure_ascii=False, separators=(",", ":")).encode(),
                )
                for e in loads(body)["events"]
            ]
            db.execute("BEGIN")
            db.executemany(sql, rows)
            db.execute("COMMIT")
        n = len(bodies) * EVENTS_PER_TXN
        return Floor(n / (time.perf_counter() - t), (time.process_time() - cpu) / n)
    finally:
        db.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------
# Watching the bridge: its database (processed transactions) and its CPU time
# ---------------------------------------------------------------------------------------


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """User + system CPU time of a process (all its threads), or of its thread ``tid``."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    with open(path, encoding="ascii") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


class Watcher:
    """Reads the bridge's ``transactions`` table: which transactions are processed."""

    def __init__(self, sqlite_path: Path | None, pg_dsn: str | None) -> None:
        self.sqlite_path = sqlite_path
        self.pg_dsn = pg_dsn
        self.db: sqlite3.Connection | None = None
        self.pg: asyncpg.Connection | None = None

    async def open(self) -> None:
        if self.pg_dsn:
            self.pg = await asyncpg.connect(self.pg_dsn)
        else:
            assert self.sqlite_path is not None
            self.db = sqlite3.connect(f"file:{self.sqlite_path}?mode=ro", uri=True)

    async def close(self) -> None:
        if self.pg is not None:
            await self.pg.close()
        if self.db is not None:
            self.db.close()

    async def processed_since(self, after_id: int) -> list[tuple[int, str, bool]]:
        """(id, txn_id, processed) of the transactions after ``after_id``, in order."""
        sql = "SELECT id, txn_id, processed FROM transactions WHERE id > {} ORDER BY id"
        if self.pg is not None:
            rows = await self.pg.fetch(sql.format("$1"), after_id)
            return [(r[0], r[1], bool(r[2])) for r in rows]
        assert self.db is not None
        return [(r[0], r[1], bool(r[2])) for r in self.db.execute(sql.format("?"), (after_id,))]

    async def pending(self) -> int:
        sql = "SELECT count(*) FROM transactions WHERE NOT processed"
        if self.pg is not None:
            return int(await self.pg.fetchval(sql))
        assert self.db is not None
        return int(self.db.execute(sql).fetchone()[0])

    async def max_id(self) -> int:
        sql = "SELECT coalesce(max(id), 0) FROM transactions"
        if self.pg is not None:
            return int(await self.pg.fetchval(sql))
        assert self.db is not None
        return int(self.db.execute(sql).fetchone()[0])


class Tracker:
    """Polls the watcher; remembers when each txnId was first seen processed."""

    def __init__(self, watcher: Watcher) -> None:
        self.watcher = watcher
        self.done_at: dict[str, float] = {}
        self._after = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._after = await self.watcher.max_id()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            now = time.perf_counter()
            for qid, txn_id, processed in await self.watcher.processed_since(self._after):
                if not processed:
                    break  # the worker goes in order; look again from here next time
                self.done_at.setdefault(txn_id, now)
                self._after = qid
            await asyncio.sleep(POLL)

    async def wait_for(self, txn_ids: list[str], timeout: float = 300) -> float:
        deadline = time.perf_counter() + timeout
        while any(t not in self.done_at for t in txn_ids):
            if time.perf_counter() > deadline:
                missing = sum(1 for t in txn_ids if t not in self.done_at)
                raise TimeoutError(f"{missing} transactions not processed in {timeout} s")
            await asyncio.sleep(POLL)
        return max(self.done_at[t] for t in txn_ids)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass


# ---------------------------------------------------------------------------------------
# Pushing transactions as Synapse does
# ---------------------------------------------------------------------------------------


class Pusher:
    """One transaction in flight, sequential numeric txnIds, the hs_token."""

    def __init__(self, session: aiohttp.ClientSession, port: int, hs_token: str, first: int):
        self.session = session
        self.base = f"http://127.0.0.1:{port}/_matrix/app/v1/transactions/"
        self.headers = {"Authorization": f"Bearer {hs_token}", "Content-Type": "application/json"}
        self.next_txn = first

    async def push(self, body: bytes) -> str:
        txn_id = str(self.next_txn)
        self.next_txn += 1
        for attempt in range(20):  # Synapse retries a failed transaction with the same txnId
            async with self.session.put(self.base + txn_id, data=body, headers=self.headers) as r:
                await r.read()
                if r.status == 200:
                    return txn_id
            await asyncio.sleep(0.2 * (attempt + 1))
        raise RuntimeError(f"transaction {txn_id}: HTTP {r.status}")


@dataclass
class Throughput:
    events: int
    acked: float  # events/s
    processed: float  # events/s
    cpu_per_event: float  # seconds
    main_share: float  # of that CPU, the part of the main (event loop) thread


@dataclass
class Lag:
    rate: float  # offered events/s
    events: int
    txns: int
    lags: list[float] = field(default_factory=list)


async def throughput(
    pusher: Pusher, tracker: Tracker, pid: int, warm: list[bytes], bodies: list[bytes]
) -> Throughput:
    warm_ids = [await pusher.push(b) for b in warm]
    await tracker.wait_for(warm_ids)
    await asyncio.sleep(0.5)
    cpu0, main0 = cpu_seconds(pid), cpu_seconds(pid, pid)
    t0 = time.perf_counter()
    ids = [await pusher.push(b) for b in bodies]
    t_ack = time.perf_counter()
    t_done = await tracker.wait_for(ids)
    cpu, main = cpu_seconds(pid) - cpu0, cpu_seconds(pid, pid) - main0
    n = len(bodies) * EVENTS_PER_TXN
    return Throughput(n, n / (t_ack - t0), n / (t_done - t0), cpu / n, main / cpu if cpu else 0)


async def lag_test(pusher: Pusher, tracker: Tracker, rate: float, seconds: float) -> Lag:
    """Events arrive evenly at ``rate``; each push takes what arrived (at most 100)."""
    factory = EventFactory(f"lag-{uuid.uuid4().hex[:8]}", seed=7)
    total = int(rate * seconds)
    events = [factory.event() for _ in range(total)]
    t0 = time.perf_counter()
    arrival = [t0 + i / rate for i in range(total)]
    sent = 0
    pushed: list[tuple[str, int, int]] = []  # txn_id, first index, end index
    while sent < total:
        now = time.perf_counter()
        if arrival[sent] > now:
            await asyncio.sleep(arrival[sent] - now)
            now = time.perf_counter()
        end = sent
        while end < total and end - sent < EVENTS_PER_TXN and arrival[end] <= now:
            end += 1
        body = json.dumps({"events": events[sent:end]}, separators=(",", ":")).encode()
        pushed.append((await pusher.push(body), sent, end))
        sent = end
    await tracker.wait_for([t for t, _, _ in pushed], timeout=120)
    result = Lag(rate, total, len(pushed))
    for txn_id, a, b in pushed:
        done = tracker.done_at[txn_id]
        result.lags.extend(done - arrival[i] for i in range(a, b))
    return result


# ---------------------------------------------------------------------------------------
# Synapse's maximum send rate (optional, in this run)
# ---------------------------------------------------------------------------------------


async def synapse_rate(dev: DevStack, seconds: float, senders: int = 4) -> float:
    rooms: list[tuple[str, str]] = []
    for i in range(senders):
        _uid, token = dev.synapse.register_user(f"ratesender{i}")
        room = dev.synapse.request(
            "POST", "/_matrix/client/v3/createRoom", {"name": f"rate {i}"}, access_token=token
        )["room_id"]
        rooms.append((token, room))
    rnd = random.Random(3)
    count = 0
    deadline = time.perf_counter() + seconds

    async def send(session: aiohttp.ClientSession, token: str, room: str, n: int) -> None:
        nonlocal count
        i = 0
        while time.perf_counter() < deadline:
            i += 1
            url = (
                f"{dev.synapse.url}/_matrix/client/v3/rooms/{quote(room)}/send/"
                f"m.room.message/r{n}-{i}"
            )
            body = {"msgtype": "m.text", "body": " ".join(rnd.choices(WORDS, k=30))}
            async with session.put(
                url, json=body, headers={"Authorization": f"Bearer {token}"}
            ) as r:
                await r.read()
                if r.status == 200:
                    count += 1

    t = time.perf_counter()
    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(send(session, tok, room, n) for n, (tok, room) in enumerate(rooms)))
    return count / (time.perf_counter() - t)


WORDS = "please review the quarterly figures before friday thanks team".split()


# ---------------------------------------------------------------------------------------
# Variants
# ---------------------------------------------------------------------------------------


@dataclass
class Variant:
    name: str
    database_url: str = ""
    pg_dsn: str | None = None
    dlp: bool = False


def dlp_options(n_keywords: int) -> dict[str, Any]:
    return {
        "keywords": [
            {
                "name": "codenames",
                "keywords": keywords(n_keywords, random.Random(1)),
                "action": "block",
            }
        ],
        "detectors": dict.fromkeys(DETECTORS, "block"),
    }


async def create_pg_database(url: str) -> tuple[str, str, str]:
    """A database of its own for the run: (bridge URL, asyncpg DSN, admin DSN)."""
    dsn = url.replace("postgresql+asyncpg://", "postgresql://")
    name = f"bench_pipeline_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    base = dsn.rsplit("/", 1)[0]
    return f"{url.rsplit('/', 1)[0]}/{name}", f"{base}/{name}", dsn


async def drop_pg_database(admin_dsn: str, bridge_dsn: str) -> None:
    name = bridge_dsn.rsplit("/", 1)[1]
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@dataclass
class SynapseRate:
    """Synapse's maximum send rate (msg/s): measured in this run, or the documented one."""

    rate: float
    measured: bool


@dataclass
class VariantResult:
    variant: Variant
    floor: float  # events/s: the mean of the floor run just before and just after
    floor_cpu: float  # seconds of CPU per event, the lower of the two
    tp: Throughput
    lag: Lag | None
    load: float


async def run_variant(
    dev: DevStack,
    root: Path,
    variant: Variant,
    args: argparse.Namespace,
    bodies: list[bytes],
    warm: list[bytes],
    first_txn: int,
    synapse: SynapseRate,
) -> VariantResult:
    data_dir = root / f"data-{variant.name}"
    configure_variant(dev.config_path, variant, data_dir, args)
    bridge = BridgeProcess(dev.config_path, root / f"bridge-{variant.name}.log", dev.bridge_port)
    bridge.start(timeout=180)
    assert bridge.proc is not None
    pid = bridge.proc.pid
    hs_token = str(YAML(typ="safe").load(dev.registration_path.read_text("utf-8"))["hs_token"])
    watcher = Watcher(data_dir / "bridge.db", variant.pg_dsn)
    profiler: subprocess.Popen[bytes] | None = None
    try:
        await watcher.open()
        # let the start-up events (management room, invites) drain
        for _ in range(300):
            if await watcher.pending() == 0:
                break
            await asyncio.sleep(0.1)
        if args.measure_synapse and not synapse.measured:
            # with this bridge running: Synapse calls its gate for every message
            synapse.rate = await synapse_rate(dev, args.measure_synapse)
            synapse.measured = True
            print(f"  Synapse accepted {synapse.rate:.1f} msg/s (gate on)", flush=True)
            for _ in range(300):
                if await watcher.pending() == 0:
                    break
                await asyncio.sleep(0.1)
        tracker = Tracker(watcher)
        await tracker.start()
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            pusher = Pusher(session, dev.bridge_port, hs_token, first_txn)
            floor_before = floor(bodies, root)
            if args.profile:
                out = Path(args.profile) / f"{variant.name}.txt"
                gil = ["--gil"] if args.profile_gil else []
                spy = ["py-spy", "record", "-p", str(pid), "-f", "raw", "-o", str(out)]
                profiler = subprocess.Popen(
                    [*spy, "-r", "200", *gil],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                await asyncio.sleep(1)
            tp = await throughput(pusher, tracker, pid, warm, bodies)
            floor_after = floor(bodies, root)
            if profiler is not None:
                profiler.send_signal(signal.SIGINT)
                await asyncio.to_thread(profiler.wait, 30)
                profiler = None
            lag = None
            if args.lag_seconds > 0:
                lag_rate = synapse.rate * args.lag_factor
                lag = await lag_test(pusher, tracker, lag_rate, args.lag_seconds)
        await tracker.stop()
        return VariantResult(
            variant,
            (floor_before.rate + floor_after.rate) / 2,
            min(floor_before.cpu_per_event, floor_after.cpu_per_event),
            tp,
            lag,
            os.getloadavg()[0],
        )
    finally:
        if profiler is not None:
            profiler.kill()
        await watcher.close()
        if bridge.stop() not in (0, None):
            print(f"  bridge exit code {bridge.proc.returncode}:\n{bridge.log_tail(20)}")


def configure_variant(
    config_path: Path, variant: Variant, data_dir: Path, args: argparse.Namespace
) -> None:
    """Point the bridge at this variant's database, data directory and DLP policy."""
    y = YAML()
    cfg = y.load(config_path.read_text("utf-8"))
    cfg["data_dir"] = str(data_dir)
    cfg["database"]["url"] = variant.database_url
    cfg["logging"]["level"] = "WARNING"
    if variant.dlp:
        cfg["dlp"] = dlp_options(args.keywords)
    elif "dlp" in cfg:
        del cfg["dlp"]
    with config_path.open("w", encoding="utf-8") as fh:
        y.dump(cfg, fh)


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------


def report(results: list[VariantResult], synapse: float, measured: bool, factor: float) -> bool:
    ok = True
    print()
    src = "measured in this run" if measured else "BENCHMARKS.md soak measurement"
    print(f"Synapse max send rate: {synapse:.1f} msg/s ({src}); lag test at {factor:g}x")
    print(
        f"{'variant':<14} {'floor ev/s':>10} {'acked ev/s':>11} {'processed':>10} "
        f"{'x floor':>8} {'CPU/event':>10} {'floor CPU':>10} {'CPU x':>6} "
        f"{'lag p50/p95/max (s)':>22} {'load':>5}"
    )
    for r in results:
        ratio = r.tp.processed / r.floor
        lag = "-"
        if r.lag is not None and r.lag.lags:
            lag = f"{pct(r.lag.lags, 0.5):.3f}/{pct(r.lag.lags, 0.95):.3f}/{max(r.lag.lags):.3f}"
            if max(r.lag.lags) >= MAX_LAG:
                ok = False
        if r.variant.name == "sqlite" and ratio < REQUIRED_RATIO:
            ok = False
        print(
            f"{r.variant.name:<14} {r.floor:>10,.0f} {r.tp.acked:>11,.0f} {r.tp.processed:>10,.0f} "
            f"{ratio:>8.2f} {r.tp.cpu_per_event * 1e6:>8.0f}µs {r.floor_cpu * 1e6:>8.0f}µs "
            f"{r.floor_cpu / r.tp.cpu_per_event:>6.2f} {lag:>22} {r.load:>5.2f}"
        )
    for r in results:
        if r.lag is not None:
            print(
                f"  lag test {r.variant.name}: {r.lag.events} events at {r.lag.rate:.0f}/s in "
                f"{r.lag.txns} transactions (≈ {r.lag.events / max(1, r.lag.txns):.1f} per txn)"
            )
    print(
        f"requirements (SQLite processed >= 1/3 of the floor; lag max < {MAX_LAG:g} s): "
        f"{'PASS' if ok else 'FAIL'}"
    )
    return ok


async def amain(args: argparse.Namespace) -> int:
    root = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    factory = EventFactory("pipeline")
    warm = factory.transactions(10)
    bodies = factory.transactions(args.transactions)
    variants = [Variant("sqlite"), Variant("sqlite+dlp", dlp=True)]
    pg: tuple[str, str, str] | None = None
    dev: DevStack | None = None
    results: list[VariantResult] = []
    try:
        print(
            f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; starting Synapse …",
            flush=True,
        )
        dev = prepare_stack(root / "stack")
        dev.synapse.start(timeout=120)
        synapse = SynapseRate(args.synapse_rate, measured=False)
        if args.postgres:
            pg = await create_pg_database(args.postgres)
            variants.append(Variant("postgresql", pg[0], pg[1]))
        if args.only:
            variants = [v for v in variants if v.name in args.only]
        for i, variant in enumerate(variants):
            print(f"variant {variant.name} …", flush=True)
            # the bodies get fresh event IDs per variant only through a fresh database
            res = await run_variant(
                dev, root, variant, args, bodies, warm, 10_000_000 * (i + 1), synapse
            )
            results.append(res)
            print(
                f"  acked {res.tp.acked:,.0f} ev/s, processed {res.tp.processed:,.0f} ev/s "
                f"({res.tp.processed / res.floor:.2f} x floor {res.floor:,.0f}), "
                f"{res.tp.cpu_per_event * 1e6:.0f} µs CPU/event "
                f"({res.tp.main_share:.0%} in the event loop's thread)",
                flush=True,
            )
    finally:
        if dev is not None:
            dev.synapse.stop()
        if pg is not None:
            await drop_pg_database(pg[2], pg[1])
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0 if report(results, synapse.rate, synapse.measured, args.lag_factor) else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="40 transactions, 10 s lag test")
    ap.add_argument("--transactions", type=int, default=200)
    ap.add_argument("--keywords", type=int, default=10_000)
    ap.add_argument("--postgres", metavar="URL", help="also on PostgreSQL (asyncpg URL)")
    ap.add_argument("--only", nargs="+", help="variant names to run")
    ap.add_argument("--synapse-rate", type=float, default=SOAK_SYNAPSE_RATE)
    ap.add_argument("--measure-synapse", type=float, metavar="SECONDS", default=0.0)
    ap.add_argument("--lag-factor", type=float, default=5.0)
    ap.add_argument("--lag-seconds", type=float, default=20.0)
    ap.add_argument("--profile", metavar="DIR", help="py-spy record the bridge (raw output)")
    ap.add_argument("--profile-gil", action="store_true", help="py-spy --gil: GIL holders only")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    if args.quick:
        args.transactions, args.lag_seconds = 40, 10.0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
