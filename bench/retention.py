"""Benchmark of the retention sweeper: many rooms full of expired messages.

For each size (1,000 and 10,000 rooms, 100 expired messages each) a child process builds a
fresh SQLite store (real encrypted, hash-chained records, ingested as appservice
transactions of 100 events), marks the rooms joined, and runs one sweeper tick over all of
them with a per-tick cap large enough to take everything. The executor is stubbed: the
commit hook counts the actions it would have queued and writes the sweeper's progress and
audit records to the real store (so those costs are in the figures).

Reported per size: rooms/s and events/s of the sweep; the floor, ``RecordReader.iter``
(the store's own streaming, decrypting reader) over the same events, and the ratio; the
sweep's peak RSS above the RSS before it (the kernel's high-water mark, reset before the
sweep) and the tracemalloc peak of a second, traced sweep (progress reset in between).
Memory must stay flat as rooms grow: the sweeper pages through rooms and holds one batch.

Run: ``python bench/retention.py`` (1k and 10k rooms), ``--quick`` (100 and 1k rooms).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import delete

from bridge.config import Config, build_config
from bridge.pipeline.live_policy import build_engine
from bridge.pipeline.sweeper import PROGRESS_PREFIX, TOTALS_KEY, RetentionSweeper, SweepSettings
from bridge.store import AuditEntry, NewAction, Store, StoreSettings
from bridge.store.schema import state

DAY = 86_400_000
SERVER = "example.org"


def _config() -> Config:
    return build_config(
        {
            "homeserver": {"url": "http://127.0.0.1:1", "domain": SERVER},
            "appservice": {
                "as_token": "as-bench-xxxxxxxxxxxxxxxxxxxxxxx",
                "hs_token": "hs-bench-xxxxxxxxxxxxxxxxxxxxxxx",
            },
            "gate": {"token": "gate-bench-xxxxxxxxxxxxxxxxxxxxx"},
            "retention": {"max_lifetime": "30d"},
        },
        env={},
    )


def _rss_kib(field: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _room(i: int) -> str:
    return f"!room{i:06d}:{SERVER}"


async def populate(store: Store, n_rooms: int, per_room: int, old_ts: int) -> float:
    t0 = time.perf_counter()
    await store.rooms.upsert_many([_room(i) for i in range(n_rooms)], joined=True)
    for i in range(n_rooms):
        room = _room(i)
        events = [
            {
                "event_id": f"$e{i}_{j}",
                "room_id": room,
                "sender": f"@user{(i + j) % 500}:{SERVER}",
                "type": "m.room.message",
                "origin_server_ts": old_ts + j,
                "content": {"msgtype": "m.text", "body": f"message {j} in room {i}: " + "x" * 120},
                "unsigned": {"age": 1234},
            }
            for j in range(per_room)
        ]
        await store.queue.ingest(f"txn{i}", events)
    return time.perf_counter() - t0


async def reset_progress(store: Store) -> None:
    async with store.db.engine.begin() as conn:
        await conn.execute(delete(state).where(state.c.key.like(PROGRESS_PREFIX + "%")))
        await conn.execute(delete(state).where(state.c.key == TOTALS_KEY))


async def child(n_rooms: int, per_room: int) -> dict[str, Any]:
    cfg = _config()
    now = int(time.time() * 1000)
    with tempfile.TemporaryDirectory(prefix="bench-retention-") as tmp:
        store = await Store.open(
            f"sqlite+aiosqlite:///{tmp}/bridge.db", StoreSettings(checkpoint_every=100_000)
        )
        try:
            populate_s = await populate(store, n_rooms, per_room, now - 60 * DAY)
            engine = build_engine(cfg, {})
            counted: dict[str, int] = {}

            async def commit(
                actions: list[NewAction], audit: list[AuditEntry], updates: dict[str, str]
            ) -> None:
                for a in actions:  # the stubbed executor: collects (counts) the actions
                    counted[a.kind] = counted.get(a.kind, 0) + 1
                await store.queue.complete([], [], audit, updates)

            def sweeper() -> RetentionSweeper:
                return RetentionSweeper(
                    store,
                    lambda: engine,
                    lambda: cfg,
                    purge=lambda: True,
                    commit=commit,
                    settings=SweepSettings(batch=per_room + 1, max_events=1 << 40),
                )

            # floor: the store's own decrypting reader over the same events
            t0 = time.perf_counter()
            floor_events = 0
            async for _rec in store.reader.iter(kind="event"):
                floor_events += 1
            floor_s = time.perf_counter() - t0

            rss_before = _rss_kib("VmRSS")
            peak_ok = _reset_peak_rss()
            s = sweeper()
            t0 = time.perf_counter()
            await s.tick()
            sweep_s = time.perf_counter() - t0
            rss_peak = _rss_kib("VmHWM") if peak_ok else 0
            totals = s.totals
            removed = counted.get("redact", 0)
            purges = counted.get("purge_history", 0)

            await reset_progress(store)
            counted.clear()
            tracemalloc.start()
            await sweeper().tick()
            _cur, traced_peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        finally:
            await store.close()
    return {
        "rooms": n_rooms,
        "events": n_rooms * per_room,
        "populate_s": populate_s,
        "sweep_s": sweep_s,
        "rooms_per_s": n_rooms / sweep_s,
        "events_per_s": removed / sweep_s,
        "floor_events_per_s": floor_events / floor_s,
        "redactions": removed,
        "purges": purges,
        "completed": totals.rooms_completed,
        "rss_before_mib": rss_before / 1024,
        "rss_peak_above_mib": (rss_peak - rss_before) / 1024 if rss_peak else None,
        "tracemalloc_peak_mib": traced_peak / 2**20,
        "traced_redactions": counted.get("redact", 0),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="100 and 1,000 rooms")
    ap.add_argument("--per-room", type=int, default=100, help="expired messages per room")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(child(args.child, args.per_room))))
        return 0
    sizes = (100, 1000) if args.quick else (1000, 10_000)
    results = []
    for n in sizes:
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(n), "--per-room", str(args.per_room)],
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONHASHSEED": "0"},
        )
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(
            f"{r['rooms']:>6} rooms x {args.per_room} expired: sweep {r['sweep_s']:.1f}s "
            f"(populate {r['populate_s']:.0f}s) | {r['rooms_per_s']:,.0f} rooms/s, "
            f"{r['events_per_s']:,.0f} events/s | floor reader.iter "
            f"{r['floor_events_per_s']:,.0f} events/s, ratio "
            f"{r['events_per_s'] / r['floor_events_per_s']:.2f} | RSS before "
            f"{r['rss_before_mib']:.0f} MiB, peak above "
            + (f"{r['rss_peak_above_mib']:.1f} MiB" if r["rss_peak_above_mib"] is not None else "?")
            + f" | tracemalloc peak {r['tracemalloc_peak_mib']:.1f} MiB",
            flush=True,
        )
        assert r["redactions"] == r["events"] == r["traced_redactions"], r
        assert r["purges"] == r["rooms"] == r["completed"], r
    small, large = results
    growth = large["tracemalloc_peak_mib"] / max(small["tracemalloc_peak_mib"], 1e-6)
    print(
        f"memory: tracemalloc peak x{growth:.2f} for x{large['rooms'] // small['rooms']} rooms "
        f"({'flat' if growth < 2 else 'GROWS'})"
    )
    return 0 if growth < 2 else 1


if __name__ == "__main__":
    sys.exit(main())
