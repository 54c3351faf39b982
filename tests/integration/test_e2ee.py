"""The bot as an end-to-end encrypted member (issue 14), against a real Synapse with two
users whose devices are real Olm/Megolm devices (:mod:`e2ee_client`): the server only ever
sees ``m.room.encrypted``; the bridge decrypts, archives, enforces and answers encrypted.

The tests share one stack and run in order (the restart test relies on the rooms made by
the earlier ones).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import pathlib
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from e2ee_client import E2EEUser
from matrix_client import wait_for
from mautrix.api import Method, Path
from mautrix.crypto import OutboundGroupSession
from mautrix.types import (
    DeviceID,
    EncryptionAlgorithm,
    EventType,
    RoomID,
    RoomKeyEventContent,
    TrustState,
    UserID,
)
from synapse_fixtures import require_synapse

from bridge.archive.setup import open_store
from bridge.config import load_config
from bridge.dev.devstack import BridgeProcess, DevStack, prepare_stack
from bridge.e2ee.pickle_key import derive_pickle_key
from tests.kit import documents

pytestmark = pytest.mark.integration

KEYWORD = "pelican"
CARD = "4111 1111 1111 1111"
PDF = "application/pdf"
WARN_WORD = "heron"
#: Run the module on PostgreSQL: an empty database of its own (not the shared stack's).
DATABASE_URL = os.environ.get("BRIDGE_TEST_E2EE_DATABASE_URL", "")


@dataclass
class E2EEStack:
    dev: DevStack
    bridge: BridgeProcess
    admin_token: str
    alice: E2EEUser
    bob: E2EEUser
    bot: str
    room: str = ""
    late_key: str = ""

    def export(self, *filters: str) -> list[dict[str, Any]]:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "bridge",
                "audit",
                "export",
                "-c",
                str(self.dev.config_path),
                "-o",
                "-",
                "--jobs",
                "1",
                *filters,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]

    def records(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.export() if r.get("kind") == kind]

    def bot_devices(self) -> list[str]:
        resp = self.dev.synapse.request(
            "GET", f"/_synapse/admin/v2/users/{self.bot}/devices", access_token=self.admin_token
        )
        return sorted(d["device_id"] for d in resp["devices"])


@pytest.fixture(scope="module")
def e2ee_dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DevStack, str]]:
    require_synapse(antispam=True)
    workdir = tmp_path_factory.mktemp("e2ee")
    dev = prepare_stack(
        workdir,
        database_url=DATABASE_URL,
        permissions={"@admin:localhost": "admin", "@alice:localhost": "admin"},
        bridge_options={
            "e2ee": {"enabled": True, "key_wait_seconds": 2, "retry_interval_seconds": 2},
            "dlp": {
                "keywords": [
                    {"name": "codename", "keywords": [KEYWORD], "action": ["redact", "notify"]},
                    {"name": "careful", "keywords": [WARN_WORD], "action": "warn"},
                ],
                "detectors": {"card": ["redact", "notify"]},  # in encrypted attachments
            },
        },
    )
    dev.synapse.start()
    try:
        _, admin_token = dev.synapse.register_user("admin", "admin-pw", admin=True)
        dev.synapse.register_user("alice", "alice-pw")
        dev.synapse.register_user("bob", "bob-pw")
        yield dev, admin_token
    finally:
        dev.synapse.stop()


@pytest.fixture(scope="module")
async def e2ee(e2ee_dev: tuple[DevStack, str]) -> AsyncIterator[E2EEStack]:
    dev, admin_token = e2ee_dev
    bridge = BridgeProcess(dev.config_path, dev.workdir / "bridge.log", dev.bridge_port)
    bridge.start()
    alice = await E2EEUser(dev.synapse.url, "@alice:localhost", "alice-pw").start()
    bob = await E2EEUser(dev.synapse.url, "@bob:localhost", "bob-pw").start()
    stack = E2EEStack(dev, bridge, admin_token, alice, bob, "@policybot:localhost")
    try:
        yield stack
    finally:
        await alice.close()
        await bob.close()
        bridge.stop()


async def _room_with_bot(s: E2EEStack) -> str:
    if s.room:
        return s.room
    room = await s.alice.create_encrypted_room([s.bob.user_id, s.bot], powers={s.bot: 50})
    await s.bob.join(room)

    async def bot_in() -> bool:
        return s.bot in await s.alice.members(room)

    await wait_for(bot_in, timeout=30, message="the bot joined the encrypted room")
    s.room = room
    return room


async def _decrypted_record(s: E2EEStack, event_id: str, timeout: float = 40) -> dict[str, Any]:
    async def find() -> dict[str, Any] | None:
        for rec in await asyncio.to_thread(s.records, "decrypted"):
            if rec["data"].get("encrypted_event_id") == event_id:
                return rec
        return None

    return await wait_for(find, timeout=timeout, interval=1, message=f"{event_id} decrypted")


async def test_transparency_notice_is_posted_encrypted(e2ee: E2EEStack) -> None:
    room = await _room_with_bot(e2ee)

    async def notice() -> dict[str, Any] | None:
        for ev in await e2ee.alice.read_decrypted(room):
            if ev["sender"] == e2ee.bot and "compliance" in ev["content"].get("body", ""):
                return ev
        return None

    ev = await wait_for(notice, timeout=40, interval=1, message="transparency notice")
    assert "cannot be read" in ev["content"]["body"]


async def test_encrypted_messages_appear_decrypted_in_export(e2ee: E2EEStack) -> None:
    room = await _room_with_bot(e2ee)
    event_id = await e2ee.alice.send_text(room, "quarterly numbers look fine")
    rec = await _decrypted_record(e2ee, event_id)
    assert rec["type"] == "m.room.message"
    assert rec["data"]["end_to_end_encrypted"] is True
    assert rec["data"]["event"]["content"]["body"] == "quarterly numbers look fine"
    assert rec["sender"] == e2ee.alice.user_id
    # search sees the decrypted content, marked as end-to-end encrypted
    found = await asyncio.to_thread(e2ee.export, "--text", "quarterly")
    assert [r["kind"] for r in found] == ["decrypted"]
    assert found[0]["data"]["end_to_end_encrypted"] is True
    # the archived original is the ciphertext, as the server has it
    raw = [r for r in e2ee.export() if r["kind"] == "event" and r["event_id"] == event_id]
    assert raw and raw[0]["type"] == "m.room.encrypted"
    assert "quarterly" not in json.dumps(raw[0])


async def test_keyword_in_encrypted_message_is_redacted_and_admins_told(e2ee: E2EEStack) -> None:
    room = await _room_with_bot(e2ee)
    event_id = await e2ee.alice.send_text(room, f"the {KEYWORD} lands at dawn")

    async def redacted() -> bool:
        ev = await e2ee.alice.request(Method.GET, Path.v3.rooms[room].event[event_id])
        return "redacted_because" in ev.get("unsigned", {})

    await wait_for(redacted, timeout=40, interval=1, message="the message redacted")

    async def told() -> bool:
        mgmt = await _management_room(e2ee)
        for body in await _room_bodies(e2ee, mgmt):
            if "codename" in body and room in body:
                return True
        return False

    await wait_for(told, timeout=30, interval=1, message="the management room told")


async def test_card_number_in_an_encrypted_pdf_is_redacted_and_a_harmless_one_stays(
    e2ee: E2EEStack,
) -> None:
    """An encrypted attachment (``content.file``): Synapse and the upload gate see only
    ciphertext; the bot decrypts the message, fetches, verifies and decrypts the file and
    judges it by the room's rules."""
    room = await _room_with_bot(e2ee)
    await e2ee.alice.send_text(room, "files follow")  # the room key shared
    # The harmless one first: checks run oldest first, so it was judged once the card's is.
    menu = await e2ee.alice.send_file(room, documents.pdf("lunch menu"), "menu.pdf", PDF)
    card = await e2ee.alice.send_file(
        room, documents.pdf("Invoice", f"pay with {CARD} by friday"), "invoice.pdf", PDF
    )

    async def redacted(event_id: str) -> bool:
        ev = await e2ee.alice.request(Method.GET, Path.v3.rooms[room].event[event_id])
        return "redacted_because" in ev.get("unsigned", {})

    await wait_for(lambda: redacted(card), timeout=60, interval=1, message="the PDF redacted")

    async def told() -> bool:
        mgmt = await _management_room(e2ee)
        return any(
            "detector:card removed a file" in body and room in body
            for body in await _room_bodies(e2ee, mgmt)
        )

    await wait_for(told, timeout=30, interval=1, message="the management room told")

    async def media_records() -> dict[str, dict[str, Any]] | None:
        found = {
            r["data"]["event_id"]: r["data"]
            for r in await asyncio.to_thread(e2ee.records, "media")
            if r["data"].get("event_id") in (card, menu)
        }
        return found if card in found else None

    records = await wait_for(media_records, timeout=30, interval=1, message="media records")
    record = records[card]
    assert record["e2ee"] is True and record["outcome"] == "allowed"
    assert record["file_type"] == "pdf" and record["actions"] == ["redact", "notify"]
    assert [f["rule"] for f in record["findings"]] == ["detector:card"]
    assert CARD not in json.dumps(record) and "key" not in record
    # The harmless one: read and allowed (which leaves no media record), still there.
    assert menu not in records
    assert not await redacted(menu)
    ev = await e2ee.alice.request(Method.GET, Path.v3.rooms[room].event[menu])
    decrypted = await e2ee.alice.decrypt(ev)
    assert decrypted is not None and decrypted["content"]["body"] == "menu.pdf"


