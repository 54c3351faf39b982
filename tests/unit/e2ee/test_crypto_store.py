"""The bridge's crypto store (real libolm, real mautrix OlmMachine, SQLite): replay
protection holds within one batch (before the indexes are written) and across a restart
(after they are), with the per-event writes deferred; a redacted session is not served
from memory."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import olm
import pytest
from mautrix.api import HTTPAPI
from mautrix.client import Client
from mautrix.crypto import OlmMachine
from mautrix.types import (
    DeviceID,
    DeviceIdentity,
    IdentityKey,
    RoomID,
    SessionID,
    SigningKey,
    TrustState,
    UserID,
)

from bridge.e2ee.olm import (
    MACHINE_LOG,
    OlmCrypto,
    OlmSettings,
    _Rooms,
    crypto_db_url,
    open_crypto_db,
)
from bridge.e2ee.seam import Decrypted, NotDecrypted, Undecryptable
from bridge.e2ee.store import BridgeCryptoStore
from tests.conftest import BACKENDS, fresh_store_url

ROOM = "!room:localhost"
SENDER = "@alice:localhost"
BOT = "@bot:localhost"


class Sender:
    """Alice's device and her Megolm session (real libolm)."""

    def __init__(self) -> None:
        self.account = olm.Account()
        self.outbound = olm.OutboundGroupSession()
        self.session_key = self.outbound.session_key  # from index 0

    def event(self, event_id: str, ciphertext: str, ts: int = 1_700_000_000_000) -> dict[str, Any]:
        return {
            "type": "m.room.encrypted",
            "room_id": ROOM,
            "sender": SENDER,
            "event_id": event_id,
            "origin_server_ts": ts,
            "content": {
                "algorithm": "m.megolm.v1.aes-sha2",
                "sender_key": self.account.identity_keys["curve25519"],
                "device_id": "ALICE",
                "session_id": self.outbound.id,
                "ciphertext": ciphertext,
            },
        }

    def encrypt(self, body: str) -> str:
        payload = {"room_id": ROOM, "type": "m.room.message", "content": {"body": body}}
        return str(self.outbound.encrypt(json.dumps(payload)))


@asynccontextmanager
async def device(db_url: str, alice: Sender, *, first: bool) -> AsyncIterator[OlmCrypto]:
    """The bot's device on ``db_url`` (a new process each time: nothing in memory)."""
    db = await open_crypto_db(db_url)
    store = BridgeCryptoStore(BOT, "test-pickle-key", db)
    client = Client(mxid=UserID(BOT), device_id=DeviceID("BOT"), api=HTTPAPI("http://127.0.0.1:9"))
    machine = OlmMachine(client, store, _Rooms(), log=MACHINE_LOG)
    if first:
        await store.put_device_id(DeviceID("BOT"))
    await machine.load()
    curve = IdentityKey(alice.account.identity_keys["curve25519"])
    ed = SigningKey(alice.account.identity_keys["ed25519"])
    if first:
        await store.put_devices(
            UserID(SENDER),
            {
                DeviceID("ALICE"): DeviceIdentity(
                    user_id=UserID(SENDER),
                    device_id=DeviceID("ALICE"),
                    identity_key=curve,
                    signing_key=ed,
                    trust=TrustState.UNVERIFIED,
                    deleted=False,
                    name="",
                )
            },
        )
        await machine._create_group_session(
            curve, ed, RoomID(ROOM), SessionID(alice.outbound.id), alice.session_key, 0, 0
        )
    settings = OlmSettings("", "", BOT, "", "", "")
    crypto = OlmCrypto(settings, db, store, client, machine, client.api)
    try:
        yield crypto
    finally:
        await crypto.close()


