"""Benchmark of ``audit verify`` and ``audit export`` over a real store, against floors.

Builds a store of N records (default 1,000,000; realistic client-format events from
``bench/ingest.py``'s generator, appended through ``WorkQueue.ingest`` in batches of
1,000: encrypted, chained, checkpointed every 1,000 records as configured by default), then
runs the real CLI as a child process, exactly as an operator would::

    python -m bridge audit verify -c config.yaml
    python -m bridge audit export -c config.yaml --format jsonl|csv [--jobs 1] -o out

(export both with its default ``--jobs``: worker processes above 50,000 records, and with
``--jobs 1``: all in the CLI process) and reports records/s (wall time of the child process,
start-up included), peak memory of the whole process tree (the CLI and its worker
processes: the sum of each process's own peak RSS, polled from /proc; see ``_LAUNCHER``) and
CPU seconds (CLI and workers), next to floors measured in the same run on the same records:

- SHA-256 chaining floor: ``hashlib.sha256`` over a ~200-byte record encoding, each hash
  chained into the next, in a tight loop (what verifying needs at the very least);
- chain verifier floor: ``ChainVerifier.feed`` over records already in memory (no database);
- AES-GCM decrypt floor: ``AESGCM.decrypt`` of the store's own ciphertexts, plus
  ``json.loads`` of the plaintext (what exporting needs at the very least);
- raw read floor: the driver alone (stdlib ``sqlite3``, or asyncpg) streaming every row's
  columns out of the same database.

Run: ``python bench/audit_store.py`` (1,000,000 records, SQLite), ``--quick`` (50,000
records), ``--records N``, ``--busy N`` (the CLI runs beside N CPU-bound processes, each in a
session of its own: a machine loaded reproducibly), and ``--postgres postgresql+asyncpg://postgres@127.0.0.1:5432/test``
to measure PostgreSQL too (in a database created for the run, ``bench_audit_<random>``, and
dropped at the end). Ingest with encryption and chaining is measured by ``bench/ingest.py``.

With at least 1,000,000 records, exits 1 if verify is below 100,000 records/s, export with
the default ``--jobs`` (jsonl or csv) below 50,000 records/s, or any run peaks at 200 MB or
more, workers included (smoke runs are not judged: the CLI's start-up dominates them). Rates
are wall time; ``/CPU-s`` is per CPU second of the CLI and its workers, which tells a slow
run from a machine busy with other work (the load average is printed too).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from ingest import EventFactory  # type: ignore[import-not-found, unused-ignore]
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from bridge.audit.chain import GENESIS, ChainVerifier, load_or_create_signing_key
from bridge.audit.keyring import Keyring
from bridge.store import Store, StoreSettings, iter_chain, load_checkpoints

ROOT = Path(__file__).resolve().parents[1]
REQUIRED_VERIFY = 100_000
REQUIRED_EXPORT = 50_000
REQUIRED_PEAK_MB = 200
PEAK_CHECK_RECORDS = 1_000_000
BATCH = 1000
FLOOR_SAMPLE = 200_000


@dataclass
class Run:
    records: int
    seconds: float
    peak_mb: float
    output: str
    cpu: float = 0.0  # CPU seconds of the CLI process and its workers (user + system)
    sampled_mb: float = 0.0  # largest total RSS of the process tree seen in one poll
    cli_mb: float = 0.0  # the CLI process alone (its VmHWM)
    processes: int = 1  # processes in the tree (CLI, workers, resource tracker)
    load: str = "?"  # the machine's 1-minute load average when the run ended

    @property
    def rate(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else float("inf")


# A tiny launcher between this (large) process and the CLI: on Linux a child's ru_maxrss
# starts from its parent's high-water mark at fork, so measuring the CLI as our own child
# would report this process's memory. The launcher is small when it forks the CLI.
#
# Memory of the whole process tree: the export's worker processes (and multiprocessing's
# resource tracker) are the CLI's children, so the launcher polls /proc every 50 ms for the
# CLI and every descendant, and keeps each process's VmHWM (its own peak RSS, exact however
# coarse the polling, read until it exits). ``peak`` = the sum of those per-process peaks:
# an upper bound on the tree's simultaneous RSS (peaks need not coincide, and pages shared
# between processes count once per process). ``sampled`` = the largest sum of the current
# VmRSS seen in one poll (a lower bound). CPU seconds from os.wait4 cover the CLI and the
# descendants it waited for (the workers).
_LAUNCHER = """
import os, sys, time
t = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execv(sys.executable, [sys.executable, "-m", "bridge", "audit", *sys.argv[1:]])

