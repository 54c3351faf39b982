"""Upload latency the project's Synapse module adds: 1 MB uploads with the module on vs off.

Two throwaway Synapses (SQLite) run side by side:

* **module on**: ``policy_bridge_synapse`` forwards ``check_media_file_for_spam`` to a stub
  gate (aiohttp, in this process) that reads the whole body and allows it, so every upload
  waits for the file to be streamed to the gate and the answer to come back;
* **module off**: the same Synapse without any module (the floor, measured in the same run).

One user per server uploads a 1 MB file (random bytes, ``application/pdf``) with
``POST /_matrix/media/v3/upload``, one at a time, in interleaved rounds (on, off, off, on, …)
so that load on the shared machine hits both alike. Reported: p50 and mean per server and the
on/off ratios. The bridge's own extraction time is not part of this figure (the stub does
not extract); it is measured by the attachment benchmarks.

    python bench/module_upload.py           # 10 rounds x 10 uploads per server
    python bench/module_upload.py --quick   # 3 rounds x 5
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bridge.dev.devsynapse import AntispamSettings, SynapseServer, free_port

SIZE = 1_000_000


async def stub_gate() -> tuple[web.AppRunner, str, list[int]]:
    """A gate that reads each file to its end and allows it; records the sizes read."""
    seen: list[int] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(len(await request.read()))
        return web.json_response({})

    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/{callback}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}", seen


async def upload(
    session: aiohttp.ClientSession, hs: SynapseServer, token: str, data: bytes
) -> float:
    started = time.perf_counter()
    async with session.post(
        f"{hs.url}/_matrix/media/v3/upload",
        data=data,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/pdf"},
    ) as r:
        await r.read()
        if r.status != 200:
            raise RuntimeError(f"upload failed: HTTP {r.status}")
    return time.perf_counter() - started


def summary(samples: list[float]) -> tuple[float, float]:
    return statistics.median(samples) * 1000, statistics.fmean(samples) * 1000


async def main(rounds: int, per_round: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-module-upload-"))
    runner, gate_url, seen = await stub_gate()
    settings = AntispamSettings(
        base_url=gate_url,
        authorization="bench-token",
        enabled_callbacks=["check_media_file_for_spam"],
    )
    extra = {"max_upload_size": "20M"}
    on = SynapseServer(work / "on", antispam=settings, extra_config=extra, log_level="WARNING")
    off = SynapseServer(work / "off", extra_config=extra, log_level="WARNING")
    try:
        await asyncio.gather(asyncio.to_thread(on.start), asyncio.to_thread(off.start))
        tokens = {
            "on": (await on.async_register_user("bench"))[1],
            "off": (await off.async_register_user("bench"))[1],
        }
        servers = {"on": on, "off": off}
        times: dict[str, list[float]] = {"on": [], "off": []}
        async with aiohttp.ClientSession() as session:
            for name in ("on", "off"):  # warm-up
                for _ in range(3):
                    await upload(session, servers[name], tokens[name], secrets.token_bytes(SIZE))
            for r in range(rounds):
                order = ("on", "off") if r % 2 == 0 else ("off", "on")
                for name in order:
                    for _ in range(per_round):
                        data = secrets.token_bytes(SIZE)
                        times[name].append(await upload(session, servers[name], tokens[name], data))
        assert all(n == SIZE for n in seen), "the gate did not get whole files"
        p50_on, mean_on = summary(times["on"])
        p50_off, mean_off = summary(times["off"])
        n = len(times["on"])
        print(f"{n} uploads of {SIZE:,} bytes per server")
        print("| | p50 | mean |")
        print("|---|---:|---:|")
        print(f"| module on | {p50_on:.2f} ms | {mean_on:.2f} ms |")
        print(f"| module off (floor) | {p50_off:.2f} ms | {mean_off:.2f} ms |")
        print(f"| ratio on / off | **{p50_on / p50_off:.3f}** | {mean_on / mean_off:.3f} |")
        print(
            f"| added by the module | {p50_on - p50_off:+.2f} ms | {mean_on - mean_off:+.2f} ms |"
        )
        verdict = "PASS" if p50_on / p50_off <= 1.10 else "FAIL"
        print(f"target: the module adds at most 10 % at p50: {verdict}")
    finally:
        await asyncio.gather(asyncio.to_thread(on.stop), asyncio.to_thread(off.stop))
        await runner.cleanup()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds x 5 uploads")
    args = parser.parse_args()
    asyncio.run(main(3, 5) if args.quick else main(10, 10))
