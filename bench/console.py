"""Benchmark of the compliance console's pages over a store of a million records.

Builds a store through the store's real write path: client-format events from
``bench/ingest.py``'s generator appended through ``WorkQueue.ingest`` in batches of 1,000
(encrypted, chained, checkpointed, per-day counters kept), plus, per batch, ten gate
refusals with DLP findings appended through ``RecordLog.append`` (≈ 1 % incidents). The
archive times of the batches are spread over the last 90 days (the store's clock is moved
for the build), so the charts have 90 days of counters.

Then serves the real console application (``bridge.console.web.Console``, mounted under
/console as on the appservice listener) on a local aiohttp server and requests each page
with a logged-in session through an HTTP client, as a browser would: every middleware, the
session lookup, the audit record a search or a record view writes, template rendering.
Reports p50 and p95 per page, and the same figures for a floor measured in the same run
through the same app and session (the console's stylesheet: session lookup, middlewares,
headers, no data).

Run: ``python bench/console.py`` (1,000,000 records, SQLite; build ≈ 2 min),
``--records N``, ``--quick`` (50,000), ``--requests N`` per page (default 60),
``--keep DIR`` (reuse a store built before in DIR). Exits 1 when, with at least 1,000,000
records, the overview or the filtered search page has a p95 of 300 ms or more.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from ingest import EventFactory  # type: ignore[import-not-found, unused-ignore]

from bridge.audit.chain import VerifyReport
from bridge.audit.keyring import Keyring
from bridge.audit.kinds import AuditKind
from bridge.config import Config, build_config
from bridge.console.web import Console
from bridge.pipeline.live_policy import LivePolicy
from bridge.store import AuditEntry, Store, StoreSettings

BATCH = 1000
DAYS = 90
DAY_MS = 86_400_000
REQUIRED_P95_MS = 300.0
ADMIN = "@admin:example.org"


class Services:
    """What the console uses of a running bridge (``ConsoleServices``)."""

    def __init__(self, store: Store, config: Config) -> None:
        self.store = store
        self.config = config
        self.policy = LivePolicy(config)
        self.ready = True

    async def verify_archive(self, earlier_keys: Sequence[Ed25519PublicKey]) -> VerifyReport:
        raise NotImplementedError  # not benchmarked here (bench/audit_store.py)


def config_for(directory: Path) -> Config:
    return build_config(
        {
            "appservice": {
                "as_token": "bench-as-token-xxxx-xxxxxxxxxxxx",
                "hs_token": "bench-hs-token-yyyy-xxxxxxxxxxxx",
            },
            "gate": {"token": "bench-gate-token-zzzz-xxxxxxxxxx"},
            "homeserver": {"domain": "example.org"},
            "data_dir": str(directory),
            "bridge": {"permissions": {ADMIN: "admin"}},
            "console": {"enabled": True, "secure_cookies": False},
        },
        env={},
    )


def refusal(factory: EventFactory, i: int) -> AuditEntry:
    rules = ("detector:card", "keyword:confidential", "regex:ticket", "detector:iban")
    room = factory.rooms[i % len(factory.rooms)]
    return AuditEntry(
        AuditKind.GATE,
        {
            "callback": "check_event_for_spam",
            "decision": "deny",
            "subject": {"room_id": room, "sender": factory.users[i % 50]},
            "findings": [
                {
                    "rule": rules[i % len(rules)],
                    "category": "secret",
                    "actions": ["block"],
                    "message": "refused by policy",
                    "excerpt": "4111 **** **** 1111",
                }
            ],
        },
        room_id=room,
        sender=factory.users[i % 50],
        type="m.room.message",
    )


async def build(url: str, n: int, keyring: Keyring) -> tuple[float, EventFactory]:
    store = await Store.open(url, StoreSettings(keyring=keyring, checkpoint_every=1000))
    factory = EventFactory(uuid.uuid4().hex[:8])
    now = time.time()
    batches = max(1, n // (BATCH + 10))
    t = time.perf_counter()
    done = 0
    try:
        for b in range(batches):
            # spread the archive times over the last DAYS days
            at = now - DAYS * 86400 * (1 - b / batches)
            with mock.patch("bridge.store.models.time.time", return_value=at):
                await store.queue.ingest(f"b{b}", [factory.event() for _ in range(BATCH)])
                await store.records.append([refusal(factory, b * 10 + j) for j in range(10)])
            done += BATCH + 10
            if b % 100 == 99:
                rate = done / (time.perf_counter() - t)
                print(f"    built {done:,} records ({rate:,.0f}/s)", flush=True)
    finally:
        await store.close()
    return time.perf_counter() - t, factory


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


async def measure(client: TestClient[Any, Any], path: str, n: int) -> list[float]:
    for _ in range(3):  # warm
        resp = await client.get(path)
        await resp.read()
        assert resp.status == 200, (path, resp.status, (await resp.text())[:500])
    out = []
    for _ in range(n):
        t = time.perf_counter()
        resp = await client.get(path)
        await resp.read()
        out.append((time.perf_counter() - t) * 1000)
        assert resp.status == 200, path
    return out


async def amain(args: argparse.Namespace) -> int:
    directory = (
        Path(args.keep)
        if args.keep
        else Path(__import__("tempfile").mkdtemp(prefix="bench-console-"))
    )
    directory.mkdir(parents=True, exist_ok=True)
    db = directory / "console.db"
    url = f"sqlite+aiosqlite:///{db}"
    keyring_path = directory / "keyring.json"
    n = 50_000 if args.quick else args.records
    if db.exists() and keyring_path.exists():
        keyring = Keyring.load(keyring_path)
        print(f"reusing the store in {directory}")
        factory = EventFactory("reuse")  # same seed: the same rooms and senders
    else:
        keyring = Keyring.generate()
        keyring.save(keyring_path)
        print(f"building a store of {n:,} records in {directory} …", flush=True)
        seconds, factory = await build(url, n, keyring)
        print(f"  built in {seconds:.0f} s ({n / seconds:,.0f} records/s)")
    store = await Store.open(url, StoreSettings(keyring=keyring, sign_checkpoints=False))
    total = (await store.stats.snapshot()).records
    config = config_for(directory)
    console = Console(Services(store, config), "/console")
    root = web.Application()
    root.add_subapp("/console", console.application())
    # a mid-sized room and an active sender (the generator's rooms and users are Pareto)
    counts = {r: await store.reader.count(room=r, at_most=200_000) for r in factory.rooms[:8]}
    room = sorted(counts, key=counts.get)[len(counts) // 2]  # type: ignore[arg-type]
    sender = factory.users[1]
    day = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 20 * 86400))
    week = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 13 * 86400))
    first_seq = 1000
    pages = [
        ("floor: stylesheet (same app and session)", "/console/static/console.css"),
        ("overview, 30 days", "/console/"),
        ("overview, 90 days", "/console/?days=90"),
        (f"search: room ({counts[room]:,} records)", f"/console/archive?room={room}"),
        (
            "search: room + a week",
            f"/console/archive?room={room}&since={day}&until={week}",
        ),
        ("search: sender", f"/console/archive?sender={sender}"),
        ("search: type m.room.message", "/console/archive?type=m.room.message"),
        ("search: room + words (2 words)", f"/console/archive?room={room}&text=the+and"),
        ("search: all, newest page", "/console/archive?go=1"),
        ("incidents", "/console/incidents"),
        ("incidents: room", f"/console/incidents?room={room}"),
        ("record view (decrypted)", f"/console/archive/{first_seq}"),
        ("activity", "/console/activity"),
        ("legal holds", "/console/holds"),
        ("rooms", "/console/rooms"),
        ("policies", "/console/policies"),
    ]
    results: list[tuple[str, list[float]]] = []
    async with TestClient(TestServer(root)) as client:
        session = await console.sessions.create(ADMIN)
        client.session.cookie_jar.update_cookies({console.cookies.name: session.id})
        for label, path in pages:
            results.append((label, await measure(client, path, args.requests)))
            # the floor again at the end: the machine may have changed meanwhile
        results.append(
            ("floor again (end of run)", await measure(client, pages[0][1], args.requests))
        )
    await store.close()
    floor = statistics.median(results[0][1])
    print(f"\n{total:,} records; {args.requests} requests per page; ms")
    print(f"{'page':48} {'p50':>8} {'p95':>8} {'p50/floor':>10}")
    failed = False
    for label, ms in results:
        p50, p95 = statistics.median(ms), pct(ms, 95)
        print(f"{label:48} {p50:8.1f} {p95:8.1f} {p50 / floor:9.1f}x")
        judged = label.startswith(("overview", "search: room ("))
        if judged and p95 >= REQUIRED_P95_MS and total >= 1_000_000:
            failed = True
            print(f"    ^ p95 {p95:.0f} ms >= {REQUIRED_P95_MS:.0f} ms", flush=True)
    return 1 if failed else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--keep", help="directory of the store (reused when it exists)")
    return asyncio.run(amain(ap.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