def kb(status, key):
    for line in status.splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    return 0

def children(p):
    out = []
    try:
        for tid in os.listdir(f"/proc/{p}/task"):
            with open(f"/proc/{p}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out

peaks, sampled = {}, 0
while True:
    done, status, usage = os.wait4(pid, os.WNOHANG)
    if done:
        break
    now, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                st = f.read()
        except OSError:
            continue
        peaks[p] = max(peaks.get(p, 0), kb(st, "VmHWM:"))
        now += kb(st, "VmRSS:")
        todo += children(p)
    sampled = max(sampled, now)
    time.sleep(0.05)
cpu = usage.ru_utime + usage.ru_stime
code = os.waitstatus_to_exitcode(status)
peak = sum(peaks.values()) if peaks else usage.ru_maxrss
cli = peaks.get(pid, usage.ru_maxrss)
print(f"@@launcher {code} {time.perf_counter() - t} {peak} {cpu} {sampled} {cli} {len(peaks)}")
"""


def run_cli(args: list[str], cwd: Path) -> Run:
    """Run ``python -m bridge audit …`` in a fresh process; wall time, peak RSS of the
    process tree, CPU seconds."""
    proc = subprocess.run(
        [sys.executable, "-c", _LAUNCHER, *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    out = proc.stdout.decode(errors="replace")
    lines = out.strip().splitlines()
    tag = lines[-1].split() if lines else []
    if len(tag) != 8 or tag[0] != "@@launcher" or tag[1] != "0":
        raise SystemExit(f"`audit {args[0]}` failed:\n{out}")
    # kB (VmHWM, VmRSS, ru_maxrss on Linux)
    return Run(
        0,
        float(tag[2]),
        int(tag[3]) / 1024,
        "\n".join(lines[:-1]),
        float(tag[4]),
        sampled_mb=int(tag[5]) / 1024,
        cli_mb=int(tag[6]) / 1024,
        processes=int(tag[7]),
        load=_loadavg(),
    )


# -- building the store ------------------------------------------------------------------


async def build_store(url: str, directory: Path, n: int) -> dict[str, Any]:
    """Append ``n`` event records through the Store API; write the config the CLI reads."""
    keyring_path = directory / "keys" / "audit-keyring.json"
    signing_path = directory / "keys" / "audit-signing.pem"
    keyring_path.parent.mkdir(parents=True, exist_ok=True)
    keyring = Keyring.generate()
    keyring.save(keyring_path)
    signing = load_or_create_signing_key(signing_path)
    store = await Store.open(
        url,
        StoreSettings(
            keyring=keyring,
            signing_key=signing,
            checkpoint_every=1000,
            checkpoint_log=signing_path.with_name("audit-signing.checkpoints.jsonl"),
        ),
    )
    factory = EventFactory(uuid.uuid4().hex[:8])
    t = time.perf_counter()
    done = 0
    try:
        while done < n:
            k = min(BATCH, n - done)
            await store.queue.ingest(f"b{done}", [factory.event() for _ in range(k)])
            done += k
            if done % 100_000 == 0:
                rate = done / (time.perf_counter() - t)
                print(f"    built {done:,} records ({rate:,.0f}/s)", flush=True)
    finally:
        await store.close()
    seconds = time.perf_counter() - t
    config = {
        "appservice": {
            "as_token": "bench-as-token-xxxx-xxxxxxxxxxxx",
            "hs_token": "bench-hs-token-yyyy-xxxxxxxxxxxx",
        },
        "gate": {"token": "bench-gate-token-zzzz-xxxxxxxxxx"},
        "data_dir": str(directory / "data"),
        "database": {"url": url},
        "audit": {
            "keyring": str(keyring_path),
            "signing_key": str(signing_path),
            "checkpoint_every": 1000,
        },
    }
    (directory / "config.yaml").write_text(json.dumps(config))
    return {"seconds": seconds, "signing": signing}


# -- floors --------------------------------------------------------------------------------


def floor_sha_chain(n: int) -> float:
    """SHA-256 over a ~200-byte encoding per record, chained."""
    body = os.urandom(168)
    sha = hashlib.sha256
    prev = GENESIS
    t = time.perf_counter()
    for _ in range(n):
        prev = sha(prev + body).digest()
    return n / (time.perf_counter() - t)


async def load_sample(url: str, n: int) -> list[Any]:
    engine = create_async_engine(url)
    out = []
    try:
        async for rec in iter_chain(engine):
            out.append(rec)
            if len(out) >= n:
                break
    finally:
        await engine.dispose()
    return out


def floor_verifier(sample: list[Any], signing: Ed25519PrivateKey) -> float:
    """ChainVerifier.feed over records in memory (no checkpoints, no database)."""
    verifier = ChainVerifier([signing.public_key()], [])
    feed = verifier.feed
    t = time.perf_counter()
    for fields, h, ct in sample:
        feed(fields, h, ct)
    seconds = time.perf_counter() - t
    report = verifier.finish()
    assert report.ok, report
    return len(sample) / seconds


def floor_decrypt(sample: list[Any]) -> float:
    """AES-256-GCM decrypt + json.loads of the store's ciphertext sizes (one key)."""
    aead = AESGCM(AESGCM.generate_key(256))
    nonce = os.urandom(12)
    plain = [json.dumps({"body": "x" * (len(r.ciphertext) - 16 - 12)}).encode() for r in sample]
    cts = [aead.encrypt(nonce, p, b"aad-of-a-record-32-bytes-long..") for p in plain]
    dec, loads = aead.decrypt, json.loads
    t = time.perf_counter()
    for ct in cts:
        loads(dec(nonce, ct, b"aad-of-a-record-32-bytes-long.."))
    return len(cts) / (time.perf_counter() - t)


def floor_read_sqlite(path: str) -> float:
    db = sqlite3.connect(path)
    try:
        cur = db.execute(
            "SELECT seq, ts, kind, event_id_idx, room_idx, sender_idx, type_idx, key_id, "
            "nonce, ct_digest, origin_ts, hash, ciphertext FROM records ORDER BY seq"
        )
        t = time.perf_counter()
        n = 0
        while rows := cur.fetchmany(10_000):
            n += len(rows)
        return n / (time.perf_counter() - t)
    finally:
        db.close()


async def floor_read_postgres(url: str) -> float:
    import asyncpg

    u = make_url(url)
    conn = await asyncpg.connect(
        user=u.username, password=u.password, host=u.host, port=u.port, database=u.database
    )
    try:
        n = 0
        t = time.perf_counter()
        async with conn.transaction():
            cur = conn.cursor(
                "SELECT seq, ts, kind, event_id_idx, room_idx, sender_idx, type_idx, key_id, "
                "nonce, ct_digest, origin_ts, hash, ciphertext FROM records ORDER BY seq",
                prefetch=10_000,
            )
            async for _ in cur:
                n += 1
        return n / (time.perf_counter() - t)
    finally:
        await conn.close()


# -- PostgreSQL database for the run ---------------------------------------------------------


class PostgresDatabase:
    """A database created for the run and dropped at the end; nothing else is touched."""

    def __init__(self, url: str) -> None:
        self.admin_url = url
        self.name = f"bench_audit_{uuid.uuid4().hex[:12]}"
        self.url = make_url(url).set(database=self.name).render_as_string(hide_password=False)

    async def _admin(self, sql: str) -> None:
        engine = create_async_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        try:
            async with engine.connect() as conn:
                await conn.exec_driver_sql(sql)
        finally:
            await engine.dispose()

    async def create(self) -> None:
        await self._admin(f'CREATE DATABASE "{self.name}"')

    async def drop(self) -> None:
        await self._admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


# -- one backend -------------------------------------------------------------------------------


def fmt(name: str, rate: float, floor: float | None = None, extra: str = "") -> str:
    ratio = f"  {rate / floor:5.2f} x floor" if floor else ""
    return f"  {name:<52} {rate:>12,.0f} rec/s{ratio}{extra}"


class Busy:
    """``n`` CPU-bound processes, each in a session of its own (as another user's work would
    be: Linux schedules sessions fairly against each other), while the CLI runs."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Busy:
        for _ in range(self.n):
            self.procs.append(
                subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
            )
        if self.procs:
            time.sleep(1)  # let the load show in the scheduler (and the load average)
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()
        self.procs.clear()


async def bench_backend(
    label: str, url: str, directory: Path, n: int, busy: int = 0
) -> dict[str, Any]:
    print(f"{label}: building a store of {n:,} records through WorkQueue.ingest …")
    built = await build_store(url, directory, n)
    print(f"    built in {built['seconds']:.1f}s ({n / built['seconds']:,.0f} records/s)")
    engine = create_async_engine(url)
    try:
        cps = len(await load_checkpoints(engine))
    finally:
        await engine.dispose()
    sample = await load_sample(url, min(n, FLOOR_SAMPLE))
    floors = {
        "sha": floor_sha_chain(len(sample)),
        "verifier": floor_verifier(sample, built["signing"]),
        "decrypt": floor_decrypt(sample),
    }
    del sample
    if url.startswith("sqlite"):
        floors["read"] = floor_read_sqlite(url.split(":///", 1)[1])
    else:
        floors["read"] = await floor_read_postgres(url)
    cfg = str(directory / "config.yaml")
    with Busy(busy):
        verify = run_cli(["verify", "-c", cfg], directory)
    verify.records = n
    exports: dict[str, Run] = {}
    size_mb = 0.0
    for fmt in ("jsonl", "csv"):
        for jobs in ("1", "default"):
            out = directory / f"export.{fmt}"
            args = ["export", "-c", cfg, "--format", fmt, "-o", str(out)]
            with Busy(busy):
                run = run_cli([*args, "--jobs", jobs] if jobs != "default" else args, directory)
            # each export appends its own audit record: the next one exports one more
            m = re.search(r"exported (\d+) records", run.output)
            assert m, run.output
            run.records = int(m.group(1))
            assert run.records >= n, run.output
            if fmt == "jsonl":
                with out.open("rb") as fh:
                    lines = sum(1 for _ in fh)
                assert lines == run.records, f"export wrote {lines} lines, not {run.records}"
                size_mb = out.stat().st_size / 1e6
            out.unlink()
            exports[f"{fmt} --jobs {jobs}"] = run
    return {
        "floors": floors,
        "verify": verify,
        "exports": exports,
        "checkpoints": cps,
        "export_mb": size_mb,
        "build": n / built["seconds"],
    }


def report(label: str, res: dict[str, Any], n: int) -> bool:
    fl = res["floors"]
    v: Run = res["verify"]
    exports: dict[str, Run] = res["exports"]
    print(f"\n{label} ({n:,} records, {res['checkpoints']:,} checkpoints):")
    print(fmt("floor: raw SHA-256 chaining (~200 B per record)", fl["sha"]))
    print(fmt("floor: ChainVerifier.feed, records in memory", fl["verifier"]))
    print(fmt("floor: AES-256-GCM decrypt + json.loads", fl["decrypt"]))
    print(fmt("floor: driver alone streaming every row", fl["read"]))
    print(fmt("build: WorkQueue.ingest, 1,000 per commit", res["build"]))
    print(
        fmt(
            "audit verify (CLI process, wall time)",
            v.rate,
            fl["sha"],
            f", {v.rate / fl['verifier']:.2f} x verifier; peak RSS {v.peak_mb:,.0f} MB; "
            f"{v.records / v.cpu:,.0f}/CPU-s; load {v.load}",
        )
    )
    print(f"      {v.output.splitlines()[-1] if v.output else ''}")
    for name, e in exports.items():
        print(
            fmt(
                f"audit export --format {name}",
                e.rate,
                fl["decrypt"],
                f"; peak RSS {e.peak_mb:,.0f} MB ({e.processes} processes; CLI "
                f"{e.cli_mb:,.0f} MB, sampled total {e.sampled_mb:,.0f} MB); "
                f"{e.records / e.cpu:,.0f}/CPU-s; load {e.load}",
            )
        )
    print(f"  jsonl written: {res['export_mb']:,.0f} MB; load average now: {_loadavg()}")
    if n < PEAK_CHECK_RECORDS:
        # a smoke run: the CLI's start-up (imports, opening the store) dominates
        print(f"  requirement: not judged below {PEAK_CHECK_RECORDS:,} records (smoke run)")
        return True
    defaults = [e for name, e in exports.items() if name.endswith("default")]
    ok = (
        v.rate >= REQUIRED_VERIFY
        and all(e.rate >= REQUIRED_EXPORT for e in defaults)
        and v.peak_mb < REQUIRED_PEAK_MB
        and all(e.peak_mb < REQUIRED_PEAK_MB for e in exports.values())
    )
    print(
        f"  requirement (verify >= {REQUIRED_VERIFY:,}/s, export (default --jobs, jsonl and "
        f"csv) >= {REQUIRED_EXPORT:,}/s, peak < {REQUIRED_PEAK_MB} MB incl. workers): "
        f"{'PASS' if ok else 'FAIL'}"
    )
    return ok


def _loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


async def amain(args: argparse.Namespace) -> int:
    n = args.records
    busy = f"; CLI runs beside {args.busy} busy process(es)" if args.busy else ""
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs{busy}", flush=True)
    results: list[tuple[str, dict[str, Any]]] = []
    tmp = Path(args.tmpdir) if args.tmpdir else None
    with tempfile.TemporaryDirectory(prefix="bench-audit-", dir=tmp) as d:
        directory = Path(d)
        sqlite_dir = directory / "sqlite"
        sqlite_dir.mkdir()
        url = f"sqlite+aiosqlite:///{sqlite_dir / 'bridge.db'}"
        results.append(("SQLite", await bench_backend("SQLite", url, sqlite_dir, n, args.busy)))
        (sqlite_dir / "bridge.db").unlink()
        if args.postgres:
            pg = PostgresDatabase(args.postgres)
            await pg.create()
            try:
                pg_dir = directory / "postgres"
                pg_dir.mkdir()
                results.append(
                    ("PostgreSQL", await bench_backend("PostgreSQL", pg.url, pg_dir, n, args.busy))
                )
            finally:
                await pg.drop()
    ok = True
    for label, res in results:
        ok = report(label, res, n) and ok
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run over 50,000 records")
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--postgres", metavar="URL", help="also run on PostgreSQL (asyncpg URL)")
    ap.add_argument("--tmpdir", help="where the SQLite files go (default: system temp)")
    ap.add_argument(
        "--busy",
        type=int,
        default=0,
        metavar="N",
        help="run the CLI while N CPU-bound processes (in sessions of their own) load the machine",
    )
    args = ap.parse_args()
    if args.quick:
        args.records = 50_000
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