@pytest.fixture(params=BACKENDS)
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh database for the crypto store (SQLite file, or a PostgreSQL database)."""
    return crypto_db_url(await fresh_store_url(request.param, tmp_path))


async def test_replay_within_one_batch_and_across_a_restart(db: str) -> None:
    alice = Sender()
    first, second = alice.encrypt("hello"), alice.encrypt("again")
    original = alice.event("$original", first)
    replay = alice.event("$replay", first)  # index 0 again, another event ID
    async with device(db, alice, first=True) as crypto:
        assert isinstance(await crypto.decrypt(original), Decrypted)
        # the same batch: index 0 is not written yet, and is still refused to another event
        result = await crypto.decrypt(replay)
        assert isinstance(result, NotDecrypted)
        assert result.reason is Undecryptable.REPLAYED
        # the same event again (Synapse redelivers, the batch is processed again): fine
        assert isinstance(await crypto.decrypt(original), Decrypted)
        # another timestamp for the same event ID is refused too
        retimed = alice.event("$original", first, ts=1_700_000_000_001)
        result = await crypto.decrypt(retimed)
        assert isinstance(result, NotDecrypted)
        assert result.reason is Undecryptable.REPLAYED
        assert isinstance(await crypto.decrypt(alice.event("$second", second)), Decrypted)
        rows = await crypto.db.fetchval("SELECT COUNT(*) FROM crypto_message_index")
        assert rows == 0  # deferred: nothing written per event
        await crypto.flush()  # the worker's before_commit
        rows = await crypto.db.fetch("SELECT * FROM crypto_message_index")
        assert len(rows) == 2
        # keyed hashes only: no sender key, session ID, event ID or timestamp readable
        stored = repr([dict(r) for r in rows])
        for secret in (
            alice.account.identity_keys["curve25519"],
            alice.outbound.id,
            "$original",
            "$second",
            "1700000000000",
        ):
            assert secret not in stored
    async with device(db, alice, first=False) as crypto:  # a restart: memory is empty
        result = await crypto.decrypt(replay)
        assert isinstance(result, NotDecrypted)
        assert result.reason is Undecryptable.REPLAYED
        assert isinstance(await crypto.decrypt(original), Decrypted)
        result = await crypto.decrypt(alice.event("$other", second))
        assert isinstance(result, NotDecrypted)
        assert result.reason is Undecryptable.REPLAYED
        assert isinstance(await crypto.decrypt(alice.event("$second", second)), Decrypted)


async def test_a_redacted_session_is_not_served_from_memory(db: str) -> None:
    alice = Sender()
    async with device(db, alice, first=True) as crypto:
        assert isinstance(await crypto.decrypt(alice.event("$a", alice.encrypt("a"))), Decrypted)
        await crypto.store.redact_group_session(RoomID(ROOM), SessionID(alice.outbound.id), "test")
        result = await crypto.decrypt(alice.event("$b", alice.encrypt("b")))
        assert isinstance(result, NotDecrypted)
        assert result.reason is Undecryptable.WITHHELD
    # closing wrote no deferred ratchet bookkeeping over the redaction
    async with device(db, alice, first=False) as crypto:
        result = await crypto.decrypt(alice.event("$c", alice.encrypt("c")))
        assert isinstance(result, NotDecrypted)
        assert result.reason is Undecryptable.WITHHELD


async def test_rows_mautrix_wrote_in_plaintext_still_count(db: str) -> None:
    alice = Sender()
    first = alice.encrypt("hello")
    async with device(db, alice, first=True) as crypto:
        await crypto.db.execute(  # as mautrix's own store wrote it before this one
            "INSERT INTO crypto_message_index "
            '(sender_key, session_id, "index", event_id, timestamp) VALUES ($1, $2, 0, $3, $4)',
            alice.account.identity_keys["curve25519"],
            alice.outbound.id,
            "$original",
            1_700_000_000_000,
        )
    async with device(db, alice, first=False) as crypto:
        result = await crypto.decrypt(alice.event("$replay", first))
        assert isinstance(result, NotDecrypted)
        assert result.reason is Undecryptable.REPLAYED
        assert isinstance(await crypto.decrypt(alice.event("$original", first)), Decrypted)
