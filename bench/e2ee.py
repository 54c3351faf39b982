"""Megolm decryption on the bridge's path against libolm's own decrypt floor, same run.

Path: :meth:`bridge.e2ee.olm.OlmCrypto.decrypt` (mautrix OlmMachine: session lookup in the
crypto store on SQLite, message-index replay check written per event, sender-device trust)
for N distinct events of one Megolm session. Floor: python-olm's
``InboundGroupSession.decrypt`` of the same ciphertexts. Run: ``python bench/e2ee.py [N]``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import cast

import olm
from mautrix.api import HTTPAPI
from mautrix.client import Client
from mautrix.crypto import OlmMachine, PgCryptoStore
from mautrix.types import DeviceID, DeviceIdentity, IdentityKey, SigningKey, TrustState, UserID
from mautrix.util.async_db import Database

from bridge.e2ee.olm import OlmCrypto, OlmSettings, _Rooms

ROOM = "!bench:localhost"
SENDER = "@alice:localhost"


async def main(n: int) -> None:
    outbound = olm.OutboundGroupSession()
    key = outbound.session_key
    sender_account = olm.Account()
    events = []
    for i in range(n):
        ct = outbound.encrypt(
            json.dumps({"room_id": ROOM, "type": "m.room.message", "content": {"body": f"msg {i}"}})
        )
        events.append(
            {
                "type": "m.room.encrypted",
                "room_id": ROOM,
                "sender": SENDER,
                "event_id": f"$e{i}",
                "origin_server_ts": 1_700_000_000_000 + i,
                "content": {
                    "algorithm": "m.megolm.v1.aes-sha2",
                    "sender_key": sender_account.identity_keys["curve25519"],
                    "device_id": "ALICE",
                    "session_id": outbound.id,
                    "ciphertext": ct,
                },
            }
        )
    # floor: libolm alone
    inbound = olm.InboundGroupSession(key)
    t0 = time.perf_counter()
    for ev in events:
        inbound.decrypt(ev["content"]["ciphertext"])
    floor = n / (time.perf_counter() - t0)

    with tempfile.TemporaryDirectory() as tmp:
        db = Database.create(
            f"sqlite://{Path(tmp) / 'bench.db'}", upgrade_table=PgCryptoStore.upgrade_table
        )
        await db.start()
        store = PgCryptoStore("@bot:localhost", "bench-pickle-key", db)
        await store.put_device_id(DeviceID("BOT"))
        client = Client(
            mxid=UserID("@bot:localhost"),
            device_id=DeviceID("BOT"),
            api=HTTPAPI("http://127.0.0.1:9"),
        )
        machine = OlmMachine(client, store, _Rooms())
        await machine.load()
        await store.put_devices(
            UserID(SENDER),
            {
                DeviceID("ALICE"): DeviceIdentity(
                    user_id=UserID(SENDER),
                    device_id=DeviceID("ALICE"),
                    identity_key=IdentityKey(sender_account.identity_keys["curve25519"]),
                    signing_key=SigningKey(sender_account.identity_keys["ed25519"]),
                    trust=TrustState.UNVERIFIED,
                    deleted=False,
                    name="",
                )
            },
        )
        await machine._create_group_session(
            IdentityKey(sender_account.identity_keys["curve25519"]),
            SigningKey(sender_account.identity_keys["ed25519"]),
            cast(object, ROOM),  # type: ignore[arg-type]
            outbound.id,
            key,
            max_age=None,
            max_messages=None,
        )
        settings = OlmSettings("", "", "@bot:localhost", "", "", "")
        crypto = OlmCrypto(settings, db, store, client, machine, client.api)
        t0 = time.perf_counter()
        ok = 0
        for ev in events:
            if hasattr(await crypto.decrypt(ev), "event"):
                ok += 1
        path = n / (time.perf_counter() - t0)
        await db.stop()
    assert ok == n, f"only {ok} of {n} decrypted"
    print(f"events: {n}")
    print(f"libolm InboundGroupSession.decrypt floor: {floor:,.0f} events/s")
    print(f"bridge decrypt path (OlmCrypto.decrypt, SQLite crypto store): {path:,.0f} events/s")
    print(f"ratio path/floor: {path / floor:.3f}")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000))
