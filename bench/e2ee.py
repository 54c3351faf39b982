"""Megolm decryption on the bridge's path against libolm's own decrypt floor, same run.

N distinct events of one Megolm session, all on SQLite in a temporary directory:

- floor: python-olm's ``InboundGroupSession.decrypt`` of the ciphertexts (and vodozemac's,
  for comparison, when installed);
- decrypt call: :meth:`bridge.e2ee.olm.OlmCrypto.decrypt` (mautrix OlmMachine on the
  bridge's crypto store, :mod:`bridge.e2ee.store`: session and device trust from memory after
  the first event, the message-index replay check in memory, its writes deferred);
- ingest path: transactions of 100 events archived (``store.queue.ingest``), then processed
  as the worker does it: :class:`bridge.pipeline.decryption.DecryptionStage` decrypts each,
  the batch's message indexes are written (``before_commit``, one transaction) and the
  batch (``decrypted`` records, sealed, chained) is committed with the transaction mark.

Run: ``python bench/e2ee.py [N]``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import olm
from mautrix.api import HTTPAPI
from mautrix.client import Client
from mautrix.crypto import OlmMachine
from mautrix.types import DeviceID, DeviceIdentity, IdentityKey, SigningKey, TrustState, UserID

from bridge.config import build_config
from bridge.e2ee.olm import MACHINE_LOG, OlmCrypto, OlmSettings, _Rooms, open_crypto_db
from bridge.e2ee.seam import Decrypted
from bridge.e2ee.store import BridgeCryptoStore
from bridge.pipeline.batch import Batch
from bridge.pipeline.decryption import DecryptionStage
from bridge.store import Store

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
    vodo = _vodozemac_floor(key, [ev["content"]["ciphertext"] for ev in events])

    with tempfile.TemporaryDirectory() as tmp:
        db = await open_crypto_db(f"sqlite://{Path(tmp) / 'bench.db'}")  # as the bridge does
        store = BridgeCryptoStore("@bot:localhost", "bench-pickle-key", db)
        await store.put_device_id(DeviceID("BOT"))
        client = Client(
            mxid=UserID("@bot:localhost"),
            device_id=DeviceID("BOT"),
            api=HTTPAPI("http://127.0.0.1:9"),
        )
        machine = OlmMachine(client, store, _Rooms(), log=MACHINE_LOG)
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
        half = n // 2
        t0 = time.perf_counter()
        ok = 0
        for ev in events[:half]:
            if isinstance(await crypto.decrypt(ev), Decrypted):
                ok += 1
        call = half / (time.perf_counter() - t0)
        assert ok == half, f"only {ok} of {half} decrypted"
        ingest = await _ingest_path(Path(tmp), crypto, events[half:])
        await db.stop()
    print(f"events: {n} (decrypt call: {half}, ingest path: {n - half})")
    print(f"libolm InboundGroupSession.decrypt floor: {floor:,.0f} events/s")
    if vodo:
        print(f"vodozemac InboundGroupSession.decrypt (comparison): {vodo:,.0f} events/s")
    print(f"OlmCrypto.decrypt (SQLite crypto store): {call:,.0f} events/s")
    print(f"ingest path (archive + decrypt + decrypted records): {ingest:,.0f} events/s")
    print(f"ratio decrypt call/floor: {call / floor:.3f}")
    print(f"ratio ingest path/floor: {ingest / floor:.3f}")


def _vodozemac_floor(key: str, ciphertexts: list[str]) -> float:
    try:
        import vodozemac
    except ImportError:
        return 0.0
    inbound = vodozemac.InboundGroupSession(vodozemac.SessionKey(key))
    messages = [vodozemac.MegolmMessage.from_base64(c) for c in ciphertexts]
    t0 = time.perf_counter()
    for m in messages:
        inbound.decrypt(m)
    return len(messages) / (time.perf_counter() - t0)


async def _ingest_path(tmp: Path, crypto: OlmCrypto, events: list[dict[str, Any]]) -> float:
    config = build_config(
        {
            "homeserver": {"url": "http://127.0.0.1:9", "domain": "localhost"},
            "appservice": {"as_token": "a" * 32, "hs_token": "b" * 32},
            "gate": {"token": "c" * 32},
            "data_dir": str(tmp),
            "e2ee": {"enabled": True, "key_wait_seconds": 0},
        }
    )
    bstore = await Store.open(f"sqlite+aiosqlite:///{tmp / 'bridge.db'}")
    stage = DecryptionStage(bstore, lambda: config, lambda: "")
    stage.crypto = crypto
    try:
        t0 = time.perf_counter()
        for i in range(0, len(events), 100):
            await bstore.queue.ingest(f"t{i}", events[i : i + 100])
            for item in await bstore.queue.pending(1):
                batch = Batch()
                for stored in item.events:
                    plain = await stage.decrypt(
                        stored.event, stored.seq, batch, wait=0, joined=True
                    )
                    assert plain is not None
                await stage.before_commit()  # the batch's message indexes, as the worker
                await bstore.queue.complete([item.queue_id], batch.actions, batch.audit)
        return len(events) / (time.perf_counter() - t0)
    finally:
        await bstore.close()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000))
