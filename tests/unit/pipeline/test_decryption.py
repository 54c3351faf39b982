"""Encrypted events on the processing path (real worker and store, a stand-in device):
decrypted records linked to the archived ciphertext, policies on the plaintext,
undecryptable ones recorded with the reason, kept across a restart, retried on late keys."""

from __future__ import annotations

import base64
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from bridge.app import build_registry
from bridge.e2ee.seam import Decrypted, DecryptResult, NotDecrypted, Trust, Undecryptable
from bridge.pipeline.worker import Worker
from bridge.store import Store, StoreUnavailable
from tests.kit.config import make_config
from tests.kit.services import Services

MGMT = "!mgmt:corp.example"
ROOM = "!secret:corp.example"
BOT = "@policybot:corp.example"


class FakeDevice:
    """A RoomCrypto whose room keys the test hands out: ciphertext = base64 of the body
    (opaque to DLP, like real ciphertext)."""

    device_id = "BOTDEVICE"

    def __init__(self) -> None:
        self.keys: set[str] = set()
        self.withheld: dict[str, str] = {}
        self.encrypted_rooms = {ROOM}
        self.unflushed = 0  # events decrypted since the last flush
        self.flush_fails = False

    async def decrypt(self, event: Mapping[str, Any], *, wait: float = 0.0) -> DecryptResult:
        content = event["content"]
        session = content["session_id"]
        if session in self.withheld:
            return NotDecrypted(Undecryptable.WITHHELD, session, self.withheld[session])
        if session not in self.keys:
            return NotDecrypted(Undecryptable.NO_SESSION, session)
        self.unflushed += 1
        plain = {k: event[k] for k in ("event_id", "room_id", "sender", "origin_server_ts")}
        plain["type"] = "m.room.message"
        body = base64.b64decode(content["ciphertext"]).decode()
        plain["content"] = {"msgtype": "m.text", "body": body}
        return Decrypted(plain, session, Trust.UNVERIFIED)

    async def encrypt(
        self, room_id: str, event_type: str, content: Mapping[str, Any]
    ) -> dict[str, Any]:
        return {"algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "x"}

    async def is_encrypted(self, room_id: str) -> bool:
        return room_id in self.encrypted_rooms

    def room_encrypted(self, room_id: str, members_changed: bool = False) -> None:
        self.encrypted_rooms.add(room_id)

    def withheld_code(self, room_id: str, session_id: str) -> str:
        return self.withheld.get(session_id, "")

    async def receive(self, payload: Mapping[str, Any]) -> bool:
        return False

    async def flush(self) -> None:
        if self.flush_fails:
            raise OSError("disk gone")
        self.unflushed = 0

    async def close(self) -> None:
        return None


def make_worker(store: Store, tmp_path: Path, max_pending: int = 100) -> Worker:
    config = make_config(
        {
            "homeserver": {"domain": "corp.example"},
            "e2ee": {"enabled": True, "key_wait_seconds": 0, "max_pending": max_pending},
            "dlp": {
                "keywords": [
                    {"name": "codename", "keywords": ["pelican"], "action": ["redact", "notify"]}
                ]
            },
        },
        base_dir=tmp_path,
    )
    services = Services(store, config, MGMT)
    w = Worker(store, lambda: config, lambda: services.policy.engine, build_registry(), services)
    w.tracker.joined_rooms = {MGMT, ROOM}
    return w


@pytest.fixture
async def worker(store: Store, tmp_path: Path) -> Worker:
    for room in (MGMT, ROOM):
        await store.rooms.upsert(room, joined=True)
    w = make_worker(store, tmp_path)
    w.decryption.crypto = FakeDevice()
    return w


_n = 0


def encrypted(body: str, session: str = "s1") -> dict[str, Any]:
    global _n
    _n += 1
    return {
        "event_id": f"$enc{_n}",
        "room_id": ROOM,
        "sender": "@alice:corp.example",
        "type": "m.room.encrypted",
        "origin_server_ts": 1_700_000_000_000,
        "content": {
            "algorithm": "m.megolm.v1.aes-sha2",
            "session_id": session,
            "ciphertext": base64.b64encode(body.encode()).decode(),
            "device_id": "ALICE",
            "sender_key": "k",
        },
    }


async def feed(worker: Worker, *events: dict[str, Any]) -> list[Any]:
    before = {a.id for a in await worker.store.actions.due(now=10**12, limit=10_000)}
    await worker.store.queue.ingest(f"t{time.time_ns()}", list(events))
    await worker.run_once()
    return [
        a for a in await worker.store.actions.due(now=10**12, limit=10_000) if a.id not in before
    ]


async def records(worker: Worker, kind: str) -> list[dict[str, Any]]:
    return [r async for r in worker.store.reader.iter(kind=kind)]


def device(worker: Worker) -> FakeDevice:
    crypto = worker.decryption.crypto
    assert isinstance(crypto, FakeDevice)
    return crypto


async def test_decrypted_event_is_archived_linked_and_judged(worker: Worker) -> None:
    device(worker).keys.add("s1")
    ev = encrypted("the pelican lands")
    acts = await feed(worker, ev)
    [rec] = await records(worker, "decrypted")
    assert rec["data"]["encrypted_event_id"] == ev["event_id"]
    assert rec["data"]["end_to_end_encrypted"] is True
    assert rec["data"]["event"]["content"]["body"] == "the pelican lands"
    assert rec["type"] == "m.room.message" and rec["room_id"] == ROOM
    [raw] = [r for r in await records(worker, "event") if r["event_id"] == ev["event_id"]]
    assert rec["data"]["encrypted_seq"] == raw["seq"] and raw["type"] == "m.room.encrypted"
    [redact] = [a for a in acts if a.kind == "redact"]
    assert redact.payload["event_id"] == ev["event_id"]
    assert any(a.kind == "send_notice" and a.room_id == MGMT for a in acts)


async def test_replay_protection_is_flushed_before_the_batch_commits(
    worker: Worker, store: Store
) -> None:
    dev = device(worker)
    dev.keys.add("s1")
    complete = store.queue.complete
    unflushed_at_commit: list[int] = []

    async def spy(*args: Any, **kwargs: Any) -> None:
        unflushed_at_commit.append(dev.unflushed)
        await complete(*args, **kwargs)

    store.queue.complete = spy  # type: ignore[method-assign]
    await feed(worker, encrypted("one"), encrypted("two"))
    assert unflushed_at_commit == [0]
    assert len(await records(worker, "decrypted")) == 2


async def test_a_failed_index_flush_leaves_the_batch_uncommitted(worker: Worker) -> None:
    dev = device(worker)
    dev.keys.add("s1")
    dev.flush_fails = True
    await worker.store.queue.ingest("t-flush", [encrypted("one")])
    with pytest.raises(StoreUnavailable):
        await worker.run_once()
    assert await records(worker, "decrypted") == []
    assert len(await worker.store.queue.pending(10)) == 1
    dev.flush_fails = False
    await worker.run_once()
    assert len(await records(worker, "decrypted")) == 1
    assert await worker.store.queue.pending(10) == []


async def test_undecryptable_is_recorded_kept_and_decrypted_when_the_key_arrives(
    worker: Worker, store: Store, tmp_path: Path
) -> None:
    ev = encrypted("pelican before its key", session="late")
    acts = await feed(worker, ev)
    assert not [a for a in acts if a.kind == "redact"]
    [rec] = await records(worker, "undecryptable")
    assert (
        rec["data"]["reason"] == "no_session"
        and rec["data"]["encrypted_event_id"] == ev["event_id"]
    )
    assert worker.decryption.counts() == {ROOM: 1}
    # a restart keeps it (sealed state, written with the transaction)
    again = make_worker(store, tmp_path)
    again.decryption.crypto = dev = FakeDevice()
    await again.load()
    assert again.decryption.counts() == {ROOM: 1}
    dev.keys.add("late")
    again.decryption.keys_arrived()
    before = {a.id for a in await store.actions.due(now=10**12, limit=10_000)}
    await again.run_once()
    acts = [a for a in await store.actions.due(now=10**12, limit=10_000) if a.id not in before]
    [dec] = await records(again, "decrypted")
    assert dec["data"]["late_key"] is True
    assert [a.payload["event_id"] for a in acts if a.kind == "redact"] == [ev["event_id"]]
    assert again.decryption.counts() == {}
    # nothing left to retry
    assert not again.decryption.retry_due()


async def test_withheld_key_is_recorded_with_its_code(worker: Worker) -> None:
    device(worker).withheld["w"] = "m.unverified"
    await feed(worker, encrypted("hidden", session="w"))
    [rec] = await records(worker, "undecryptable")
    assert rec["data"]["reason"] == "withheld" and rec["data"]["withheld_code"] == "m.unverified"


async def test_a_reason_that_changes_is_recorded_again(worker: Worker) -> None:
    await feed(worker, encrypted("x", session="c"))
    device(worker).withheld["c"] = "m.blacklisted"
    worker.decryption.keys_arrived()
    await worker.run_once()
    reasons = [r["data"]["reason"] for r in await records(worker, "undecryptable")]
    assert reasons == ["no_session", "withheld"]


async def test_the_oldest_pending_event_is_given_up_beyond_max_pending(
    store: Store, tmp_path: Path
) -> None:
    await store.rooms.upsert(ROOM, joined=True)
    w = make_worker(store, tmp_path, max_pending=2)
    w.decryption.crypto = FakeDevice()
    first = encrypted("a", session="n")
    await feed(w, first, encrypted("b", session="n"), encrypted("c", session="n"))
    assert w.decryption.counts() == {ROOM: 2}
    given_up = [r for r in await records(w, "undecryptable") if r["data"]["reason"] == "given_up"]
    assert [r["data"]["encrypted_event_id"] for r in given_up] == [first["event_id"]]


async def test_transparency_notice_when_the_bot_joins_an_encrypted_room(worker: Worker) -> None:
    join = {
        "event_id": "$join",
        "room_id": ROOM,
        "sender": BOT,
        "state_key": BOT,
        "type": "m.room.member",
        "origin_server_ts": 1,
        "content": {"membership": "join"},
        "unsigned": {"prev_content": {"membership": "invite"}},
    }
    acts = await feed(worker, join)
    [notice] = [a for a in acts if a.kind == "send_notice" and a.room_id == ROOM]
    assert "archived" in notice.payload["body"] and "BOTDEVICE" in notice.payload["body"]
    assert "before it joined cannot be read" in notice.payload["body"]


async def test_rooms_the_bot_is_not_in_are_recorded_not_waited_for_nor_kept(
    worker: Worker,
) -> None:
    device(worker).keys.add("s1")  # even a key it happens to hold is not used there
    ev = encrypted("elsewhere")
    ev["room_id"] = "!other:corp.example"
    await feed(worker, ev)
    [rec] = await records(worker, "undecryptable")
    assert rec["data"]["reason"] == "not_member"
    assert await records(worker, "decrypted") == []
    assert worker.decryption.counts() == {}


async def test_retroactive_scans_read_the_decrypted_copies(worker: Worker, store: Store) -> None:
    """A rule added with --retroactive finds a match in an encrypted message and redacts
    the encrypted event (the ciphertext alone would never match)."""
    from bridge.pipeline import retroactive
    from bridge.pipeline.live_policy import LivePolicy
    from bridge.policy.layers import GLOBAL

    device(worker).keys.add("s1")
    ev = encrypted("meet at the osprey nest")
    await feed(worker, ev)
    engine = LivePolicy(worker.config()).engine
    job = retroactive.RetroJob(
        scope=GLOBAL,
        rules=frozenset({"keyword:codename"}),
        since_ms=0,
        window_ms=0,
        requested_by="@boss:corp.example",
        command_room=MGMT,
        change="test",
    )
    result = await retroactive.scan_archive(store, engine, job, [ROOM])
    assert [m.event_id for m in result.matches] == []  # no codename word in it
    pelican = encrypted("pelican in the archive")
    await feed(worker, pelican)
    result = await retroactive.scan_archive(store, engine, job, [ROOM])
    assert [m.event_id for m in result.matches] == [pelican["event_id"]]


async def test_a_restart_does_not_turn_withheld_into_no_session(
    worker: Worker, store: Store, tmp_path: Path
) -> None:
    device(worker).withheld["w2"] = "m.unverified"
    await feed(worker, encrypted("x", session="w2"))
    again = make_worker(store, tmp_path)
    again.decryption.crypto = FakeDevice()  # forgot the withheld notice
    await again.load()
    again.decryption.keys_arrived()
    await again.run_once()
    reasons = [r["data"]["reason"] for r in await records(again, "undecryptable")]
    assert reasons == ["withheld"]