async def test_the_bot_device_is_cross_signed_by_the_bot_user(e2ee: E2EEStack) -> None:
    """MSC4153 clients share keys only with devices cross-signed by their owner."""
    await _room_with_bot(e2ee)
    device = await e2ee.alice.machine.get_or_fetch_device(UserID(e2ee.bot), _bot_device(e2ee))
    assert device is not None
    trust = await e2ee.alice.machine.resolve_trust(device)
    assert trust == TrustState.CROSS_SIGNED_TOFU


async def test_warn_is_an_encrypted_reply_in_a_thread(e2ee: E2EEStack) -> None:
    room = await _room_with_bot(e2ee)
    event_id = await e2ee.alice.send_text(room, f"a {WARN_WORD} flew by")

    async def warning() -> dict[str, Any] | None:
        for ev in await e2ee.alice.read_decrypted(room):
            rel = ev["content"].get("m.relates_to") or {}
            if ev["sender"] == e2ee.bot and rel.get("event_id") == event_id:
                return ev
        return None

    ev = await wait_for(warning, timeout=40, interval=1, message="an encrypted warning")
    assert ev["content"]["m.relates_to"]["rel_type"] == "m.thread"
    assert "careful" in json.dumps(ev["content"]) or e2ee.alice.user_id in ev["content"]["body"]


