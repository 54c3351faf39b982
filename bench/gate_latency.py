"""Gate latency through real Synapse: message sends with the DLP gate on versus off.

Two throwaway stacks run side by side, each a real Synapse (SQLite) with the bridge as a
child process (``python -m bridge run``), both with the same DLP policy (1,000 keywords and
every built-in detector) so the bridge's ingest load is the same:

* **gate on**: Synapse loads the gate module of ``prepare_stack`` (the project's own
  ``policy_bridge_synapse`` since it exists; ``synapse_http_antispam`` for the figures
  recorded before) pointed at the bridge's gate, so every send waits for
  ``check_event_for_spam``;
* **gate off**: the same, without the module.

One user per stack (rate limits lifted) sends allowed ~200-character messages, one at a time
(``PUT /rooms/{room}/send/m.room.message/{txn}`` → 200), in interleaved rounds (on, off,
off, on, …) so that load on the shared machine hits both alike. Reported: p50, p99 and mean
client latency per stack, the on/off ratios, and the gate handler's own time from the
bridge's ``bridge_gate_seconds`` histogram (delta over the timed part).

    python bench/gate_latency.py            # 10 rounds x 60 sends per stack
    python bench/gate_latency.py --quick    # 3 rounds x 20 sends
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bridge.dev.devstack import BridgeProcess, DevStack, prepare_stack
from bridge.policy.dlp import DETECTORS

WORDS = (
    "the meeting moved to friday please review the draft before lunch and send the budget "
    "report to the customer we deploy the release branch after the sprint review thanks"
).split()
SYLLABLES = "ka lo mi ra ze tu vo ni sha pe qui dro fle gar bin tor mex lus wen yaz".split()


def keywords(n: int, rnd: random.Random) -> list[str]:
    out: set[str] = set()
    while len(out) < n:
        out.add("".join(rnd.choice(SYLLABLES) for _ in range(4)))
    return sorted(out)


def message(rnd: random.Random) -> str:
    parts: list[str] = []
    while sum(len(p) + 1 for p in parts) < 200:
        parts.append(rnd.choice(WORDS))
    return " ".join(parts)


@dataclass
class Side:
    name: str
    dev: DevStack
    bridge: BridgeProcess
    token: str = ""
    room: str = ""
    samples: list[float] = field(default_factory=list)


def gate_histogram(port: int) -> tuple[dict[float, float], float, float]:
    """Cumulative buckets, sum and count of bridge_gate_seconds{callback=check_event_for_spam}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    buckets: dict[float, float] = {}
    total = count = 0.0
    for line in text.splitlines():
        if 'callback="check_event_for_spam"' not in line or line.startswith("#"):
            continue
        value = float(line.rsplit(" ", 1)[1])
        if line.startswith("bridge_gate_seconds_bucket"):
            m = re.search(r'le="([^"]+)"', line)
            if m:
                buckets[float(m.group(1))] = value
        elif line.startswith("bridge_gate_seconds_sum"):
            total = value
        elif line.startswith("bridge_gate_seconds_count"):
            count = value
    return buckets, total, count


