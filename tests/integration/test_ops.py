"""Operations with a real Synapse: live reload (SIGHUP, !policy reload), clean logs,
metrics, graceful shutdown."""

from __future__ import annotations

import asyncio
import json
import signal
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import User
from helpers import bot_replies
from matrix_client import MatrixError, MatrixTestClient, wait_for
from ruamel.yaml import YAML
from synapse_fixtures import require_synapse

from bridge.dev.devstack import BridgeProcess, DevStack, prepare_stack

pytestmark = pytest.mark.integration

SECRET_BODY = "the vault combination is 31-07-19 and the launch codeword is heron"
CARD = "4111 1111 1111 1111"
METRICS_TOKEN = "ops-metrics-token-0123456789abcdef"


class OpsStack:
    def __init__(self, dev: DevStack, bridge: BridgeProcess, admin: User, user: User) -> None:
        self.dev, self.bridge, self.admin, self.user = dev, bridge, admin, user

    def client(self, who: User) -> MatrixTestClient:
        return MatrixTestClient(self.dev.synapse.url, who.user_id, who.token)

    def edit_config(self, section: str, values: dict) -> None:
        y = YAML()
        doc = y.load(self.dev.config_path.read_text())
        doc.setdefault(section, {}).update(values)
        with self.dev.config_path.open("w") as fh:
            y.dump(doc, fh)


@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpsStack]:
    require_synapse(antispam=True)
    work = tmp_path_factory.mktemp("ops")
    dev = prepare_stack(
        work,
        permissions={"@admin:localhost": "admin"},
        # DEBUG: the secrets test must hold at the most talkative level too.
        bridge_options={
            "dlp": {"detectors": {"card": "block"}},
            "logging": {"level": "DEBUG"},
            "metrics": {"token": METRICS_TOKEN},
        },
    )
    dev.synapse.start()
    admin = User(*dev.synapse.register_user("admin", "pw", admin=True))
    user = User(*dev.synapse.register_user("worker", "pw"))
    ops = OpsStack(
        dev, BridgeProcess(dev.config_path, work / "bridge.log", dev.bridge_port), admin, user
    )
    ops.edit_config("homeserver", {"admin_token": admin.token})  # a secret the bridge holds
    try:
        ops.bridge.start()
        yield ops
    finally:
        ops.bridge.stop()
        dev.synapse.stop()


async def mgmt_room(ops: OpsStack) -> str:
    async with ops.client(ops.admin) as admin:

        async def invited() -> list[str] | None:
            sync = await admin.request("GET", "/_matrix/client/v3/sync", params={"timeout": "0"})
            joined = list(sync.get("rooms", {}).get("join", {}))
            invites = list(sync.get("rooms", {}).get("invite", {}))
            for room in invites:
                await admin.join(room)
            return (joined + invites) or None

        rooms = await wait_for(invited, timeout=20, message="management room invite")
        return rooms[0]


async def test_sighup_reload_applies_rules_and_rejects_bad_config(ops: OpsStack) -> None:
    room_mgmt = await mgmt_room(ops)
    async with ops.client(ops.user) as u:
        room = await u.create_room(name="reload room")
        await u.send_text(room, "pelican sighting at the harbour")  # allowed for now
        ops.edit_config(
            "dlp", {"keywords": [{"name": "codewords", "keywords": ["pelican"], "action": "block"}]}
        )
        ops.bridge.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]

        async def refused() -> bool:
            try:
                await u.send_text(room, "pelican again")
            except MatrixError as e:
                return e.errcode == "M_FORBIDDEN" and "keyword:codewords" in e.error
            return False

        await wait_for(refused, timeout=20, interval=0.5, message="the reloaded rule")

        # A broken config is rejected and the old one stays in force.
        good = ops.dev.config_path.read_text()
        ops.edit_config("federation", {"mode": "sideways"})
        async with ops.client(ops.admin) as admin:
            cmd = await admin.send_text(room_mgmt, "!policy reload")
            [reply] = await bot_replies(admin, room_mgmt, "@policybot:localhost", cmd)
        assert "rejected" in reply["content"]["body"]
        assert "sideways" in reply["content"]["body"]
        with pytest.raises(MatrixError):
            await u.send_text(room, "pelican still blocked")
        ops.dev.config_path.write_text(good)
        assert ops.bridge.running


