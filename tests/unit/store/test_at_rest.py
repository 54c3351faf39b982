"""Nothing readable at rest, beyond the records: rooms, executor actions and bridge state.

A realistic flow through the Store API (ingest, rooms, actions with notice bodies and
redaction reasons, finished actions with errors, runtime policy documents keyed by room ID,
the management room, a legal hold) writes known secrets; none of them may appear in the
SQLite file and its WAL, nor in a pg_dump of the test's database. The API still returns
them in plaintext, and sealed values cannot be moved between rows.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import text, update
from sqlalchemy.engine import make_url

from bridge.audit.keyring import Keyring
from bridge.store import AuditEntry, NewAction, Store, StoreError, StoreSettings
from bridge.store.schema import rooms, state
from tests.conftest import BACKENDS, fresh_store_url
from tests.kit.store import actions_by_status

SECRET_BODY = "Nightjar launch code 7F3A-ZULU-9921"
SECRET_SENDER = "@whistleblower-q7:corp.example"
SECRET_ROOM = "!hiddenmergerroom8812:corp.example"
SECRET_MGMT = "!boardroomcontrol5521:corp.example"
SECRET_EVENT = "$SecretEventIdKq81Zx"
SECRET_REASON = "leaked salary table of Hollowbrook"
SECRET_ROOM_NAME = "Project Kestrel Acquisition"
SECRETS = [
    SECRET_BODY,
    SECRET_SENDER,
    SECRET_ROOM,
    SECRET_MGMT,
    SECRET_EVENT,
    SECRET_REASON,
    SECRET_ROOM_NAME,
]


def leaked(blob: bytes) -> list[str]:
    found = []
    for s in SECRETS:
        for form in {s, s.split(":")[0], json.dumps(s)[1:-1], s[1:].split(":")[0]}:
            if form.encode() in blob or form.encode("utf-16-le") in blob:
                found.append(form)
    return found


def database_bytes(url: str) -> bytes:
    """The SQLite file and its WAL, or a pg_dump of the PostgreSQL database."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        assert parsed.database
        db = Path(parsed.database)
        return b"".join(p.read_bytes() for p in (db, Path(f"{db}-wal")) if p.exists())
    dump = subprocess.run(
        ["pg_dump", "-h", parsed.host or "127.0.0.1", "-U", parsed.username or "postgres"]
        + (["-p", str(parsed.port)] if parsed.port else [])
        + [str(parsed.database)],
        capture_output=True,
        check=True,
        env={**os.environ, "PGCONNECT_TIMEOUT": "10"},
    ).stdout
    assert b"CREATE TABLE public.records" in dump and b"CREATE TABLE public.actions" in dump
    return dump


