"""Three replicas on one PostgreSQL database behind HAProxy, as in production.

Synapse's appservice URL and the gate module's base URL point at HAProxy, which balances
over three ``python -m bridge run`` processes (health checks on ``/_bridge/health/ready``).
Under a steady send load the leader is SIGKILLed, then the next leader: every message
Synapse accepted is archived exactly once, the gate never stops answering for longer than
HAProxy needs to notice a dead replica, a keyword added by command is enforced by every
replica's gate within a second, each ``notify`` hit gives exactly one notice (also the hits
sent while the leaders die), and ``audit verify`` passes.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from conftest import User
from helpers import bot_replies
from matrix_client import MatrixError, MatrixTestClient, wait_for
from sqlalchemy import func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from synapse_fixtures import require_synapse

from bridge.archive.setup import open_store
from bridge.config import load_config
from bridge.dev.devstack import BridgeProcess, DevStack, prepare_stack
from bridge.dev.devsynapse import free_port
from bridge.store.schema import records, transactions

pytestmark = pytest.mark.integration

POSTGRES_URL = os.environ.get("BRIDGE_TEST_POSTGRES_URL", "")
REPLICAS = 3
CHECK_INTER_S = 0.5  # HAProxy's health check interval ("inter")
CHECK_FALL = 2  # failed checks before a server is taken out
#: The longest the gate may be unanswered through HAProxy: the checks that take a dead
#: replica out, plus a margin for this busy 2-core machine. (A request that hits the dead
#: replica before that is redispatched to another, so gaps are normally far shorter.)
GATE_GAP_LIMIT_S = CHECK_INTER_S * CHECK_FALL + 1.5
TAKEOVER_LIMIT_S = 10.0
PROPAGATION_LIMIT_S = 1.0


def haproxy_config(port: int, replicas: list[int]) -> str:
    servers = "\n".join(f"    server r{i} 127.0.0.1:{p} check" for i, p in enumerate(replicas))
    return f"""global
    maxconn 512

defaults
    mode http
    timeout connect 1s
    timeout client 60s
    timeout server 60s
    retries 3
    option redispatch 1

frontend bridge
    bind 127.0.0.1:{port}
    default_backend replicas

