"""Archive retention, legal hold, summaries, counters, key re-wrap at start and checkpoint
notices, on real SQLite and PostgreSQL stores."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from bridge.archive.cli import main as audit_main
from bridge.archive.jobs import CheckpointPoster, checkpoint_notice
from bridge.archive.setup import open_store
from bridge.audit.chain import (
    GENESIS,
    ChainFields,
    ChainVerifier,
    record_hash,
    sign_checkpoint,
    verify_chain,
)
from bridge.audit.keyring import Keyring
from bridge.config import ConfigError, build_config, load_config
from bridge.store import AuditEntry, NewAction, Store, now_ms
from tests.conftest import BACKENDS, fresh_store_url


@dataclass
class Env:
    config_path: Path
    tmp: Path
    url: str
    holds: dict[str, list[str]]

    def write(self, holds: dict[str, list[str]] | None = None) -> None:
        cfg = {
            "appservice": {
                "as_token": "as-token-x-xxxxxxxxxxxxxxxxxxxxx",
                "hs_token": "hs-token-y-xxxxxxxxxxxxxxxxxxxxx",
            },
            "gate": {"token": "gate-token-x-xxxxxxxxxxxxxxxxxxx"},
            "data_dir": str(self.tmp / "data"),
            "database": {"url": self.url},
            "audit": {
                "keyring": str(self.tmp / "data" / "audit-keyring.json"),
                "signing_key": str(self.tmp / "keys" / "audit-signing.pem"),
                "checkpoint_every": 10,
                "legal_hold": holds if holds is not None else self.holds,
            },
        }
        self.config_path.write_text(json.dumps(cfg))

    async def open(self, holds: dict[str, list[str]] | None = None) -> Store:
        self.write(holds)
        return await open_store(load_config(self.config_path, env={}))

    async def cli(self, *args: str) -> int:
        return await asyncio.to_thread(
            audit_main, [args[0], "-c", str(self.config_path), *args[1:]]
        )

    async def scalar(self, statement: str, **params: Any) -> Any:
        engine = create_async_engine(self.url)
        try:
            async with engine.connect() as conn:
                return (await conn.execute(text(statement), params)).scalar()
        finally:
            await engine.dispose()

    async def sql(self, statement: str, **params: Any) -> None:
        engine = create_async_engine(self.url)
        try:
            async with engine.begin() as conn:
                await conn.execute(text(statement), params)
        finally:
            await engine.dispose()


@pytest.fixture(params=BACKENDS)
async def env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Env]:
    url = await fresh_store_url(request.param, tmp_path)
    e = Env(tmp_path / "config.yaml", tmp_path, url, {"rooms": [], "users": ["@held-user:x"]})
    e.write()
    yield e


_n = 0


def ev(room: str, sender: str = "@u:x", etype: str = "m.room.message") -> dict[str, Any]:
    global _n
    _n += 1
    return {
        "event_id": f"$ev{_n}-{os.getpid()}",
        "room_id": room,
        "sender": sender,
        "type": etype,
        "origin_server_ts": now_ms(),
        "content": {"msgtype": "m.text", "body": f"secret body {_n}"},
    }


async def readable(store: Store) -> dict[str, bool]:
    """event_id -> whether its content can still be read (expired records lose it)."""
    out: dict[str, bool] = {}
    async for rec in store.reader.iter(kind="event"):
        if rec["data"] is not None:
            out[rec["data"]["event_id"]] = True
    return out


async def events(store: Store) -> list[dict[str, Any]]:
    return [r async for r in store.reader.iter(kind="event")]


async def test_expiry_drops_old_ciphertext_honours_holds_and_keeps_the_chain(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    store = await env.open()
    try:
        old = [ev("!old:x") for _ in range(3)]
        held_room = [ev("!held:x") for _ in range(2)]
        held_user = [ev("!mixed:x", "@held-user:x") for _ in range(2)]
        mixed_old = [ev("!mixed:x") for _ in range(2)]
        await store.queue.ingest("a", old + held_room + held_user + mixed_old)
        assert (
            await store.holds.set("room", "!held:x", True, by="@admin:x", reason="case 42") == "on"
        )
        assert await store.holds.set("room", "!held:x", True, by="@admin:x") == "unchanged"
        await asyncio.sleep(0.02)
        boundary = now_ms()
        await asyncio.sleep(0.02)
        new = [ev("!new:x"), ev("!mixed:x")]
        await store.queue.ingest("b", new)

        report = await store.expiry.expire(1000, now=boundary + 1000)
        assert report.cutoff_ts == boundary
        assert report.rooms_shredded == 1  # !old:x: every record expired
        assert report.skipped_on_hold >= 4
        ids = await readable(store)
        for e in old + mixed_old:
            assert e["event_id"] not in ids
        for e in held_room + held_user + new:
            assert e["event_id"] in ids
        async for rec in store.reader.iter(room="!old:x", kind="event"):
            assert rec["data"] is None and "expired" in rec["unreadable"]
        # the removals are stated in the chain: the cutoff before, the destroyed key after
        [claim] = [r async for r in store.reader.iter(kind="expiry")]
        assert claim["origin_ts"] == boundary and claim["data"]["cutoff_ts"] == boundary
        [shred] = [r async for r in store.reader.iter(room="!old:x", kind="shred")]
        assert shred["seq"] > claim["seq"] > max(e["seq"] for e in await events(store))

        again = await store.expiry.expire(1000, now=boundary + 1000)  # resumes: nothing left
        assert (again.expired, again.skipped_on_hold, again.rooms_shredded) == (0, 0, 0)

        assert await store.holds.set("user", "@held-user:x", False, by="@admin:x") == "config"
        assert await store.holds.set("room", "!held:x", False, by="@admin:x") == "off"
        lifted = await store.expiry.expire(1000, now=boundary + 1000)
        assert lifted.expired >= 2
        ids = await readable(store)
        assert not any(e["event_id"] in ids for e in held_room)
        assert all(e["event_id"] in ids for e in held_user)
        runs = [r async for r in store.reader.iter(kind="retention")]
        assert len(runs) == 3
        assert runs[0]["data"]["expired"] == report.expired
        assert runs[0]["data"]["shredded_key_ids"] == [shred["data"]["destroyed_key_id"]]
        assert runs[0]["data"]["expiry_record_seq"] == claim["seq"]
        assert runs[1]["data"]["expiry_record_seq"] is None  # nothing to expire: no claim
        assert runs[0]["data"]["skipped_on_hold"] == report.skipped_on_hold
        holds = [r async for r in store.reader.iter(kind="hold")]
        # config on, room on (both old, expired once unheld), room off (recent)
        assert [h["data"] and h["data"]["action"] for h in holds] == [None, None, "off"]
    finally:
        await store.close()
    assert await env.cli("verify") == 0, capsys.readouterr().err
    assert "without ciphertext" in capsys.readouterr().out


async def test_a_hold_placed_during_an_expiry_run_applies_from_the_next_batch(
    env: Env, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    store = await env.open()
    other = await env.open()  # e.g. `!policy hold on` handled while the run goes on
    try:
        late = [ev("!late:x") for _ in range(6)]
        await store.queue.ingest("a", late)
        reads = 0
        holds = store.holds.current

        async def holds_then_hold_placed() -> Any:
            nonlocal reads
            reads += 1
            if reads == 2:  # the first batch is committed, the second not yet started
                assert await other.holds.set("room", "!late:x", True, by="@admin:x") == "on"
            return await holds()

        monkeypatch.setattr(store.holds, "current", holds_then_hold_placed)
        report = await store.expiry.expire(1000, now=now_ms() + 60_000, batch=2)
        assert reads > 2
        ids = await readable(store)
        first = await env.scalar("SELECT min(seq) FROM records WHERE kind = 'event'")
        # batch 1 (the config hold's record and the first event) expired before the hold
        assert first == 2 and report.expired == 2
        assert [e["event_id"] in ids for e in late] == [False] + [True] * 5
        assert report.skipped_on_hold == 5 and report.rooms_shredded == 0
    finally:
        await other.close()
        await store.close()
    assert await env.cli("verify") == 0, capsys.readouterr().err


async def test_verify_accepts_only_removals_the_chain_records(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    store = await env.open()
    try:
        await store.queue.ingest("a", [ev("!a:x") for _ in range(3)])
        await asyncio.sleep(0.01)
        boundary = now_ms()
        await asyncio.sleep(0.01)
        await store.queue.ingest("b", [ev("!b:x") for _ in range(3)])
        await store.expiry.expire(1000, now=boundary + 1000)
    finally:
        await store.close()
    assert await env.cli("verify") == 0, capsys.readouterr().err
    # a record archived after the cutoff loses its ciphertext: no expiry record covers it
    seq = await env.scalar(
        "SELECT min(seq) FROM records WHERE kind = 'event' AND ciphertext IS NOT NULL"
    )
    await env.sql("UPDATE records SET ciphertext = NULL WHERE seq = :s", s=seq)
    capsys.readouterr()
    assert await env.cli("verify") == 6
    err = capsys.readouterr().err
    assert f"first bad record: seq {seq} " in err and "ciphertext_removed" in err


async def test_expiry_from_before_removal_records_is_recorded_once_at_start(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    """A store whose expiry ran before this version: only its retention records say so."""
    store = await env.open()
    try:
        gone, kept = [ev("!gone:x") for _ in range(3)], [ev("!kept:x") for _ in range(2)]
        await store.queue.ingest("a", gone + kept)
        cutoff = now_ms() + 1
        await asyncio.sleep(0.01)
        await store.queue.ingest("b", [ev("!kept:x")])
    finally:
        await store.close()
    # what an expiry run did then: drop ciphertext, delete a room's key, one retention record
    await env.sql("UPDATE records SET ciphertext = NULL WHERE kind = 'event' AND ts < :c", c=cutoff)
    await env.sql(
        "DELETE FROM data_keys WHERE key_id = (SELECT key_id FROM records WHERE seq = 2)"
    )  # seq 1 is the config hold's record, 2..4 are !gone:x
    store = await open_store(load_config(env.config_path, env={}), create=False)
    try:
        await store.records.append(
            [
                AuditEntry(
                    "retention",
                    {"job": "archive_expiry", "cutoff_ts": cutoff, "rooms_shredded": 1},
                    type="archive_expiry",
                )
            ]
        )
    finally:
        await store.close()
    capsys.readouterr()
    assert await env.cli("verify") == 6
    err = capsys.readouterr().err
    assert "first bad record: seq 2 " in err and "start the bridge once" in err
    for _ in range(2):  # the bridge starts: the earlier removals are recorded, once
        store = await env.open()
        await store.close()
    assert await env.scalar("SELECT count(*) FROM records WHERE kind = 'expiry'") == 1
    assert await env.scalar("SELECT count(*) FROM records WHERE kind = 'shred'") == 1
    assert await env.cli("verify") == 0, capsys.readouterr().err
    store = await env.open()
    try:
        recs = [r async for r in store.reader.iter()]
        unreadable = {r["seq"]: r.get("unreadable") for r in recs if r["data"] is None}
        assert set(unreadable) == {2, 3, 4, 5, 6}
        [claim] = [r["data"] for r in recs if r["kind"] == "expiry"]
        assert claim["recorded_later"] is True and claim["cutoff_ts"] == cutoff
        [shred] = [r["data"]["destroyed_key_id"] for r in recs if r["kind"] == "shred"]
        assert claim["shredded_key_ids"] == [shred]
    finally:
        await store.close()


async def test_holds_are_encrypted_listed_and_follow_the_config(env: Env) -> None:
    secret_room = "!hiddenholdroom7731:corp.example"
    store = await env.open({"rooms": [secret_room], "users": ["@held-user:x"]})
    try:
        await store.holds.set("user", "@other:x", True, by="@admin:x", reason="litigation 7")
        holds = await store.holds.current()
        assert holds.rooms == {secret_room}
        assert holds.users == {"@held-user:x", "@other:x"}
        listed = {(h.scope, h.target): h for h in await store.holds.entries()}
        assert listed[("user", "@other:x")].reason == "litigation 7"
        assert listed[("user", "@other:x")].by == "@admin:x"
        assert listed[("room", secret_room)].source == "config"
        assert await store.holds.set("room", secret_room, False, by="@admin:x") == "config"
    finally:
        await store.close()
    blob = await env.scalar("SELECT count(*) FROM legal_holds")
    assert blob == 3
    if env.url.startswith("sqlite"):
        db = Path(env.url.split(":///", 1)[1])
        for f in (db, db.with_name(db.name + "-wal")):
            if f.exists():
                assert secret_room.encode() not in f.read_bytes()
                assert b"litigation 7" not in f.read_bytes()
    # the room left the config: its hold is lifted at the next start, and audited
    store = await env.open({"rooms": [], "users": ["@held-user:x"]})
    try:
        assert (await store.holds.current()).rooms == frozenset()
        offs = [
            r["data"] async for r in store.reader.iter(kind="hold") if r["data"]["action"] == "off"
        ]
        assert offs == [
            {
                "action": "off",
                "scope": "room",
                "target": secret_room,
                "by": "config",
                "reason": None,
                "source": "config",
            }
        ]
        # unchanged config: no new hold records
        before = len([r async for r in store.reader.iter(kind="hold")])
    finally:
        await store.close()
    store = await env.open({"rooms": [], "users": ["@held-user:x"]})
    try:
        assert len([r async for r in store.reader.iter(kind="hold")]) == before
    finally:
        await store.close()


async def test_search_summary_counts_without_content(env: Env) -> None:
    store = await env.open()
    try:
        evs = [ev("!a:x") for _ in range(4)] + [ev("!b:x", etype="m.reaction") for _ in range(2)]
        evs.append(ev("!b:x", sender="@v:x"))
        await store.queue.ingest("t", evs)
        s = await store.reader.search_summary(kind="event")
        assert s.total == 7
        groups = {(g.room_id, g.type): g.count for g in s.groups}
        assert groups == {
            ("!a:x", "m.room.message"): 4,
            ("!b:x", "m.reaction"): 2,
            ("!b:x", "m.room.message"): 1,
        }
        assert [m.event_id for m in s.latest] == [e["event_id"] for e in reversed(evs[-5:])]
        assert "secret body" not in repr(s)
        only = await store.reader.search_summary(sender="@v:x")
        assert only.total == 1 and only.latest[0].event_id == evs[-1]["event_id"]
        none = await store.reader.search_summary(room="!nowhere:x")
        assert none.total == 0 and none.groups == []
        hold = await store.reader.search_summary(kind="hold")
        assert hold.total == 1  # the config hold of @held-user:x
    finally:
        await store.close()


async def test_stats_keeps_counters_without_rescanning(env: Env) -> None:
    store = await env.open()
    try:
        await store.queue.ingest("t1", [ev("!a:x") for _ in range(5)])
        s1 = await store.stats.snapshot()
        assert s1.events == 5
        await store.queue.ingest("t2", [ev("!a:x") for _ in range(3)])
        await store.holds.set("room", "!a:x", True, by="@x:x")  # a non-event record
        assert store.records.events == 8  # kept up to date in memory, not re-counted
        s2 = await store.stats.snapshot()
        assert s2.events == 8 and s2.records == s1.records + 4
        await store.actions.enqueue([NewAction("send_notice", {"body": "x"}, room_id="!a:x")])
        assert (await store.stats.snapshot()).actions_pending == 1
    finally:
        await store.close()


async def test_start_rewraps_data_keys_left_under_an_old_kek(env: Env) -> None:
    store = await env.open()
    try:
        await store.queue.ingest("t", [ev("!a:x"), ev("!b:x")])
    finally:
        await store.close()
    path = env.tmp / "data" / "audit-keyring.json"
    ring = Keyring.load(path)
    old = ring.current.id
    new = ring.add_kek()  # what rotate-key does, while a bridge kept the old keyring
    ring.save(path)
    store = await env.open()
    try:
        usage = await store.keys.kek_usage()
        assert set(usage) == {new.id} and old not in usage
        assert len(await readable(store)) == 2
    finally:
        await store.close()


async def test_checkpoint_callback_sees_each_new_checkpoint(env: Env) -> None:
    store = await env.open()
    seen: list[int] = []
    store.records.on_checkpoint = lambda cp: seen.append(cp.seq)
    try:
        for i in range(3):
            await store.queue.ingest(f"t{i}", [ev("!a:x") for _ in range(6)])
    finally:
        await store.close()  # the shutdown checkpoint too
    stored = await env.scalar("SELECT count(*) FROM checkpoints")
    assert seen and len(seen) == stored and seen == sorted(seen)


async def test_last_checkpoint_time_is_known_after_signing_and_after_reopening(env: Env) -> None:
    """What the checkpoint-age metric reads."""
    store = await env.open()
    try:
        assert store.records.last_checkpoint_ts is None  # an empty store has none
        await store.queue.ingest("t", [ev("!a:x") for _ in range(12)])  # every 10
        signed = store.records.last_checkpoint_ts
        newest = await env.scalar("SELECT max(ts) FROM checkpoints")
        assert signed is not None and signed == newest
    finally:
        await store.close()
    reopened = await env.open()
    try:
        assert reopened.records.last_checkpoint_ts == await env.scalar(
            "SELECT max(ts) FROM checkpoints"
        )
    finally:
        await reopened.close()


async def test_checkpoint_poster_is_rate_limited() -> None:
    key = __import__(
        "cryptography.hazmat.primitives.asymmetric.ed25519", fromlist=["x"]
    ).Ed25519PrivateKey.generate()
    clock = [1000.0]
    sent: list[list[NewAction]] = []

    async def submit(actions: list[NewAction]) -> None:
        sent.append(actions)

    poster = CheckpointPoster(submit, lambda: "!mgmt:x", 600, clock=lambda: clock[0])
    poster(sign_checkpoint(key, 10, GENESIS, 1, 10))
    poster(sign_checkpoint(key, 20, GENESIS, 2, 20))  # within the interval: held back
    await asyncio.sleep(0)
    assert [a[0].payload["checkpoint"]["seq"] for a in sent] == [10]
    clock[0] += 599
    poster.tick()
    await asyncio.sleep(0)
    assert len(sent) == 1
    clock[0] += 2
    poster.tick()  # the newest held-back one goes out now
    poster.tick()
    await asyncio.sleep(0)
    assert [a[0].payload["checkpoint"]["seq"] for a in sent] == [10, 20]
    notice = sent[1][0]
    assert notice.room_id == "!mgmt:x" and notice.kind == "send_notice"
    assert GENESIS.hex() in notice.payload["body"]
    cp = sign_checkpoint(key, 5, GENESIS, 1, 5)
    assert cp.key_id in checkpoint_notice("!m:x", cp).payload["html"]


def test_legal_hold_config_is_validated() -> None:
    base = {
        "appservice": {
            "as_token": "a-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx" * 12,
            "hs_token": "b-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx" * 12,
        },
        "gate": {"token": "c-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx" * 12},
    }
    ok = build_config({**base, "audit": {"legal_hold": {"rooms": ["!r:x"], "users": ["@u:x"]}}})
    assert ok.audit is not None
    assert ok.audit.legal_hold_rooms == ("!r:x",) and ok.audit.legal_hold_users == ("@u:x",)
    assert ok.audit.post_checkpoints is True and ok.audit.checkpoint_post_interval_s == 3600
    with pytest.raises(ConfigError, match=r"audit\.legal_hold\.rooms"):
        build_config({**base, "audit": {"legal_hold": {"rooms": ["#alias:x"]}}})
    with pytest.raises(ConfigError, match=r"audit\.checkpoint_post_interval"):
        build_config({**base, "audit": {"checkpoint_post_interval": "5s"}})


def _chain(n: int) -> list[tuple[Any, ...]]:
    rows = []
    prev = GENESIS
    for seq in range(1, n + 1):
        ct = os.urandom(40)
        f = ChainFields(
            seq,
            seq,
            "event",
            None,
            b"r" * 16,
            b"s" * 16,
            None,
            "k1",
            b"n" * 12,
            __import__("hashlib").sha256(ct).digest(),
            seq,
        )
        prev = record_hash(prev, f)
        rows.append((*f, prev, ct))
    return rows


@pytest.mark.parametrize("attack", ["none", "hash", "ct", "delete", "swap", "dup"])
def test_feed_rows_reports_like_feed(attack: str) -> None:
    rows = _chain(60)
    if attack == "hash":
        rows[30] = (*rows[30][:11], b"\0" * 32, rows[30][12])
    elif attack == "ct":
        rows[12] = (*rows[12][:12], b"x" + rows[12][12][1:])
    elif attack == "delete":
        del rows[40]
    elif attack == "swap":
        rows[20], rows[21] = rows[21], rows[20]
    elif attack == "dup":
        rows.insert(10, rows[9])
    one = verify_chain([(ChainFields(*r[:11]), r[11], r[12]) for r in rows])
    batched = ChainVerifier()
    for i in range(0, len(rows), 7):
        if not batched.feed_rows(rows[i : i + 7]):
            break
    two = batched.finish()
    assert (one.ok, one.first_bad_seq, one.problem_kind, one.records_checked) == (
        two.ok,
        two.first_bad_seq,
        two.problem_kind,
        two.records_checked,
    )
    assert one.ok == (attack == "none")