async def flow(store: Store) -> None:
    """Everything a running bridge writes about one room, through the Store API."""
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
            "event_id": SECRET_EVENT,
            "room_id": SECRET_ROOM,
            "sender": SECRET_SENDER,
            "type": "m.room.message",
            "origin_server_ts": 1_700_000_000_001,
            "content": {"msgtype": "m.text", "body": SECRET_BODY},
        },
    ]
    await store.queue.ingest("t1", events)
    await store.state.set("management_room", SECRET_MGMT)
    await store.rooms.upsert(SECRET_MGMT, joined=True)
    await store.rooms.upsert(SECRET_ROOM, joined=True)
    await store.rooms.upsert(SECRET_ROOM, lacking=f"bot lacks power level 50 in {SECRET_ROOM}")
    [item] = await store.queue.pending()
    notice = NewAction(
        "send_notice",
        {"body": f"{SECRET_SENDER} sent {SECRET_BODY!r} in {SECRET_ROOM} ({SECRET_EVENT})"},
        room_id=SECRET_MGMT,
    )
    redact = NewAction(
        "redact",
        {"event_id": SECRET_EVENT, "reason": f"DLP: {SECRET_REASON}"},
        room_id=SECRET_ROOM,
    )
    await store.queue.complete(
        [item.queue_id],
        [notice, redact],
        [AuditEntry("decision", {"rule": "dlp"}, room_id=SECRET_ROOM, sender=SECRET_SENDER)],
        {
            "policy.runtime.retention": json.dumps({"rooms": {SECRET_ROOM: {"max": "1d"}}}),
            "room_spaces": json.dumps({SECRET_ROOM: "!space:corp.example"}),
        },
    )
    await store.actions.enqueue(
        [NewAction("reconcile", {"rollout": "r1", "reason": SECRET_REASON}, room_id=SECRET_ROOM)]
    )
    await store.actions.finish(
        redact.id,
        status="failed",
        attempts=3,
        error=f"M_FORBIDDEN: cannot redact {SECRET_EVENT} in {SECRET_ROOM}",
    )
    await store.state.set("rollout", json.dumps({"id": "r1", "rooms": [SECRET_ROOM]}))
    await store.holds.set("room", SECRET_ROOM, True, by=SECRET_SENDER, reason=SECRET_REASON)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_operational_tables_hold_no_secret(backend: str, tmp_path: Path) -> None:
    url = await fresh_store_url(backend, tmp_path)
    keyring = Keyring.generate()
    store = await Store.open(url, StoreSettings(keyring=keyring))
    try:
        await flow(store)
        # the API still answers in plaintext
        rooms_now = {r["room_id"]: r for r in await store.rooms.known()}
        assert rooms_now[SECRET_ROOM]["joined"] is True
        assert SECRET_ROOM in rooms_now[SECRET_ROOM]["lacking"]
        assert await store.state.get("management_room") == SECRET_MGMT
        assert SECRET_ROOM in json.loads(await store.state.get("room_spaces") or "{}")
        assert (await store.state.get_many(["management_room", "nope"])) == {
            "management_room": SECRET_MGMT
        }
        due = await store.actions.due(2e9)
        assert {a.kind for a in due} == {"send_notice", "reconcile"}
        assert any(SECRET_BODY in a.payload["body"] for a in due if a.kind == "send_notice")
        [failed] = await actions_by_status(store, "failed")
        assert failed.room_id == SECRET_ROOM and SECRET_EVENT in (failed.last_error or "")
        assert failed.payload["reason"] == f"DLP: {SECRET_REASON}"
        assert await store.actions.count("reconcile", "pending", {"rollout": "r1"}) == 1
        assert await store.actions.count("reconcile", "pending", {"rollout": "r2"}) == 0
        assert await store.actions.count("reconcile", "pending") == 1
        page = await store.rooms.joined_page("", 10)
        assert sorted(r for r, _ in page) == sorted([SECRET_ROOM, SECRET_MGMT])
        assert await store.rooms.joined_page(page[-1][0], 10) == []
        if backend == "sqlite":
            blob = database_bytes(url)
            assert Path(make_url(url).database + "-wal").stat().st_size > 0  # type: ignore[operator]
            assert not leaked(blob), leaked(blob)
    finally:
        await store.close()
    blob = database_bytes(url)
    assert blob and not leaked(blob), leaked(blob)
    # reopened with the same keyring, everything reads back
    store = await Store.open(url, StoreSettings(keyring=keyring))
    try:
        assert await store.state.get("management_room") == SECRET_MGMT
        assert {r["room_id"] for r in await store.rooms.known()} == {SECRET_ROOM, SECRET_MGMT}
    finally:
        await store.close()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_sealed_values_are_bound_to_their_row(backend: str, tmp_path: Path) -> None:
    url = await fresh_store_url(backend, tmp_path)
    store = await Store.open(url)
    try:
        await store.rooms.upsert("!a:x", joined=True)
        await store.rooms.upsert("!b:x", joined=True)
        await store.state.set("management_room", "!a:x")
        await store.state.set("other", "!b:x")
        async with store.db.engine.begin() as conn:
            a = (
                await conn.execute(text("SELECT value FROM bridge_state WHERE key='other'"))
            ).scalar()
            await conn.execute(
                update(state).where(state.c.key == "management_room").values(value=a)
            )
            data = [r[0] for r in await conn.execute(text("SELECT data FROM rooms"))]
            await conn.execute(update(rooms).values(data=data[0]))
        with pytest.raises(StoreError, match="management_room"):
            await store.state.get("management_room")
        with pytest.raises(StoreError, match="room"):
            await store.rooms.known()
        async with store.db.engine.begin() as conn:
            await conn.execute(text("UPDATE bridge_state SET value='!plain:x' WHERE key='other'"))
        with pytest.raises(StoreError, match="plaintext"):
            await store.state.get("other")
    finally:
        await store.close()


# -- file modes: the SQLite database, its WAL and shared memory are the owner's only ------


def _mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o777


async def test_sqlite_files_are_created_0600_whatever_the_umask(tmp_path: Path) -> None:
    db = tmp_path / "data" / "bridge.db"
    old = os.umask(0)  # the process's umask would let anyone read new files
    try:
        store = await Store.open(
            f"sqlite+aiosqlite:///{db}", StoreSettings(keyring=Keyring.generate())
        )
        try:
            await flow(store)
            files = [p for p in db.parent.iterdir() if p.name.startswith("bridge.db")]
            assert {p.name for p in files} >= {"bridge.db", "bridge.db-wal", "bridge.db-shm"}
            assert {p.name: _mode(p) for p in files} == {p.name: 0o600 for p in files}
            assert _mode(db.parent) == 0o700
        finally:
            await store.close()
    finally:
        os.umask(old)


async def test_an_existing_sqlite_database_readable_by_others_is_made_0600(
    tmp_path: Path,
) -> None:
    db = tmp_path / "bridge.db"
    url = f"sqlite+aiosqlite:///{db}"
    keyring = Keyring.generate()
    store = await Store.open(url, StoreSettings(keyring=keyring))
    await flow(store)
    await store.close()
    os.chmod(db, 0o644)
    store = await Store.open(url, StoreSettings(keyring=keyring))
    try:
        await store.state.set("after", "reopen")
        assert _mode(db) == 0o600
        assert _mode(Path(f"{db}-wal")) == 0o600
    finally:
        await store.close()