async def test_reload_changes_roles_and_the_log_format(ops: OpsStack) -> None:
    room_mgmt = await mgmt_room(ops)
    bot = "@policybot:localhost"
    async with ops.client(ops.user) as u:
        room = await u.create_room(name="roles room", invite=[bot])

        async def bot_joined() -> bool:
            return bot in await u.joined_members(room)

        await wait_for(bot_joined, timeout=20, message="the bot to join")
        cmd = await u.send_text(room, "!policy status")
        [reply] = await bot_replies(u, room, bot, cmd)
        assert "not allowed" in reply["content"]["body"]

        # The worker becomes an auditor (by user ID) and the log turns to JSON lines.
        ops.edit_config(
            "bridge", {"permissions": {ops.admin.user_id: "admin", ops.user.user_id: "auditor"}}
        )
        ops.edit_config("logging", {"format": "json"})
        async with ops.client(ops.admin) as admin:
            cmd = await admin.send_text(room_mgmt, "!policy reload")
            [reply] = await bot_replies(admin, room_mgmt, bot, cmd)
        body = reply["content"]["body"]
        assert "configuration reloaded" in body and "bridge" in body and "logging" in body, body

        cmd = await u.send_text(room, "!policy status")
        [reply] = await bot_replies(u, room, bot, cmd)
        assert "Policy bridge status" in reply["content"]["body"]

    log_lines = (ops.dev.workdir / "bridge.log").read_text().splitlines()
    after = log_lines[[i for i, line in enumerate(log_lines) if "config reloaded" in line][-1] :]
    records = [json.loads(line) for line in after if line.startswith("{")]
    assert records and {"ts", "level", "logger", "msg"} <= set(records[0])


async def test_logs_never_contain_message_text_or_secrets(ops: OpsStack) -> None:
    async with ops.client(ops.user) as u:
        room = await u.create_room(name="secrets room")
        await u.send_text(room, SECRET_BODY)
        with pytest.raises(MatrixError):
            await u.send_text(room, f"card {CARD}")
    await asyncio.sleep(2)  # let the worker process and log whatever it logs
    log_text = (ops.dev.workdir / "bridge.log").read_text()
    config = YAML(typ="safe").load(ops.dev.config_path.read_text())
    secrets = [
        SECRET_BODY,
        "combination",
        "heron",
        "sighting at the harbour",
        CARD,
        "1111 1111",
        config["appservice"]["as_token"],
        config["appservice"]["hs_token"],
        config["gate"]["token"],
        config["homeserver"]["admin_token"],
        config["metrics"]["token"],
        ops.user.token,
        *audit_key_material(ops),
    ]
    for secret in secrets:
        assert secret not in log_text, f"leaked into the log: {secret[:12]}…"
    assert "gate denied check_event_for_spam" in log_text  # the log does say what happened


def audit_key_material(ops: OpsStack) -> list[str]:
    """The keyring's keys (base64, as stored) and the signing key's PEM body lines."""
    data = ops.dev.workdir / "data"
    keyring = json.loads((data / "audit-keyring.json").read_text())
    keys = [keyring["index_key"], *(k["key"] for k in keyring["keks"])]
    pem = (data / "audit-signing.pem").read_text().splitlines()
    return keys + [line for line in pem if line and not line.startswith("-----")]


async def test_metrics_are_exposed_to_the_bearer_of_metrics_token(ops: OpsStack) -> None:
    url = f"{ops.dev.bridge_url}/metrics"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, timeout=5)
    assert refused.value.code == 401
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    with urllib.request.urlopen(request, timeout=5) as resp:
        text = resp.read().decode()
    for name in (
        "bridge_transactions_total",
        "bridge_events_ingested_total",
        "bridge_ingest_seconds_bucket",
        "bridge_gate_decisions_total",
        "bridge_gate_seconds_bucket",
        "bridge_queue_depth",
        "bridge_executor_backlog",
    ):
        assert name in text, name
    assert 'result="deny",rule="detector:card"' in text


async def test_sigterm_exits_cleanly(ops: OpsStack, tmp_path: Path) -> None:
    # Last in this module: stop the bridge with SIGTERM and expect exit code 0.
    code = await asyncio.to_thread(ops.bridge.stop, 40)
    assert code == 0
    assert "bridge stopped" in (ops.dev.workdir / "bridge.log").read_text()
