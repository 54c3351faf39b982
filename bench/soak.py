"""Soak: a real Synapse with the gate on, N senders at Synapse's maximum rate for minutes.

One throwaway stack: a real Synapse (SQLite) loading ``synapse_http_antispam`` pointed at
the bridge's gate, and the bridge as a child process (``python -m bridge run``) with a
realistic DLP policy (300 keywords and every built-in detector, all ``block``). N senders
(default 4), each its own user with rate limits lifted and its own room, plus one room they
all share (every fourth message goes there), send ≈ 200-character messages back to back
(one request in flight per sender), so Synapse runs at the most it accepts. About 1 % of
the messages carry a keyword and must be refused by the gate.

Measured:

* events sent (200 answers) versus stored: after a drain period, every sent event ID is
  looked up in the archive through its blind index (as ``tests/integration`` does);
* bridge lag: ``bridge_queue_lag_seconds`` polled from ``/metrics`` (p50/p99/max), and an
  end-to-end estimate: time from a send's 200 to the moment ``bridge_events_ingested_total``
  covers it (resolution: the poll interval);
* gate latency: client-observed send latency p50/p99 and the ``bridge_gate_seconds``
  histogram for ``check_event_for_spam`` over the run;
* bridge RSS (``VmRSS`` of the child) at start, after warm-up, every 30 s, and at the end;
* Synapse throughput (accepted messages per second, overall and per 30 s window).

Requirements (PASS/FAIL): stored == sent (each exactly once), p99 queue lag < 1 s, RSS flat
(end ≤ 1.2 x the value after warm-up).

    python bench/soak.py                # 10 minutes, 4 senders
    python bench/soak.py --quick        # 1 minute
    python bench/soak.py --minutes 5 --senders 6
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import shutil
import signal
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple
from urllib.parse import quote

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gate_latency import bucket_quantile, gate_histogram, keywords, message, pct

from bridge.audit.crypto import BlindIndexer
from bridge.audit.keyring import Keyring
from bridge.dev.devstack import BridgeProcess, DevStack, prepare_stack
from bridge.policy.dlp import DETECTORS

METRIC_LINE = re.compile(
    r"^(bridge_queue_lag_seconds|bridge_queue_depth|bridge_events_ingested_total) (\S+)$"
)


class Poll(NamedTuple):
    t: float  # monotonic
    gauge_lag: float  # bridge_queue_lag_seconds as /metrics shows it
    gauge_depth: float  # bridge_queue_depth
    ingested: float  # bridge_events_ingested_total minus the baseline
    db_lag: float  # age of the oldest unprocessed transaction, read from the store now
    db_depth: int  # unprocessed transactions, read from the store now
    processed: int  # events in processed transactions minus the baseline


@dataclass
class Run:
    """Everything the senders and the poller record."""

    acks: list[tuple[float, str]] = field(default_factory=list)  # (monotonic ack, event id)
    latencies: list[float] = field(default_factory=list)  # allowed sends, seconds
    refused: int = 0  # keyword messages the gate refused (expected)
    leaked: int = 0  # keyword messages that got a 200 (must be 0)
    errors: dict[int, int] = field(default_factory=dict)  # unexpected statuses
    polls: list[Poll] = field(default_factory=list)
    rss: list[tuple[float, int]] = field(default_factory=list)  # (monotonic, kB)


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def read_metrics(session: aiohttp.ClientSession, port: int) -> dict[str, float]:
    async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
        text = await resp.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = METRIC_LINE.match(line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def queue_now(db_path: Path) -> tuple[float, int, int]:
    """(oldest unprocessed age s, unprocessed transactions, events in processed ones)."""
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5) as db:
        depth, oldest = db.execute(
            "SELECT count(*), min(received_ts) FROM transactions WHERE processed = 0"
        ).fetchone()
        (done,) = db.execute(
            "SELECT coalesce(sum(event_count), 0) FROM transactions WHERE processed = 1"
        ).fetchone()
    lag = max(0.0, time.time() - oldest / 1000) if oldest else 0.0
    return lag, int(depth), int(done)


async def sender(
    session: aiohttp.ClientSession,
    base: str,
    token: str,
    rooms: tuple[str, str],
    kw: list[str],
    seed: int,
    deadline: float,
    cap: int,
    run: Run,
) -> None:
    rnd = random.Random(seed)
    headers = {"Authorization": f"Bearer {token}"}
    urls = [f"{base}/_matrix/client/v3/rooms/{quote(r)}/send/m.room.message/" for r in rooms]
    for i in range(cap):  # bounded; the deadline ends it first
        if time.monotonic() >= deadline:
            return
        body_text = message(rnd)
        blocked = rnd.random() < 0.01
        if blocked:
            body_text += " " + rnd.choice(kw)
        url = urls[1] if i % 4 == 3 else urls[0]
        start = time.monotonic()
        async with session.put(
            url + uuid.uuid4().hex, json={"msgtype": "m.text", "body": body_text}, headers=headers
        ) as resp:
            data = await resp.json(content_type=None)
            status = resp.status
        now = time.monotonic()
        if blocked:
            if status == 200:
                run.leaked += 1
                run.acks.append((now, data["event_id"]))
            else:
                run.refused += 1
        elif status == 200:
            run.latencies.append(now - start)
            run.acks.append((now, data["event_id"]))
        else:
            run.errors[status] = run.errors.get(status, 0) + 1
            await asyncio.sleep(0.5 if status == 429 else 0.1)


async def poller(
    session: aiohttp.ClientSession,
    port: int,
    pid: int,
    db_path: Path,
    base: tuple[float, int],
    interval: float,
    stop: asyncio.Event,
    run: Run,
) -> None:
    next_rss = 0.0
    while not stop.is_set():
        t = time.monotonic()
        try:
            m = await read_metrics(session, port)
            lag, depth, done = await asyncio.to_thread(queue_now, db_path)
            run.polls.append(
                Poll(
                    t,
                    m.get("bridge_queue_lag_seconds", 0.0),
                    m.get("bridge_queue_depth", 0.0),
                    m.get("bridge_events_ingested_total", 0.0) - base[0],
                    lag,
                    depth,
                    done - base[1],
                )
            )
        except (TimeoutError, aiohttp.ClientError, sqlite3.Error) as e:
            print(f"  metrics poll failed: {e!r}", flush=True)
        if t >= next_rss:
            run.rss.append((t, rss_kb(pid)))
            next_rss = t + 30
        try:
            await asyncio.wait_for(stop.wait(), interval)
        except TimeoutError:
            pass


async def soak(
    dev: DevStack,
    pid: int,
    users: list[tuple[str, str]],
    shared: str,
    kw: list[str],
    seconds: float,
    drain: float,
    interval: float,
) -> tuple[Run, float, float]:
    run = Run()
    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=len(users) + 4)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        db_path = dev.workdir / "data" / "bridge.db"
        base = (
            (await read_metrics(session, dev.bridge_port))["bridge_events_ingested_total"],
            queue_now(db_path)[2],
        )
        stop = asyncio.Event()
        poll = asyncio.create_task(
            poller(session, dev.bridge_port, pid, db_path, base, interval, stop, run)
        )
        start = time.monotonic()
        deadline = start + seconds
        cap = int(seconds * 500)
        last_report = start
        tasks = [
            asyncio.create_task(
                sender(session, dev.synapse.url, token, (room, shared), kw, i, deadline, cap, run)
            )
            for i, (token, room) in enumerate(users)
        ]
        while not all(t.done() for t in tasks):
            await asyncio.sleep(1)
            now = time.monotonic()
            if now - last_report >= 60:
                last_report = now
                p = run.polls[-1] if run.polls else Poll(0, 0, 0, 0, 0, 0, 0)
                print(
                    f"  {now - start:5.0f} s: {len(run.acks)} sent, {p.ingested:.0f} ingested, "
                    f"{p.processed} processed, lag {p.db_lag:.2f} s, "
                    f"RSS {run.rss[-1][1] / 1024:.0f} MiB, "
                    f"load {os.getloadavg()[0]:.2f}",
                    flush=True,
                )
        for t in tasks:
            t.result()  # re-raise a sender's failure
        sent_end = time.monotonic()
        # Drain: wait until the bridge has ingested everything and its queue is empty.
        drain_deadline = sent_end + drain
        while time.monotonic() < drain_deadline:
            last = run.polls[-1] if run.polls else None
            if last and last.processed >= len(run.acks) and last.db_depth == 0:
                break
            await asyncio.sleep(interval)
        await asyncio.sleep(interval * 2)
        stop.set()
        await poll
        run.rss.append((time.monotonic(), rss_kb(pid)))
    return run, start, sent_end


def stored_counts(dev: DevStack, event_ids: list[str]) -> dict[str, int]:
    """How often each event is in the archive (found through its blind index)."""
    keyring = Keyring.load(dev.workdir / "data" / "audit-keyring.json")
    index = BlindIndexer(keyring.index_key)
    by_idx = {index("event_id", e): e for e in event_ids}
    counts = dict.fromkeys(event_ids, 0)
    with sqlite3.connect(dev.workdir / "data" / "bridge.db") as db:
        for (idx,) in db.execute("SELECT event_id_idx FROM records WHERE kind='event'"):
            if idx in by_idx:
                counts[by_idx[idx]] += 1
    return counts


def end_to_end(run: Run, field: str) -> list[float]:
    """Per sent message: first poll whose counter (``ingested`` or ``processed``) covers
    its rank among the acknowledgments, minus its acknowledgment time."""
    acks = sorted(t for t, _ in run.acks)
    polls = run.polls
    out: list[float] = []
    j = 0
    for rank, ack in enumerate(acks, start=1):
        while j < len(polls) and getattr(polls[j], field) < rank:
            j += 1
        if j == len(polls):
            break
        out.append(max(0.0, polls[j].t - ack))
    return out


def setup_users(dev: DevStack, senders: int) -> tuple[list[tuple[str, str]], str]:
    dev.synapse.register_user("admin", admin=True)
    users: list[tuple[str, str]] = []
    shared = ""
    for i in range(senders):
        _uid, token = dev.synapse.register_user(f"sender{i}")
        room = dev.synapse.request(
            "POST", "/_matrix/client/v3/createRoom", {"name": f"soak {i}"}, access_token=token
        )["room_id"]
        if i == 0:
            shared = dev.synapse.request(
                "POST",
                "/_matrix/client/v3/createRoom",
                {"name": "soak shared", "preset": "public_chat"},
                access_token=token,
            )["room_id"]
        else:
            dev.synapse.request(
                "POST", f"/_matrix/client/v3/join/{quote(shared)}", {}, access_token=token
            )
        users.append((token, room))
    return users, shared


def wait_quiet(port: int, timeout: float = 30) -> None:
    """Let the setup events (room creation, joins) drain before the baseline."""

    async def go() -> None:
        async with aiohttp.ClientSession() as s:
            prev = -1.0
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                m = await read_metrics(s, port)
                now = m.get("bridge_events_ingested_total", 0)
                if now == prev and m.get("bridge_queue_depth", 0) == 0:
                    return
                prev = now
                await asyncio.sleep(1)

    asyncio.run(go())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--quick", action="store_true", help="1 minute")
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--keywords", type=int, default=300)
    parser.add_argument("--poll", type=float, default=0.25, help="metrics poll interval, s")
    parser.add_argument("--drain", type=float, default=60.0, help="max drain wait, s")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    # SIGTERM (e.g. from a CI timeout) unwinds through ``finally``: Synapse and bridge stop.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    minutes = 1.0 if args.quick else args.minutes
    seconds = minutes * 60
    warmup = min(60.0, seconds / 4)
    kw = keywords(args.keywords, random.Random(1))
    root = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    dev: DevStack | None = None
    bridge: BridgeProcess | None = None
    load_start = os.getloadavg()
    try:
        print("starting Synapse (gate on) + bridge …", flush=True)
        dev = prepare_stack(
            root,
            bridge_options={
                "dlp": {
                    "keywords": [{"name": "codenames", "keywords": kw, "action": "block"}],
                    "detectors": dict.fromkeys(DETECTORS, "block"),
                },
                "logging": {"level": "WARNING"},
            },
        )
        dev.synapse.start()
        bridge = BridgeProcess(dev.config_path, root / "bridge.log", dev.bridge_port)
        bridge.start(timeout=120)
        assert bridge.proc is not None
        pid = bridge.proc.pid
        rss_ready = rss_kb(pid)
        users, shared = setup_users(dev, args.senders)
        wait_quiet(dev.bridge_port)
        gate_before = gate_histogram(dev.bridge_port)
        print(
            f"soaking: {args.senders} senders for {minutes:g} min "
            f"(load average {load_start[0]:.2f}) …",
            flush=True,
        )
        run, t0, t_end = asyncio.run(
            soak(dev, pid, users, shared, kw, seconds, args.drain, args.poll)
        )
        gate_after = gate_histogram(dev.bridge_port)
        sent_ids = [e for _, e in run.acks]
        counts = stored_counts(dev, sent_ids)
        bridge_alive = bridge.running
    finally:
        if bridge is not None:
            bridge.stop()
        if dev is not None:
            dev.synapse.stop()
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    load_end = os.getloadavg()

    sent = len(sent_ids)
    stored_once = sum(1 for c in counts.values() if c == 1)
    missing = sum(1 for c in counts.values() if c == 0)
    dup = sum(1 for c in counts.values() if c > 1)
    duration = t_end - t0
    rate = sent / duration
    windows: list[float] = []
    acks_sorted = sorted(t for t, _ in run.acks)
    w = t0
    while w + 30 <= t_end + 0.5:
        windows.append(sum(1 for t in acks_sorted if w <= t < w + 30) / 30)
        w += 30
    during = [p for p in run.polls if t0 <= p.t <= t_end]
    lags = [p.gauge_lag for p in during]
    db_lags = [p.db_lag for p in during]
    e2e_in = end_to_end(run, "ingested")
    e2e = end_to_end(run, "processed")
    lat_ms = [x * 1000 for x in run.latencies]
    buckets = {b: gate_after[0].get(b, 0) - gate_before[0].get(b, 0) for b in gate_after[0]}
    calls = gate_after[2] - gate_before[2]
    gate_mean = (gate_after[1] - gate_before[1]) / calls if calls else float("nan")
    rss_warm = next((kb for t, kb in run.rss if t >= t0 + warmup), run.rss[-1][1])
    rss_end = run.rss[-1][1]

    print(
        f"\n{args.senders} senders (+1 shared room), {duration:.0f} s of sending; DLP policy: "
        f"{len(kw)} keywords + {len(DETECTORS)} detectors; load average "
        f"{load_start[0]:.2f} at start, {load_end[0]:.2f} at end ({os.cpu_count()} cores)"
    )
    print(
        f"throughput: {sent} messages accepted = {rate:.1f} msg/s; per 30 s window: "
        f"min {min(windows or [0]):.1f}, max {max(windows or [0]):.1f}; "
        f"{run.refused} keyword messages refused by the gate, {run.leaked} leaked; "
        f"other errors: {run.errors or 'none'}"
    )
    print(
        f"stored vs sent: {stored_once} of {sent} stored exactly once "
        f"({missing} missing, {dup} duplicated)"
    )
    print(
        f"queue lag, gauge (bridge_queue_lag_seconds, {len(lags)} polls every {args.poll:g} s): "
        f"p50 {pct(lags, 0.5):.3f} s, p99 {pct(lags, 0.99):.3f} s, max {max(lags):.3f} s; "
        f"bridge_queue_depth max {max(p.gauge_depth for p in during):.0f}"
    )
    print(
        f"queue lag, read from the store at each poll: p50 {pct(db_lags, 0.5):.3f} s, "
        f"p99 {pct(db_lags, 0.99):.3f} s, max {max(db_lags):.3f} s; "
        f"unprocessed transactions max {max(p.db_depth for p in during)}"
    )
    for label, series_ in (("ingested (committed)", e2e_in), ("processed (policy done)", e2e)):
        if series_:
            print(
                f"end-to-end, send 200 → {label}, ±{args.poll:g} s: "
                f"p50 {pct(series_, 0.5):.3f} s, p99 {pct(series_, 0.99):.3f} s, "
                f"max {max(series_):.3f} s ({len(series_)} of {sent} messages)"
            )
    print(
        f"client send latency (allowed messages): p50 {pct(lat_ms, 0.5):.1f} ms, "
        f"p99 {pct(lat_ms, 0.99):.1f} ms, mean {statistics.mean(lat_ms):.1f} ms"
    )
    print(
        f"gate handler (bridge_gate_seconds, {calls:.0f} check_event_for_spam calls): "
        f"mean {gate_mean * 1000:.3f} ms, p50 ≈ {bucket_quantile(buckets, 0.5) * 1000:.3f} ms, "
        f"p99 ≈ {bucket_quantile(buckets, 0.99) * 1000:.3f} ms"
    )
    series = ", ".join(f"{kb / 1024:.1f}" for _, kb in run.rss)
    print(
        f"bridge RSS (MiB): ready {rss_ready / 1024:.1f}, after {warmup:.0f} s warm-up "
        f"{rss_warm / 1024:.1f}, end {rss_end / 1024:.1f}; every 30 s: {series}"
    )

    checks = [
        ("stored == sent, each exactly once", stored_once == sent and sent > 0 and not run.leaked),
        (
            "lag p99 < 1 s (gauge, store read, end-to-end processed)",
            max(pct(lags, 0.99), pct(db_lags, 0.99), pct(e2e or [99.0], 0.99)) < 1.0,
        ),
        ("RSS flat (end ≤ 1.2 x after warm-up)", rss_end <= rss_warm * 1.2),
        ("bridge still running", bridge_alive),
    ]
    print()
    for name, ok in checks:
        print(f"{name}: {'PASS' if ok else 'FAIL'}")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