async def test_withheld_key_is_recorded_with_its_code(e2ee: E2EEStack) -> None:
    room = await _room_with_bot(e2ee)
    # Bob's client shares room keys only with verified devices: the bot's gets m.unverified.
    e2ee.bob.machine.send_keys_min_trust = TrustState.VERIFIED
    try:
        event_id = await e2ee.bob.send_text(room, "for verified eyes only", new_session=True)
    finally:
        e2ee.bob.machine.send_keys_min_trust = TrustState.UNVERIFIED

    async def withheld() -> dict[str, Any] | None:
        for rec in await asyncio.to_thread(e2ee.records, "undecryptable"):
            d = rec["data"]
            if d.get("encrypted_event_id") == event_id and d.get("withheld_code"):
                return rec
        return None

    rec = await wait_for(withheld, timeout=40, interval=1, message="withheld recorded")
    assert rec["data"]["reason"] == "withheld"
    assert rec["data"]["withheld_code"] == "m.unverified"


async def test_key_delivered_after_its_event_still_decrypts(e2ee: E2EEStack) -> None:
    room = await _room_with_bot(e2ee)
    alice = e2ee.alice
    rid = RoomID(room)
    # A room key made, used for a message, and handed to the bot's device only afterwards.
    session = OutboundGroupSession(rid)
    key_at_zero = session.session_key
    session.shared = True
    await alice.store.remove_outbound_group_session(rid)
    await alice.store.add_outbound_group_session(session)
    event_id = await alice.send_encrypted(room, "sent before the key")

    async def no_session() -> bool:
        for rec in await asyncio.to_thread(e2ee.records, "undecryptable"):
            if rec["data"].get("encrypted_event_id") == event_id:
                return rec["data"]["reason"] == "no_session"
        return False

    await wait_for(no_session, timeout=40, interval=1, message="recorded without a key")
    devices = await alice.machine.get_or_fetch_device(UserID(e2ee.bot), _bot_device(e2ee))
    assert devices is not None
    await alice.machine.send_encrypted_to_device(
        devices,
        EventType.ROOM_KEY,
        RoomKeyEventContent(
            algorithm=EncryptionAlgorithm.MEGOLM_V1,
            room_id=rid,
            session_id=session.id,
            session_key=key_at_zero,
        ),
    )
    rec = await _decrypted_record(e2ee, event_id)
    assert rec["data"]["late_key"] is True
    assert rec["data"]["event"]["content"]["body"] == "sent before the key"
    await alice.store.remove_outbound_group_session(rid)
    e2ee.late_key = key_at_zero