backend replicas
    balance roundrobin
    option httpchk GET /_bridge/health/ready
    http-check expect status 200
    default-server inter {int(CHECK_INTER_S * 1000)}ms fall {CHECK_FALL} rise 1
{servers}
"""


@dataclass
class Cluster:
    dev: DevStack
    lb_port: int
    replicas: list[BridgeProcess]
    admin: User
    database_url: str
    haproxy: subprocess.Popen[bytes]
    killed: list[int] = field(default_factory=list)

    @property
    def bot(self) -> str:
        return f"@policybot:{self.dev.server_name}"

    def client(self, user: User) -> MatrixTestClient:
        return MatrixTestClient(self.dev.synapse.url, user.user_id, user.token)

    def alive(self) -> list[BridgeProcess]:
        return [r for i, r in enumerate(self.replicas) if i not in self.killed]


async def fresh_database() -> str:
    name = f"bridge_replicas_{uuid.uuid4().hex[:10]}"
    engine = create_async_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    async with engine.connect() as conn:
        await conn.execute(text(f'CREATE DATABASE "{name}"'))
    await engine.dispose()
    return make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)


async def drop_database(url: str) -> None:
    name = make_url(url).database
    engine = create_async_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    async with engine.connect() as conn:
        await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    await engine.dispose()


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    if not POSTGRES_URL:
        pytest.skip("the replica test needs BRIDGE_TEST_POSTGRES_URL (set by .ci/run)")
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        pytest.skip("haproxy is not installed (apt-get install -y haproxy; .ci/run does)")
    require_synapse(antispam=True)
    url = await fresh_database()
    # prepare_stack points Synapse (registration URL, gate base URL) at "the bridge port":
    # here HAProxy listens there, and the replicas each on a port of their own.
    dev = prepare_stack(
        tmp_path / "stack",
        permissions={"@admin:localhost": "admin"},
        database_url=url,
        bridge_options={"audit": {"checkpoint_interval": "10s"}},
    )
    lb_port = dev.bridge_port
    ports = [free_port() for _ in range(REPLICAS)]
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(haproxy_config(lb_port, ports), encoding="utf-8")
    with (tmp_path / "haproxy.log").open("wb") as log:
        lb = subprocess.Popen([haproxy, "-db", "-f", str(cfg)], stdout=log, stderr=log)
    replicas = [
        BridgeProcess(
            dev.config_path,
            tmp_path / f"replica{i}.log",
            port,
            env={"POLICY_BRIDGE__APPSERVICE__PORT": str(port)},
        )
        for i, port in enumerate(ports)
    ]
    dev.synapse.start()
    admin = User(*dev.synapse.register_user("admin", "admin-pw", admin=True))
    try:
        replicas[0].start()  # the first creates the schema and the management room
        for r in replicas[1:]:
            r.start(wait=False)
        for r in replicas[1:]:
            r.wait_ready(90)
        yield Cluster(dev, lb_port, replicas, admin, url, lb)
    finally:
        for r in replicas:
            r.stop()
        lb.terminate()
        lb.wait(10)
        dev.synapse.stop()
        await drop_database(url)


async def summary(session: aiohttp.ClientSession, port: int) -> dict[str, object]:
    try:
        async with session.get(f"http://127.0.0.1:{port}/_bridge/health") as resp:
            return dict(await resp.json())
    except (aiohttp.ClientError, OSError, json.JSONDecodeError):
        return {}


async def leader_index(cluster: Cluster, session: aiohttp.ClientSession) -> int | None:
    found = [
        i
        for i, r in enumerate(cluster.replicas)
        if i not in cluster.killed and (await summary(session, r.port)).get("role") == "leader"
    ]
    assert len(found) <= 1, f"two leaders at once: {found}"
    return found[0] if found else None


async def gate_allows(
    session: aiohttp.ClientSession, port: int, token: str, body: str, timeout: float = 2
) -> bool | None:
    """True/False: the gate at ``port`` allowed/refused a message; None: no answer."""
    event = {
        "type": "m.room.message",
        "room_id": "!probe:localhost",
        "sender": "@prober:localhost",
        "event_id": f"$probe-{uuid.uuid4().hex}",
        "content": {"msgtype": "m.text", "body": body},
    }
    try:
        async with session.post(
            f"http://127.0.0.1:{port}/_bridge/antispam/check_event_for_spam",
            json={"event": event},
            headers={"Authorization": f"Bearer {token}"},
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as resp:
            await resp.read()
            return resp.status < 300
    except (aiohttp.ClientError, OSError, TimeoutError):
        return None


@dataclass
class Load:
    sent: list[str] = field(default_factory=list)  # event IDs Synapse accepted
    hits: int = 0  # of them, messages a `notify` rule matches
    refused: int = 0
    errors: int = 0


async def send_load(client: MatrixTestClient, room: str, load: Load, stop: asyncio.Event) -> None:
    n = 0
    while not stop.is_set():
        n += 1
        hit = n % 10 == 0  # every tenth message is a `notify` hit
        try:
            load.sent.append(
                await client.send_text(room, f"steady {'wombat' if hit else 'message'} {n}")
            )
            load.hits += hit
        except MatrixError as e:
            if e.status == 403:
                load.refused += 1
            else:
                load.errors += 1
        await asyncio.sleep(0.05)


async def probe_gate(
    session: aiohttp.ClientSession, port: int, token: str, gaps: list[float], stop: asyncio.Event
) -> None:
    last = time.monotonic()
    while not stop.is_set():
        if await gate_allows(session, port, token, "probe", timeout=5):
            now = time.monotonic()
            gaps.append(now - last)
            last = now
        await asyncio.sleep(0.05)


async def wait_new_leader(
    cluster: Cluster, session: aiohttp.ClientSession, since: float
) -> tuple[int, float]:
    while True:
        found = await leader_index(cluster, session)
        elapsed = time.monotonic() - since
        if found is not None:
            return found, elapsed
        assert elapsed < TAKEOVER_LIMIT_S + 5, "no replica took over"
        await asyncio.sleep(0.1)


async def archived_counts(cluster: Cluster, event_ids: list[str]) -> dict[str, int]:
    store = await open_store(load_config(cluster.dev.config_path), create=False)
    try:
        wanted = {store.keys.bidx("event_id", e): e for e in event_ids}
        async with store.db.connect() as conn:
            rows = (
                await conn.execute(
                    select(records.c.event_id_idx, func.count())
                    .where(records.c.event_id_idx.in_(list(wanted)))
                    .group_by(records.c.event_id_idx)
                )
            ).all()
        return {wanted[bytes(idx)]: int(n) for idx, n in rows}
    finally:
        await store.db.close()


async def queue_drained(cluster: Cluster) -> bool:
    engine = create_async_engine(cluster.database_url)
    try:
        async with engine.connect() as conn:
            pending = (
                await conn.execute(select(func.count()).where(transactions.c.processed.is_(False)))
            ).scalar()
        return pending == 0
    finally:
        await engine.dispose()


async def test_replicas_survive_losing_two_leaders(cluster: Cluster) -> None:
    token = cluster.dev.gate_token
    async with aiohttp.ClientSession() as session:
        first = await leader_index(cluster, session)
        assert first is not None
        roles = [(await summary(session, r.port)).get("role") for r in cluster.replicas]
        assert sorted(map(str, roles)) == ["follower", "follower", "leader"]

        async with cluster.client(cluster.admin) as admin:
            mgmt = await wait_for(
                lambda: invited(admin), timeout=30, message="the management room invite"
            )
            await admin.join(mgmt)

            async def command(body: str) -> str:
                cmd = await admin.send_text(mgmt, body)
                [reply] = await bot_replies(admin, mgmt, cluster.bot, cmd, timeout=30)
                return str(reply["content"]["body"])

            # -- a policy change reaches every replica's gate within a second -------------
            word = "zanzibar"
            for r in cluster.replicas:
                assert await gate_allows(session, r.port, token, f"to {word} we go")
            cmd_task = asyncio.create_task(command(f"!policy dlp add-keyword {word}"))
            enforced: dict[int, float] = {}
            started = time.monotonic()
            while len(enforced) < REPLICAS:
                for i, r in enumerate(cluster.replicas):
                    if i not in enforced and not await gate_allows(
                        session, r.port, token, f"to {word} we go"
                    ):
                        enforced[i] = time.monotonic()
                assert time.monotonic() - started < 30, f"enforced only by {enforced}"
            assert "keyword added" in await cmd_task
            spread = max(enforced.values()) - min(enforced.values())
            assert spread < PROPAGATION_LIMIT_S, f"{spread:.2f}s between replicas' gates"

            # -- every notify hit gives exactly one notice ------------------------------
            await command("!policy dlp add-keyword wombat --action notify")
            user = User(*cluster.dev.synapse.register_user("sender", "sender-pw"))
            async with cluster.client(user) as alice:
                room = await alice.create_room(name="steady")
                hits = [await alice.send_text(room, f"wombat sighting {i}") for i in range(3)]

                async def notices(expected: int) -> list[str] | None:
                    events = await admin.messages(mgmt, limit=1000)
                    found = [
                        e["content"]["body"]
                        for e in events
                        if e.get("sender") == cluster.bot
                        and "admin-notify" in e.get("content", {}).get("body", "")
                        and user.user_id in e["content"]["body"]
                    ]
                    return found if len(found) >= expected else None

                await wait_for(lambda: notices(3), timeout=30, message="three notify notices")
                await asyncio.sleep(3)  # a duplicate would show up by now
                assert len(await notices(0) or []) == 3
                # each refused send of the blocked keyword is refused by whichever replica
                for i in range(6):
                    with pytest.raises(MatrixError):
                        await alice.send_text(room, f"{word} number {i}")

                # -- steady load; SIGKILL the leader, then the next one -------------------
                load, stop = Load(), asyncio.Event()
                gaps: list[float] = []
                sender = asyncio.create_task(send_load(alice, room, load, stop))
                probe = asyncio.create_task(probe_gate(session, cluster.lb_port, token, gaps, stop))
                await asyncio.sleep(3)
                leader = first
                takeovers = []
                for _ in range(2):
                    cluster.replicas[leader].kill()
                    cluster.killed.append(leader)
                    killed_at = time.monotonic()
                    leader, took = await wait_new_leader(cluster, session, killed_at)
                    takeovers.append(took)
                    await asyncio.sleep(4)
                stop.set()
                await asyncio.gather(sender, probe)
                # the hits sent across both failovers: each noticed exactly once (a worker
                # processing a transaction twice, or an action posted twice, shows here)
                expected = 3 + load.hits
                await wait_for(lambda: notices(expected), timeout=60, message=f"{expected} notices")
                await asyncio.sleep(3)
                assert len(await notices(0) or []) == expected

        print(  # the figures, for the record (pytest -s)
            f"replicas: takeovers {[round(t, 2) for t in takeovers]}s, gate gap max "
            f"{max(gaps):.2f}s (limit {GATE_GAP_LIMIT_S}s), policy spread {spread:.2f}s, "
            f"{len(load.sent)} messages accepted, {load.hits} notify hits in them"
        )
        assert all(t < TAKEOVER_LIMIT_S for t in takeovers), takeovers
        assert load.errors == 0 and load.refused == 0, load
        assert len(load.sent) > 50, len(load.sent)
        assert max(gaps) < GATE_GAP_LIMIT_S, f"the gate was silent for {max(gaps):.2f}s"

        # -- every accepted message archived exactly once; the chain verifies --------
        accepted = [*hits, *load.sent]

        async def all_archived() -> dict[str, int] | None:
            counts = await archived_counts(cluster, accepted)
            return counts if len(counts) == len(accepted) else None

        counts = await wait_for(all_archived, timeout=60, message="every message archived")
        assert set(counts.values()) == {1}
        await wait_for(lambda: queue_drained(cluster), timeout=60, message="the queue drained")
        verify = subprocess.run(
            [sys.executable, "-m", "bridge", "audit", "verify", "-c", str(cluster.dev.config_path)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert verify.returncode == 0, verify.stdout + verify.stderr


async def invited(client: MatrixTestClient) -> str | None:
    sync = await client.request("GET", "/_matrix/client/v3/sync", params={"timeout": "0"})
    rooms = list(sync.get("rooms", {}).get("invite", {}))
    return rooms[0] if rooms else None
