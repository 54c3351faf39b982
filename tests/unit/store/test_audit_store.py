"""The encrypted, tamper-evident audit store on real SQLite and PostgreSQL databases.

Secrets written through the real HTTP ingest path never reach the database files; the
`audit verify` CLI catches each attack on a real store and names the first bad record;
key rotation keeps old records readable; keyring mistakes fail clearly.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from bridge.archive.cli import main as audit_main
from bridge.archive.setup import open_store
from bridge.audit.keyring import Keyring, KeyringMissingError
from bridge.config import Config, load_config
from bridge.http.transactions import AppserviceAPI
from bridge.store import AuditEntry, Store, StoreError
from tests.conftest import BACKENDS, fresh_store_url
from tests.kit.config import make_config
from tests.kit.store import destroy_room_key

TOKEN = "hs-token-for-audit-tests-xxxxxxx"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@dataclass
class Env:
    backend: str
    config_path: Path
    config: Config
    tmp: Path

    async def open(self) -> Store:
        return await open_store(self.config)

    async def cli(self, *args: str) -> int:
        return await asyncio.to_thread(
            audit_main, [args[0], "-c", str(self.config_path), *args[1:]]
        )

    async def sql(self, *statements: str, **params: Any) -> None:
        engine = create_async_engine(self.config.database.url)
        try:
            async with engine.begin() as conn:
                for st in statements:
                    await conn.execute(text(st), params)
        finally:
            await engine.dispose()

    async def scalar(self, statement: str, **params: Any) -> Any:
        engine = create_async_engine(self.config.database.url)
        try:
            async with engine.connect() as conn:
                return (await conn.execute(text(statement), params)).scalar()
        finally:
            await engine.dispose()


@pytest.fixture(params=BACKENDS)
async def env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Env]:
    url = await fresh_store_url(request.param, tmp_path)
    keys = tmp_path / "keys"  # the signing key lives apart from the database
    cfg = {
        "appservice": {"as_token": "as-token-x-xxxxxxxxxxxxxxxxxxxxx", "hs_token": TOKEN},
        "gate": {"token": "gate-token-x-xxxxxxxxxxxxxxxxxxx"},
        "data_dir": str(tmp_path / "data"),
        "database": {"url": url},
        "audit": {
            "keyring": str(tmp_path / "data" / "audit-keyring.json"),
            "signing_key": str(keys / "audit-signing.pem"),
            "checkpoint_every": 10,
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    yield Env(request.param, path, load_config(path, env={}), tmp_path)


def ev(i: int, room: str = "!r:x", sender: str = "@u:x", body: str | None = None) -> dict:
    return {
        "event_id": f"$e{i}",
        "room_id": room,
        "sender": sender,
        "type": "m.room.message",
        "origin_server_ts": 1_700_000_000_000 + i,
        "content": {"msgtype": "m.text", "body": body or f"hello {i}"},
    }


async def fill(env: Env, n: int = 30, per_txn: int = 5) -> None:
    """n records in transactions of per_txn events: checkpoints at 10, 20, 30 and on close."""
    store = await env.open()
    try:
        for t in range(n // per_txn):
            evs = [ev(t * per_txn + i + 1, room=f"!room{i % 3}:x") for i in range(per_txn)]
            await store.queue.ingest(f"t{t}", evs)
    finally:
        await store.close()


# -- nothing readable at rest ------------------------------------------------------------

SECRET_BODY = "Nightjar launch code 7F3A-ZULU-9921"
SECRET_SENDER = "@whistleblower-q7:corp.example"
SECRET_ROOM = "!hiddenmergerroom8812:corp.example"
SECRET_ROOM_NAME = "Project Kestrel Acquisition"
SECRETS = [SECRET_BODY, SECRET_SENDER, SECRET_ROOM, SECRET_ROOM_NAME]


def leaked(blob: bytes) -> list[str]:
    found = []
    for s in SECRETS:
        for form in {s, s.split(":")[0], json.dumps(s)[1:-1]}:
            if form.encode() in blob or form.encode("utf-16-le") in blob:
                found.append(form)
    return found


async def test_secrets_never_reach_the_database_files(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    store = await env.open()
    api = AppserviceAPI(store, TOKEN)
    app = web.Application()
    app.add_routes(api.routes())
    events = [
        {
            "event_id": "$name",
            "room_id": SECRET_ROOM,
            "sender": SECRET_SENDER,
            "type": "m.room.name",
            "state_key": "",
            "origin_server_ts": 1_700_000_000_000,
            "content": {"name": SECRET_ROOM_NAME},
        },
        {
            "event_id": "$msg",
            "room_id": SECRET_ROOM,
            "sender": SECRET_SENDER,
            "type": "m.room.message",
            "origin_server_ts": 1_700_000_000_001,
            "content": {"msgtype": "m.text", "body": SECRET_BODY},
        },
    ]
    async with TestClient(TestServer(app)) as client:
        r = await client.put(
            "/_matrix/app/v1/transactions/s1", json={"events": events}, headers=AUTH
        )
        assert r.status == 200
    # a gate decision and an executor outcome about the same room and sender
    await store.records.append(
        [AuditEntry("decision", {"reason": SECRET_BODY}, room_id=SECRET_ROOM, sender=SECRET_SENDER)]
    )
    [item] = await store.queue.pending()
    assert item.events[1].event["content"]["body"] == SECRET_BODY  # readable with the keys

    if env.backend == "sqlite":
        db = Path(env.config.database.url.split(":///", 1)[1])
        files = [db, Path(f"{db}-wal")]
        assert files[1].exists() and files[1].stat().st_size > 0
        blob = b"".join(f.read_bytes() for f in files if f.exists())
        assert blob and not leaked(blob)
        await store.close()
        blob = b"".join(f.read_bytes() for f in files if f.exists())
    else:
        await store.close()
        dump = subprocess.run(
            [
                "pg_dump",
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                make_url(env.config.database.url).database,
            ],
            capture_output=True,
            check=True,
            env={**os.environ, "PGCONNECT_TIMEOUT": "10"},
        ).stdout
        assert b"CREATE TABLE public.records" in dump
        blob = dump
    assert not leaked(blob), leaked(blob)
    # ...and the archive still finds them by blind index and after decryption
    capsys.readouterr()
    found = await asyncio.to_thread(
        audit_main,
        ["search", "-c", str(env.config_path), "--room", SECRET_ROOM, "--text", "zulu", "--json"],
    )
    assert found == 0
    # the message and the gate decision quoting it; not the room name event
    message, decision = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (message["seq"], message["event_id"], message["sender"]) == (2, "$msg", SECRET_SENDER)
    assert message["room_id"] == SECRET_ROOM
    assert message["data"]["content"]["body"] == SECRET_BODY
    assert (decision["seq"], decision["kind"], decision["sender"]) == (3, "decision", SECRET_SENDER)
    assert decision["data"] == {"reason": SECRET_BODY}


# -- tamper evidence -------------------------------------------------------------------


async def test_verify_passes_on_an_intact_store(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    await fill(env)
    assert await env.cli("verify") == 0
    out = capsys.readouterr().out
    assert "OK: 30 records" in out and "3 checkpoints verified" in out
    log = env.config.audit.checkpoint_log  # type: ignore[union-attr]
    assert log.parent == env.tmp / "keys"
    assert [json.loads(line)["seq"] for line in log.read_text().splitlines()] == [10, 20, 30]


ATTACKS: dict[str, tuple[int, str]] = {
    "ciphertext byte": (12, "ciphertext"),
    "origin_ts column": (13, "hash_mismatch"),
    "sender index column": (14, "hash_mismatch"),
    "deleted record": (15, "missing"),
    "reordered records": (17, "seq 17"),
    "truncated tail": (26, "truncated"),
    "forged checkpoint": (20, "checkpoint"),
    "rewritten with hashes": (20, "rewritten"),
    "ciphertext set to NULL": (12, "ciphertext was removed (null) but no later archive-expiry"),
    "data key deleted": (2, "is not in the data_keys table and no shred record names it"),
    "forged expiry record": (3, "no signed checkpoint covers that record"),
}


async def attack(env: Env, name: str) -> None:
    async def column(col: str, seq: int) -> bytes:
        return bytes(await env.scalar(f"SELECT {col} FROM records WHERE seq = :s", s=seq))

    if name == "ciphertext byte":
        ct = bytearray(await column("ciphertext", 12))
        ct[len(ct) // 2] ^= 0x01
        await env.sql("UPDATE records SET ciphertext = :v WHERE seq = 12", v=bytes(ct))
    elif name == "origin_ts column":
        await env.sql("UPDATE records SET origin_ts = origin_ts + 1 WHERE seq = 13")
    elif name == "sender index column":
        other = await column("sender_idx", 1)
        await env.sql("UPDATE records SET sender_idx = :v WHERE seq = 14", v=other[::-1])
    elif name == "deleted record":
        await env.sql("DELETE FROM records WHERE seq = 15")
    elif name == "reordered records":
        await env.sql(
            "UPDATE records SET seq = -1 WHERE seq = 17",
            "UPDATE records SET seq = 17 WHERE seq = 18",
            "UPDATE records SET seq = 18 WHERE seq = -1",
        )
    elif name == "truncated tail":
        # the attacker also removes the checkpoints from the database: the log file remains
        await env.sql(
            "DELETE FROM records WHERE seq > 25", "DELETE FROM checkpoints WHERE seq > 25"
        )
    elif name == "forged checkpoint":
        await env.sql("UPDATE checkpoints SET head_hash = :v WHERE seq = 20", v=os.urandom(32))
        log = env.config.audit.checkpoint_log  # type: ignore[union-attr]
        log.write_text("")  # and the outside copy is wiped
    elif name == "ciphertext set to NULL":
        await env.sql("UPDATE records SET ciphertext = NULL WHERE seq = 12")
    elif name == "data key deleted":  # the key of !room1:x, first used by record 2
        await env.sql(
            "DELETE FROM data_keys WHERE key_id = (SELECT key_id FROM records WHERE seq = 2)"
        )
    elif name == "forged expiry record":
        # drop a ciphertext, then append an expiry record "justifying" it at the tail, where
        # no signed checkpoint protects the chain
        from bridge.audit.chain import EXPIRY_KIND, ChainFields, record_hash

        await env.sql("UPDATE records SET ciphertext = NULL WHERE seq = 3")
        last = bytes(await column("hash", 30))
        ct = os.urandom(40)
        f = ChainFields(
            31, 1, EXPIRY_KIND, None, None, None, None, "k", os.urandom(12),
            hashlib.sha256(ct).digest(), 1 << 62,
        )  # fmt: skip
        await env.sql(
            "INSERT INTO records (seq, ts, kind, origin_ts, key_id, nonce, ciphertext, "
            "ct_digest, hash) VALUES (31, 1, :k, :o, 'k', :n, :c, :d, :h)",
            k=EXPIRY_KIND,
            o=f.origin_ts,
            n=f.nonce,
            c=ct,
            d=f.ciphertext_digest,
            h=record_hash(last, f),
        )
    elif name == "rewritten with hashes":
        # change record 12's ciphertext and recompute the digest and every later hash
        from bridge.audit.chain import ChainFields, record_hash
        from bridge.audit.crypto import ciphertext_digest

        engine = create_async_engine(env.config.database.url)
        async with engine.begin() as conn:
            rows = (
                await conn.execute(
                    text(
                        "SELECT seq, ts, kind, event_id_idx, room_idx, sender_idx, type_idx, "
                        "key_id, nonce, ct_digest, origin_ts, hash, ciphertext FROM records "
                        "ORDER BY seq"
                    )
                )
            ).all()
            prev = bytes(rows[10][11])
            for r in rows[11:]:
                f = ChainFields(*r[:11])
                ct = bytes(r[12])
                if f.seq == 12:
                    ct = b"forged" + ct[6:]
                f = f._replace(ciphertext_digest=ciphertext_digest(ct))
                prev = record_hash(prev, f)
                await conn.execute(
                    text("UPDATE records SET ciphertext=:c, ct_digest=:d, hash=:h WHERE seq=:s"),
                    {"c": ct, "d": f.ciphertext_digest, "h": prev, "s": f.seq},
                )
        await engine.dispose()


@pytest.mark.parametrize("name", list(ATTACKS))
async def test_verify_catches_attacks_and_names_the_first_bad_record(
    env: Env, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    await fill(env)
    await attack(env, name)
    rc = await env.cli("verify")
    err = capsys.readouterr().err
    seq, hint = ATTACKS[name]
    assert rc == 6, err
    assert f"first bad record: seq {seq} " in err, err
    assert hint in err.lower(), err


async def test_reads_name_a_record_whose_data_key_is_unknown(env: Env) -> None:
    """A deleted data key no shred record names is an error naming the record, not
    "destroyed"; a key destroyed by the bridge reads as destroyed and verifies."""
    await fill(env, n=10)
    store = await env.open()
    try:
        assert await destroy_room_key(store, "!room0:x")
        recs = [r async for r in store.reader.iter(room="!room0:x")]
        assert [r["data"] for r in recs if r["kind"] == "event"] == [None] * 4
        assert all("destroyed" in r["unreadable"] for r in recs if r["kind"] == "event")
        [shred] = [r for r in recs if r["kind"] == "shred"]
        assert shred["data"]["destroyed_key_id"]
    finally:
        await store.close()
    assert await env.cli("verify") == 0
    await env.sql("DELETE FROM data_keys WHERE key_id = (SELECT key_id FROM records WHERE seq = 2)")
    store = await env.open()
    try:
        with pytest.raises(StoreError, match=r"seq 2: its data key '[0-9a-f]+' is not in the"):
            [r async for r in store.reader.iter()]
    finally:
        await store.close()
    assert await env.cli("verify") == 6


async def test_reads_name_a_corrupted_record(env: Env) -> None:
    await fill(env, n=10)
    ct = bytearray(await env.scalar("SELECT ciphertext FROM records WHERE seq = 4"))
    ct[0] ^= 0xFF
    await env.sql("UPDATE records SET ciphertext = :v WHERE seq = 4", v=bytes(ct))
    store = await env.open()
    try:
        with pytest.raises(StoreError, match="seq 4"):
            [r async for r in store.reader.iter()]
    finally:
        await store.close()


# -- keys ------------------------------------------------------------------------------


async def test_first_start_generates_a_private_keyring(env: Env) -> None:
    store = await env.open()
    await store.close()
    path = env.config.audit.keyring  # type: ignore[union-attr]
    assert path.exists() and (path.stat().st_mode & 0o777) == 0o600
    assert Keyring.load(path).kek_ids == store.keyring.kek_ids  # type: ignore[union-attr]


async def test_missing_or_wrong_keyring_is_refused_clearly(env: Env) -> None:
    await fill(env, n=10)
    path = env.config.audit.keyring  # type: ignore[union-attr]
    original = Keyring.load(path)
    path.rename(path.with_suffix(".bak"))
    with pytest.raises(KeyringMissingError, match="already holds encrypted"):
        await env.open()
    # another keyring entirely: the missing KEK is named
    Keyring.generate(kek_id="kek-other").save(path)
    with pytest.raises(StoreError, match=f"missing KEK '{original.current.id}'"):
        await env.open()
    # right KEK id and index key, wrong material: the data key is named
    bad = Keyring.from_dict(
        {
            **original.to_dict(),
            "keks": [
                {
                    **original.to_dict()["keks"][0],
                    "key": Keyring.generate().to_dict()["keks"][0]["key"],
                }
            ],
        }
    )
    bad.save(path)
    with pytest.raises(StoreError, match=r"audit data key '[0-9a-f]+'.*cannot be unwrapped"):
        await env.open()
    # the CLI reports it as a database error
    assert await env.cli("search") == 5


async def test_rotate_key_rewraps_and_old_kek_can_be_removed(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    await fill(env, n=10)
    path = env.config.audit.keyring  # type: ignore[union-attr]
    old = Keyring.load(path).current.id
    assert await env.cli("rotate-key", "--remove-old") == 0, capsys.readouterr().err
    ring = Keyring.load(path)
    assert ring.kek_ids != [old] and len(ring.kek_ids) == 1
    store = await env.open()
    try:
        # three rooms, and the key of records without a room (the rotation's own record)
        assert await store.keys.kek_usage() == {ring.current.id: 4}
        bodies = [r["data"]["content"]["body"] async for r in store.reader.iter(kind="event")]
        assert bodies == [f"hello {i}" for i in range(1, 11)]
        [rotation] = [r["data"] async for r in store.reader.iter(kind="command")]
        assert rotation["command"] == "audit rotate-key" and rotation["new_kek"] == ring.current.id
        assert rotation["old_keks"] == [old] and rotation["removed_old"] is True
        assert rotation["rewrapped"] == 3 and rotation["actor"]
        await store.queue.ingest("new", [ev(99, room="!new:x")])
        assert await store.keys.kek_usage() == {ring.current.id: 5}
    finally:
        await store.close()
    assert await env.cli("verify") == 0


# -- the CLI never creates the signing key, never signs ---------------------------------


async def test_read_only_commands_create_no_signing_key_and_sign_nothing(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    await fill(env)
    key = env.config.audit.signing_key  # type: ignore[union-attr]
    log = env.config.audit.checkpoint_log  # type: ignore[union-attr]
    pub = env.tmp / "signing.pub.pem"
    assert await env.cli("public-key", "-o", str(pub)) == 0
    assert pub.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    capsys.readouterr()
    assert await env.cli("public-key") == 0
    assert capsys.readouterr().out == pub.read_text()
    # on a machine without the private key: search, export and rotate-key still work...
    key.rename(key.with_suffix(".away"))
    cps, logged = await env.scalar("SELECT count(*) FROM checkpoints"), log.read_text()
    assert await env.cli("search", "--room", "!room0:x", "--actor", "dave") == 0
    assert await env.cli("export", "-o", str(env.tmp / "x.jsonl")) == 0
    assert await env.cli("rotate-key") == 0
    assert await env.cli("public-key") == 3  # nothing to print: it does not make one either
    # ...create no key, sign no checkpoint (not even on close)...
    assert not key.exists()
    assert await env.scalar("SELECT count(*) FROM checkpoints") == cps
    assert log.read_text() == logged
    # ...and the archive verifies with the public key: their records are chained
    capsys.readouterr()
    assert await env.cli("verify") == 3
    assert "--public-key" in capsys.readouterr().err
    assert await env.cli("verify", "--public-key", str(pub)) == 0
    assert "OK: 33 records" in capsys.readouterr().out
    # the bridge's next checkpoint covers them
    key.with_suffix(".away").rename(key)
    store = await env.open()
    await store.close()
    assert await env.scalar("SELECT max(seq) FROM checkpoints") == 33
    assert await env.cli("verify") == 0


# -- search and export -----------------------------------------------------------------


async def test_search_and_export(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    store = await env.open()
    await store.queue.ingest(
        "t1",
        [
            ev(1, room="!a:x", sender="@alice:x", body="quarterly numbers attached"),
            ev(2, room="!a:x", sender="@bob:x", body="thanks"),
            ev(3, room="!b:x", sender="@alice:x", body="Quarterly review friday"),
        ],
    )
    await store.records.append([AuditEntry("decision", {"rule": "dlp"}, room_id="!a:x")])
    await store.close()
    capsys.readouterr()
    assert await env.cli("search", "--sender", "@alice:x", "--text", "quarterly") == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and "quarterly numbers" in out[0] and "!b:x" in out[1]
    assert await env.cli("search", "--room", "!a:x", "--since", "2023-11-14T22:13:20.002Z") == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == ["#2", "#4"]

    target = env.tmp / "out.jsonl"
    assert await env.cli("export", "--room", "!a:x", "-o", str(target), "--actor", "carol") == 0
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert [r["seq"] for r in rows] == [1, 2, 4]
    csv_target = env.tmp / "out.csv"
    assert (
        await env.cli(
            "export", "--type", "m.room.message", "--format", "csv", "-o", str(csv_target)
        )
        == 0
    )
    assert len(csv_target.read_text().splitlines()) == 4
    store = await env.open()
    try:
        exports = [r async for r in store.reader.iter(kind="export")]
    finally:
        await store.close()
    assert [e["data"]["count"] for e in exports] == [3, 3]
    assert exports[0]["data"]["actor"] == "carol"
    assert exports[0]["data"]["filters"] == {"room": "!a:x"}
    # searches are recorded too (who, what filter, how many)
    store = await env.open()
    try:
        searches = [r["data"] async for r in store.reader.iter(kind="command")]
    finally:
        await store.close()
    assert [(d["command"], d["count"], d["via"]) for d in searches] == [
        ("audit search", 2, "cli"),
        ("audit search", 2, "cli"),
    ]
    assert searches[0]["filters"] == {"sender": "@alice:x", "text": "quarterly"}
    assert searches[0]["actor"] and searches[0]["limit"] == 100
    assert await env.cli("verify") == 0


async def test_a_replaced_signing_key_is_trusted_through_previous_public_keys(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    await fill(env)
    keyfile = env.config.audit.signing_key  # type: ignore[union-attr]
    assert await env.cli("public-key", "-o", str(env.tmp / "old.pem")) == 0
    keyfile.rename(keyfile.with_name("retired.pem"))  # replaced: the next start makes a new one
    store = await env.open()
    try:
        await store.queue.ingest("after", [ev(1000 + i) for i in range(12)])
    finally:
        await store.close()
    capsys.readouterr()
    assert await env.cli("verify") == 6  # the old checkpoints' key is not trusted
    assert "not a trusted" in capsys.readouterr().err

    cfg = json.loads(env.config_path.read_text())
    cfg["audit"]["previous_public_keys"] = [str(env.tmp / "old.pem")]
    env.config_path.write_text(json.dumps(cfg))
    assert await env.cli("verify") == 0, capsys.readouterr().err


def test_previous_public_keys_must_exist(tmp_path: Path) -> None:
    from bridge.config import ConfigError

    with pytest.raises(ConfigError) as info:
        make_config(
            {
                "audit": {"previous_public_keys": ["nowhere.pem"]},
            },
            base_dir=tmp_path,
        )
    assert "audit.previous_public_keys" in str(info.value)
    assert "nowhere.pem" in str(info.value)
