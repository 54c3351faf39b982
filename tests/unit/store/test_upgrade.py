"""Upgrades: databases written by earlier schema versions, opened by the current bridge.

Schema 1 kept plaintext records; schema 2 encrypted and chained them but kept the rooms,
executor actions and state values in plaintext. The current code migrates both in place
(one transaction): records are encrypted and chained in seq order, the work queue and the
actions survive, everything decrypts, ``audit verify`` passes, and no secret is left
readable in the database. A migration that fails part-way leaves the old database intact.
"""

from __future__ import annotations

import asyncio
import importlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    delete,
    insert,
    select,
    text,
)
from sqlalchemy.ext.asyncio import create_async_engine

from bridge.archive.cli import main as audit_main
from bridge.archive.setup import open_store
from bridge.audit.crypto import OPERATIONAL_SCOPE
from bridge.config import Config, load_config
from bridge.store import PLAIN_STATE_KEYS, Store, StoreError
from bridge.store import schema as current
from tests.conftest import BACKENDS, fresh_store_url
from tests.kit.store import actions_by_status, count_events
from tests.unit.store.test_at_rest import (
    SECRET_BODY,
    SECRET_EVENT,
    SECRET_MGMT,
    SECRET_REASON,
    SECRET_ROOM,
    SECRET_SENDER,
    database_bytes,
    leaked,
)

# -- the schemas of earlier releases, frozen (git show 6157f9b:bridge/store/schema.py) --