async def test_restart_keeps_the_device_and_decrypts_after_it(e2ee: E2EEStack) -> None:
    room = await _room_with_bot(e2ee)
    before = await asyncio.to_thread(e2ee.bot_devices)
    assert len(before) == 1
    await asyncio.to_thread(e2ee.bridge.stop)
    await asyncio.to_thread(e2ee.bridge.start)
    assert await asyncio.to_thread(e2ee.bot_devices) == before
    same_key = await e2ee.alice.send_text(room, "after the restart, old room key")
    new_key = await e2ee.bob.send_text(room, "after the restart, new room key", new_session=True)
    assert (await _decrypted_record(e2ee, same_key))["data"]["event"]["content"]["body"] == (
        "after the restart, old room key"
    )
    assert (await _decrypted_record(e2ee, new_key))["data"]["event"]["content"]["body"] == (
        "after the restart, new room key"
    )
    assert await asyncio.to_thread(e2ee.bot_devices) == before


async def test_command_in_encrypted_management_room_is_answered_encrypted(
    e2ee: E2EEStack,
) -> None:
    mgmt = await _management_room(e2ee)
    synapse = e2ee.dev.synapse
    synapse.request("POST", f"/_matrix/client/v3/join/{mgmt}", {}, access_token=e2ee.admin_token)
    synapse.request(
        "POST",
        f"/_synapse/admin/v1/join/{mgmt}",
        {"user_id": e2ee.alice.user_id},
        access_token=e2ee.admin_token,
    )
    synapse.request(
        "PUT",
        f"/_matrix/client/v3/rooms/{mgmt}/state/m.room.encryption/",
        {"algorithm": "m.megolm.v1.aes-sha2"},
        access_token=e2ee.admin_token,
    )
    await asyncio.sleep(1)
    await e2ee.alice.send_text(mgmt, "!policy rooms", new_session=True)

    async def answer() -> dict[str, Any] | None:
        for ev in await e2ee.alice.read_decrypted(mgmt):
            body = ev["content"].get("body", "")
            if ev["sender"] == e2ee.bot and "undecryptable" in body:
                return ev
        return None

    ev = await wait_for(answer, timeout=40, interval=1, message="an encrypted answer")
    assert ev["type"] == "m.room.message"
    # nothing the bot said there after encryption was on is in plaintext on the server
    plain = synapse.request(
        "GET",
        f"/_synapse/admin/v1/rooms/{mgmt}/messages?dir=b&limit=20",
        access_token=e2ee.admin_token,
    )["chunk"]
    assert not [e for e in plain if e["sender"] == e2ee.bot and "undecryptable" in json.dumps(e)]


def _olm_unpickle(pickled: bytes, key: bytes) -> bytes:
    """libolm's pickle encryption (HKDF-SHA256 'Pickle' → AES-256-CBC + 8-byte HMAC)."""
    text = pickled.decode("ascii")
    data = base64.b64decode(text + "=" * (-len(text) % 4))
    ct, mac = data[:-8], data[-8:]
    okm = HKDF(algorithm=hashes.SHA256(), length=80, salt=None, info=b"Pickle").derive(key)
    assert hmac.new(okm[32:64], ct, hashlib.sha256).digest()[:8] == mac
    dec = Cipher(algorithms.AES(okm[:32]), modes.CBC(okm[64:80])).decryptor()
    padded = dec.update(ct) + dec.finalize()
    unpadder = padding.PKCS7(128).unpadder()
    return unpadder.update(padded) + unpadder.finalize()