def bucket_quantile(buckets: dict[float, float], q: float) -> float:
    """Prometheus-style quantile from cumulative buckets (linear inside a bucket)."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return float("nan")
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        cum = buckets[bound]
        if cum >= rank:
            if bound == float("inf"):
                return lower
            inside = cum - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 0)
        lower, below = bound, cum
    return lower


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def send_round(
    session: aiohttp.ClientSession, side: Side, n: int, rnd: random.Random, record: bool
) -> None:
    url = f"{side.dev.synapse.url}/_matrix/client/v3/rooms/{quote(side.room)}/send/m.room.message/"
    headers = {"Authorization": f"Bearer {side.token}"}
    for _ in range(n):
        body = {"msgtype": "m.text", "body": message(rnd)}
        start = time.perf_counter()
        async with session.put(url + uuid.uuid4().hex, json=body, headers=headers) as resp:
            await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"{side.name}: send answered {resp.status}")
        if record:
            side.samples.append(time.perf_counter() - start)


async def measure(sides: list[Side], rounds: int, per_round: int, warmup: int) -> None:
    rnd = random.Random(7)
    async with aiohttp.ClientSession() as session:
        for side in sides:
            await send_round(session, side, warmup, rnd, record=False)
        for r in range(rounds):
            order = sides if r % 2 == 0 else list(reversed(sides))
            for side in order:
                await send_round(session, side, per_round, rnd, record=True)


def start_side(name: str, root: Path, gate: bool, kw: list[str]) -> Side:
    dev = prepare_stack(
        root / name,
        bridge_options={
            "dlp": {
                "keywords": [{"name": "codenames", "keywords": kw, "action": "block"}],
                "detectors": dict.fromkeys(DETECTORS, "block"),
            },
            "logging": {"level": "WARNING"},
        },
    )
    if not gate:
        dev.synapse.antispam = None
    dev.synapse.start()
    dev.synapse.register_user("admin", admin=True)
    bridge = BridgeProcess(dev.config_path, root / name / "bridge.log", dev.bridge_port)
    bridge.start(timeout=120)
    side = Side(name, dev, bridge)
    _user_id, side.token = dev.synapse.register_user("sender")
    room = dev.synapse.request(
        "POST", "/_matrix/client/v3/createRoom", {"name": "bench"}, access_token=side.token
    )
    side.room = room["room_id"]
    return side


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fast smoke run")
    parser.add_argument("--rounds", type=int, default=0)
    parser.add_argument("--per-round", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 10)
    per_round = args.per_round or (20 if args.quick else 60)
    warmup = 10 if args.quick else 30
    root = Path(tempfile.mkdtemp(prefix="bench-gate-"))
    kw = keywords(1_000, random.Random(1))
    sides: list[Side] = []
    try:
        print("starting two stacks (Synapse + bridge each) …", flush=True)
        sides = [start_side("gate-on", root, True, kw), start_side("gate-off", root, False, kw)]
        on, off = sides
        asyncio.run(measure(sides, 0, 0, warmup))
        before = gate_histogram(on.dev.bridge_port)
        asyncio.run(measure(sides, rounds, per_round, 0))
        after = gate_histogram(on.dev.bridge_port)
    finally:
        for side in sides:
            side.bridge.stop()
            side.dev.synapse.stop()
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    buckets = {b: after[0].get(b, 0) - before[0].get(b, 0) for b in after[0]}
    calls = after[2] - before[2]
    gate_mean = (after[1] - before[1]) / calls if calls else float("nan")
    n = len(on.samples)
    print(
        f"\n{n} timed sends per stack ({rounds} interleaved rounds x {per_round}, after "
        f"{warmup} warm-up sends); DLP policy: 1,000 keywords + {len(DETECTORS)} detectors\n"
    )
    print(f"{'':<28}{'p50 ms':>9}{'p99 ms':>9}{'mean ms':>9}")
    for side in (on, off):
        s = [x * 1000 for x in side.samples]
        print(f"{side.name:<28}{pct(s, 0.5):>9.2f}{pct(s, 0.99):>9.2f}{statistics.mean(s):>9.2f}")
    on_ms = [x * 1000 for x in on.samples]
    off_ms = [x * 1000 for x in off.samples]
    r50 = pct(on_ms, 0.5) / pct(off_ms, 0.5)
    r99 = pct(on_ms, 0.99) / pct(off_ms, 0.99)
    rmean = statistics.mean(on_ms) / statistics.mean(off_ms)
    print(f"{'ratio on / off':<28}{r50:>9.3f}{r99:>9.3f}{rmean:>9.3f}")
    print(
        f"{'added by the gate':<28}{pct(on_ms, 0.5) - pct(off_ms, 0.5):>+9.2f}"
        f"{pct(on_ms, 0.99) - pct(off_ms, 0.99):>+9.2f}"
        f"{statistics.mean(on_ms) - statistics.mean(off_ms):>+9.2f}"
    )
    print(
        f"\ngate handler (bridge_gate_seconds, {calls:.0f} check_event_for_spam calls): "
        f"mean {gate_mean * 1000:.3f} ms, p50 ≈ {bucket_quantile(buckets, 0.5) * 1000:.3f} ms, "
        f"p99 ≈ {bucket_quantile(buckets, 0.99) * 1000:.3f} ms (from histogram buckets)"
    )
    ok = r50 <= 1.05
    print(f"\ntarget: the gate adds at most 5% at p50: {'PASS' if ok else 'FAIL'} ({r50:.3f})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