v1 = MetaData()
V1_RECORDS = Table(
    "records",
    v1,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("ts", BigInteger, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("event_id", String(255), nullable=True, unique=True),
    Column("room_id", String(255), nullable=True),
    Column("sender", String(255), nullable=True),
    Column("type", String(255), nullable=True),
    Column("origin_ts", BigInteger, nullable=True),
    Column("data", LargeBinary, nullable=False),
    Index("ix_records_room_ts", "room_id", "origin_ts"),
    Index("ix_records_kind_ts", "kind", "ts"),
)


def _operational(meta: MetaData) -> tuple[Table, Table, Table, Table]:
    """transactions, actions, rooms, bridge_state as schemas 1 and 2 had them."""
    txns = Table(
        "transactions",
        meta,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("txn_id", String(255), nullable=False, unique=True),
        Column("received_ts", BigInteger, nullable=False),
        Column("first_seq", BigInteger, nullable=True),
        Column("last_seq", BigInteger, nullable=True),
        Column("event_count", Integer, nullable=False),
        Column("processed", Boolean, nullable=False),
        Index("ix_transactions_pending", "processed", "id"),
    )
    acts = Table(
        "actions",
        meta,
        Column("id", String(64), primary_key=True),
        Column("kind", String(32), nullable=False),
        Column("room_id", String(255), nullable=True),
        Column("payload", Text, nullable=False),
        Column("status", String(16), nullable=False),
        Column("attempts", Integer, nullable=False, default=0),
        Column("next_at", Float, nullable=False),
        Column("last_error", Text, nullable=True),
        Column("created_ts", BigInteger, nullable=False),
        Column("updated_ts", BigInteger, nullable=False),
        Index("ix_actions_due", "status", "next_at"),
    )
    rms = Table(
        "rooms",
        meta,
        Column("room_id", String(255), primary_key=True),
        Column("joined", Boolean, nullable=False, default=False),
        Column("lacking", Text, nullable=False, default=""),
        Column("updated_ts", BigInteger, nullable=False),
    )
    st = Table(
        "bridge_state",
        meta,
        Column("key", String(128), primary_key=True),
        Column("value", Text, nullable=False),
    )
    return txns, acts, rms, st


V1_TXNS, V1_ACTIONS, V1_ROOMS, V1_STATE = _operational(v1)
v2_ops = MetaData()  # schema 2's rooms and actions (its records are today's)
_, V2_ACTIONS, V2_ROOMS, _ = _operational(v2_ops)

TS = 1_700_000_000_000


@dataclass
class Env:
    backend: str
    url: str
    config_path: Path
    config: Config

    async def open(self) -> Store:
        return await open_store(self.config)

    async def run(self, *statements: Any) -> None:
        engine = create_async_engine(self.url)
        try:
            async with engine.begin() as conn:
                for st in statements:
                    await conn.execute(st)
        finally:
            await engine.dispose()

    async def cli(self, command: str) -> int:
        return await asyncio.to_thread(audit_main, [command, "-c", str(self.config_path)])

    async def verify(self) -> int:
        return await self.cli("verify")


@pytest.fixture(params=BACKENDS)
async def env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Env]:
    url = await fresh_store_url(request.param, tmp_path)
    cfg = {
        "appservice": {
            "as_token": "as-token-x-xxxxxxxxxxxxxxxxxxxxx",
            "hs_token": "hs-token-x-xxxxxxxxxxxxxxxxxxxxx",
        },
        "gate": {"token": "gate-token-x-xxxxxxxxxxxxxxxxxxx"},
        "data_dir": str(tmp_path / "data"),
        "database": {"url": url},
        "audit": {
            "keyring": str(tmp_path / "data" / "audit-keyring.json"),
            "signing_key": str(tmp_path / "keys" / "audit-signing.pem"),
            "checkpoint_every": 4,
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(cfg))
    yield Env(request.param, url, path, load_config(path, env={}))


def event(i: int, body: str | None = None) -> dict[str, Any]:
    return {
        "event_id": SECRET_EVENT if i == 2 else f"$old{i}",
        "room_id": SECRET_ROOM,
        "sender": SECRET_SENDER,
        "type": "m.room.message",
        "origin_server_ts": TS + i,
        "content": {"msgtype": "m.text", "body": body or f"old message {i}"},
    }


def operational_rows(acts: Table, rms: Table, st: Table, version: int) -> list[Any]:
    """The plaintext rooms, actions and state an older bridge left behind."""
    return [
        insert(rms).values(room_id=SECRET_ROOM, joined=True, lacking="", updated_ts=TS),
        insert(rms).values(
            room_id=SECRET_MGMT,
            joined=True,
            lacking=f"bot lacks power level 50 in {SECRET_MGMT}",
            updated_ts=TS,
        ),
        insert(acts).values(
            id="a-pending",
            kind="send_notice",
            room_id=SECRET_MGMT,
            payload=json.dumps({"body": f"{SECRET_SENDER} broke a rule: {SECRET_BODY}"}),
            status="pending",
            attempts=0,
            next_at=0.0,
            last_error=None,
            created_ts=TS,
            updated_ts=TS,
        ),
        insert(acts).values(
            id="a-failed",
            kind="redact",
            room_id=SECRET_ROOM,
            payload=json.dumps({"event_id": SECRET_EVENT, "reason": SECRET_REASON}),
            status="failed",
            attempts=5,
            next_at=0.0,
            last_error=f"M_FORBIDDEN in {SECRET_ROOM}",
            created_ts=TS,
            updated_ts=TS,
        ),
        delete(st).where(st.c.key.in_(["schema_version", "management_room", "room_spaces"])),
        insert(st).values(key="schema_version", value=str(version)),
        insert(st).values(key="management_room", value=SECRET_MGMT),
        insert(st).values(key="room_spaces", value=json.dumps({SECRET_ROOM: "!s:x"})),
    ]


async def make_v1(env: Env) -> None:
    """A schema-1 database: plaintext records with a seq gap, a pending transaction."""
    engine = create_async_engine(env.url)
    async with engine.begin() as conn:
        await conn.run_sync(v1.create_all)
    await engine.dispose()
    rows: list[Any] = []
    seqs = [1, 2, 3, 4, 6, 7, 8]  # 5 was lost (a rolled-back PostgreSQL sequence value)
    for n, seq in enumerate(seqs):
        if n < 5:  # events
            ev = event(seq, SECRET_BODY if seq == 2 else None)
            rows.append(
                insert(V1_RECORDS).values(
                    seq=seq,
                    ts=TS + 100 + seq,
                    kind="event",
                    event_id=ev["event_id"],
                    room_id=ev["room_id"],
                    sender=ev["sender"],
                    type=ev["type"],
                    origin_ts=ev["origin_server_ts"],
                    data=json.dumps(ev).encode(),
                )
            )
        else:  # gate decisions and an executor outcome
            rows.append(
                insert(V1_RECORDS).values(
                    seq=seq,
                    ts=TS + 100 + seq,
                    kind="decision" if seq == 7 else "action",
                    event_id=None,
                    room_id=SECRET_ROOM,
                    sender=SECRET_SENDER,
                    type="dlp",
                    origin_ts=None,
                    data=json.dumps({"reason": SECRET_REASON, "n": seq}).encode(),
                )
            )
    rows += [
        insert(V1_TXNS).values(
            txn_id="old-1", received_ts=TS, first_seq=1, last_seq=3, event_count=3, processed=True
        ),
        insert(V1_TXNS).values(
            txn_id="old-2", received_ts=TS, first_seq=4, last_seq=6, event_count=2, processed=False
        ),
    ]
    rows += operational_rows(V1_ACTIONS, V1_ROOMS, V1_STATE, 1)
    await env.run(*rows)


async def make_v2(env: Env) -> None:
    """A schema-2 database: today's encrypted records, plaintext operational tables."""
    store = await env.open()
    try:
        await store.queue.ingest("old-1", [event(1), event(2, SECRET_BODY), event(3)])
        [item] = await store.queue.pending()
        await store.queue.complete([item.queue_id])
        await store.queue.ingest("old-2", [event(4), event(6)])
    finally:
        await store.close()
    engine = create_async_engine(env.url)
    async with engine.begin() as conn:
        # back to schema 2: the operational tables as they were, no operational key
        await conn.execute(text("DROP TABLE rooms"))
        await conn.execute(text("DROP TABLE actions"))
        await conn.execute(
            delete(current.state).where(current.state.c.key.not_in(PLAIN_STATE_KEYS))
        )
        await conn.execute(
            delete(current.data_keys).where(current.data_keys.c.scope == OPERATIONAL_SCOPE)
        )
        await conn.run_sync(v2_ops.create_all)
    await engine.dispose()
    await env.run(*operational_rows(V2_ACTIONS, V2_ROOMS, current.state, 2))


MAKERS = {"v1": make_v1, "v2": make_v2}


async def check_upgraded(env: Env, version: str) -> None:
    store = await env.open()
    try:
        assert await store.state.get("schema_version") == str(current.SCHEMA_VERSION)
        records = [r async for r in store.reader.iter()]
        events = [r for r in records if r["kind"] == "event"]
        assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
        assert [e["data"]["origin_server_ts"] for e in events] == [TS + i for i in (1, 2, 3, 4, 6)]
        assert events[1]["data"]["content"]["body"] == SECRET_BODY
        assert events[1]["event_id"] == SECRET_EVENT and events[1]["sender"] == SECRET_SENDER
        assert await count_events(store, SECRET_EVENT) == 1
        assert [r["seq"] for r in records if r["room_id"] == SECRET_ROOM]  # blind index works
        assert [r["seq"] async for r in store.reader.iter(room=SECRET_ROOM)]
        if version == "v1":
            audit = [r for r in records if r["kind"] != "event"]
            assert [(r["kind"], r["data"]["n"]) for r in audit] == [("decision", 7), ("action", 8)]
            assert audit[0]["sender"] == SECRET_SENDER and audit[0]["type"] == "dlp"
            assert records[0]["ts"] == TS + 101  # archive times kept
        # the work queue survived: the pending transaction's events, renumbered
        [item] = await store.queue.pending()
        assert item.txn_id == "old-2"
        assert [e.event["origin_server_ts"] for e in item.events] == [TS + 4, TS + 6]
        assert (await store.queue.ingest("old-1", [event(1)])).duplicate
        assert await count_events(store, "$old1") == 1  # replay still recognised
        rooms = {r["room_id"]: r for r in await store.rooms.known()}
        assert set(rooms) == {SECRET_ROOM, SECRET_MGMT}
        assert SECRET_MGMT in rooms[SECRET_MGMT]["lacking"]
        [due] = await store.actions.due(2e9)
        assert due.id == "a-pending" and SECRET_BODY in due.payload["body"]
        assert due.room_id == SECRET_MGMT
        [failed] = await actions_by_status(store, "failed")
        assert failed.last_error == f"M_FORBIDDEN in {SECRET_ROOM}"
        assert await store.state.get("management_room") == SECRET_MGMT
        assert SECRET_ROOM in json.loads(await store.state.get("room_spaces") or "{}")
        # the bridge goes on appending to the migrated chain
        await store.queue.ingest("new-1", [event(9)])
    finally:
        await store.close()
    assert await env.verify() == 0
    blob = database_bytes(env.url)
    assert not leaked(blob), leaked(blob)


@pytest.mark.parametrize("version", list(MAKERS))
async def test_an_older_database_is_migrated_and_verifies(
    env: Env, version: str, capsys: pytest.CaptureFixture[str]
) -> None:
    await MAKERS[version](env)
    assert leaked(database_bytes(env.url))  # the old schema had them readable
    if version == "v2":
        assert await env.verify() == 0  # records are unchanged since schema 2
        capsys.readouterr()
        # the audit CLI does not migrate: it asks for a start of the bridge first
        assert await env.cli("search") != 0
        assert "start the bridge once" in capsys.readouterr().err
    else:  # schema 1 had no chain (and no signing key) to verify
        assert await env.verify() != 0
    await check_upgraded(env, version)
    assert "OK:" in capsys.readouterr().out


@pytest.mark.parametrize("version", list(MAKERS))
async def test_a_failed_migration_leaves_the_old_database(
    env: Env, version: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await MAKERS[version](env)
    last_step = importlib.import_module("bridge.store.migrations.003_seal_operational")
    original = last_step.upgrade

    async def crash(*args: Any) -> None:
        await original(*args)  # everything converted, then the process "dies"
        raise RuntimeError("power cut")

    monkeypatch.setattr(last_step, "upgrade", crash)
    with pytest.raises(RuntimeError, match="power cut"):
        await env.open()
    engine = create_async_engine(env.url)
    async with engine.connect() as conn:
        version_now = (
            await conn.execute(select(V1_STATE.c.value).where(V1_STATE.c.key == "schema_version"))
        ).scalar()
        room_ids = {r[0] for r in await conn.execute(select(V1_ROOMS.c.room_id))}
    await engine.dispose()
    assert version_now == version[1:] and room_ids == {SECRET_ROOM, SECRET_MGMT}
    monkeypatch.setattr(last_step, "upgrade", original)
    await check_upgraded(env, version)


async def test_a_newer_schema_is_refused(env: Env) -> None:
    store = await env.open()
    await store.close()
    await env.run(
        current.state.update().where(current.state.c.key == "schema_version").values(value="99")
    )
    with pytest.raises(StoreError, match="schema version 99"):
        await env.open()