def _forms(secret: bytes) -> list[bytes]:
    b64 = base64.b64encode(secret)
    return [
        secret,
        b64,
        b64.rstrip(b"="),
        base64.urlsafe_b64encode(secret).rstrip(b"="),
        secret.hex().encode(),
    ]


async def test_crypto_tables_hold_no_plaintext_key_material(e2ee: E2EEStack) -> None:
    assert e2ee.late_key, "runs after the late-key test"
    await asyncio.to_thread(e2ee.bridge.stop)
    db_path = e2ee.dev.workdir / "data" / "bridge.db"
    store = await open_store(load_config(e2ee.dev.config_path))
    try:
        dk = await store.keys.op_key(create=False)
        assert dk is not None
        pickle_key = derive_pickle_key(dk.key, e2ee.bot).encode()
    finally:
        await store.close()
    account, dump = await _crypto_tables(db_path)
    plain = _olm_unpickle(bytes(account), pickle_key)
    ed_pub, ed_priv = plain[4:36], plain[36:100]
    cv_pub, cv_priv = plain[100:132], plain[132:164]
    device = await e2ee.alice.machine.get_or_fetch_device(UserID(e2ee.bot), _bot_device(e2ee))
    assert device is not None
    # the offsets are right: the public halves are the device's published keys
    assert base64.b64encode(ed_pub).rstrip(b"=").decode() == device.signing_key
    assert base64.b64encode(cv_pub).rstrip(b"=").decode() == device.identity_key
    key_text = e2ee.late_key.encode()
    raw_key = base64.b64decode(e2ee.late_key + "=" * (-len(e2ee.late_key) % 4))
    ratchet = raw_key[5:133]
    secrets = {
        "ed25519 private": ed_priv[:32],
        "curve25519 private": cv_priv,
        "megolm session key": ratchet,
    }
    files = b"".join(p.read_bytes() for p in db_path.parent.glob("bridge.db*"))  # SQLite
    assert key_text not in files and key_text not in dump
    for what, secret in secrets.items():
        for form in _forms(secret):
            assert form not in files, f"{what} in the database file"
            assert form not in dump, f"{what} in a crypto table"


async def _crypto_tables(db_path: pathlib.Path) -> tuple[bytes, bytes]:
    """The bot's account pickle, and every row of every crypto_* table as bytes."""
    if DATABASE_URL:
        import asyncpg

        con = await asyncpg.connect(DATABASE_URL.replace("postgresql+asyncpg", "postgresql"))
        try:
            account = await con.fetchval("SELECT account FROM crypto_account")
            tables = [
                r[0]
                for r in await con.fetch(
                    "SELECT tablename FROM pg_tables WHERE tablename LIKE 'crypto_%'"
                )
            ]
            rows = [row for t in tables for row in await con.fetch(f"SELECT * FROM {t}")]
        finally:
            await con.close()
        return bytes(account), b"".join(repr(tuple(r)).encode() for r in rows)
    sq = sqlite3.connect(db_path)
    try:
        (account,) = sq.execute("SELECT account FROM crypto_account").fetchone()
        names = [
            r[0]
            for r in sq.execute(
                "SELECT name FROM sqlite_master WHERE type='table' AND name LIKE 'crypto_%'"
            )
        ]
        dump = b"".join(
            repr(row).encode() for t in names for row in sq.execute(f"SELECT * FROM {t}")
        )
    finally:
        sq.close()
    return bytes(account), dump


def _bot_device(s: E2EEStack) -> DeviceID:
    (device,) = s.bot_devices()
    return DeviceID(device)


async def _management_room(s: E2EEStack) -> str:
    resp = s.dev.synapse.request(
        "GET",
        "/_synapse/admin/v1/rooms?search_term=Policy%20bridge%20management",
        access_token=s.admin_token,
    )
    return str(resp["rooms"][0]["room_id"])


async def _room_bodies(s: E2EEStack, room: str) -> list[str]:
    resp = s.dev.synapse.request(
        "GET",
        f"/_synapse/admin/v1/rooms/{room}/messages?dir=b&limit=50",
        access_token=s.admin_token,
    )
    return [str(e.get("content", {}).get("body", "")) for e in resp["chunk"]]
