"""`--retroactive` scans, encryption on the ingest path and DLP commands, on a real store."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from bridge.app import build_registry
from bridge.pipeline import retroactive
from bridge.pipeline.worker import Worker
from bridge.policy.layers import GLOBAL
from bridge.store import NewAction, Store
from tests.kit import config as kit
from tests.kit.services import Services

MGMT = "!mgmt:corp.example"
ROOM = "!room:corp.example"
SPACE = "!space:corp.example"
CHILD = "!child:corp.example"
UNMANAGED = "!elsewhere:corp.example"
ADMIN = "@boss:corp.example"
JOE = "@joe:corp.example"
DAY = 86_400_000


class Executor:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def submit(self, actions: list[NewAction]) -> None:
        await self.store.actions.enqueue(actions)


def make_config(tmp_path: Path, dlp: dict[str, Any] | None = None) -> Any:
    return kit.make_config(
        {
            "homeserver": {"domain": "corp.example"},
            "bridge": {"permissions": {ADMIN: "admin"}},
            "dlp": dlp or {},
        },
        base_dir=tmp_path,
    )


async def make_worker(store: Store, config: Any) -> Worker:
    services = Services(store, config, MGMT)
    services.executor = Executor(store)  # type: ignore[attr-defined]
    w = Worker(store, lambda: config, lambda: services.policy.engine, build_registry(), services)
    w.tracker.joined_rooms = {MGMT, ROOM, CHILD}
    for room in (MGMT, ROOM, CHILD):
        await store.rooms.upsert(room, joined=True)
    return w


_n = 0


def msg(body: str, sender: str = JOE, room: str = ROOM, age_ms: int = 0) -> dict[str, Any]:
    global _n
    _n += 1
    return {
        "event_id": f"$r{_n}",
        "room_id": room,
        "sender": sender,
        "type": "m.room.message",
        "origin_server_ts": int(time.time() * 1000) - age_ms,
        "content": {"msgtype": "m.text", "body": body},
    }


async def feed(worker: Worker, *events: dict[str, Any]) -> list[Any]:
    before = {a.id for a in await worker.store.actions.due(now=10**12, limit=10_000)}
    await worker.store.queue.ingest(f"t{time.time_ns()}", list(events))
    await worker.run_once()
    return [
        a for a in await worker.store.actions.due(now=10**12, limit=10_000) if a.id not in before
    ]


async def new_actions(worker: Worker, before: set[str]) -> list[Any]:
    return [
        a for a in await worker.store.actions.due(now=10**12, limit=10_000) if a.id not in before
    ]


async def test_retroactive_keyword_redacts_archived_matches_only(
    store: Store, tmp_path: Path
) -> None:
    worker = await make_worker(store, make_config(tmp_path))
    # A word added earlier without --retroactive must not be swept up by a later scan.
    await feed(worker, msg("!policy dlp add-keyword tuna", sender=ADMIN, room=MGMT))
    old = msg("bluefin at noon")
    too_old = msg("bluefin last quarter", age_ms=40 * DAY)
    elsewhere = msg("bluefin there", room=UNMANAGED)
    gone = msg("bluefin again")
    redaction = {
        "event_id": "$redaction",
        "room_id": ROOM,
        "sender": "@policybot:corp.example",
        "type": "m.room.redaction",
        "origin_server_ts": int(time.time() * 1000),
        "content": {"redacts": gone["event_id"]},
    }
    tuna = msg("tuna sandwich")
    await feed(worker, old, too_old, elsewhere, gone, redaction, msg("salmon"))
    # `tuna` arrives later and passes the gate in this test (no gate here): the ingest path
    # redacts it on its own; the scan below must not add a second redaction.
    await store.queue.ingest("raw", [tuna])  # archived, not yet processed
    before = {a.id for a in await store.actions.due(now=10**12, limit=10_000)}
    acts = await feed(
        worker, msg("!policy dlp add-keyword bluefin --retroactive", sender=ADMIN, room=MGMT)
    )
    [reply] = [a for a in acts if a.kind == "send_notice"]
    assert "keyword added" in reply.payload["body"]
    assert "Scanning the archive of the last 30d" in reply.payload["body"]
    await worker.services.scheduler.wait(retroactive.TASK_NAME)
    acts = await new_actions(worker, before)
    redacts = [a for a in acts if a.kind == "redact"]
    targets = {a.payload["event_id"] for a in redacts}
    # the tuna event was processed by the worker run (block → redact), not by the scan
    assert old["event_id"] in targets
    assert not targets & {too_old["event_id"], elsewhere["event_id"], gone["event_id"]}
    assert all(
        "applied retroactively" in a.payload["reason"]
        for a in redacts
        if a.payload["event_id"] == old["event_id"]
    )
    summaries = [
        a for a in acts if a.kind == "send_notice" and "Retroactive scan" in a.payload["body"]
    ]
    [summary] = summaries
    assert summary.room_id == MGMT
    assert "1 match(es), 1 queued for redaction, 1 already redacted" in summary.payload["body"]
    assert JOE in summary.payload["body"]
    [record] = [r async for r in store.reader.iter(kind="retroactive")]
    assert record["data"]["redactions"] == [old["event_id"]]
    assert record["data"]["rules"] == ["keyword:admin-block"]
    assert record["sender"] == ADMIN


async def test_retroactive_regex_in_a_space_scope_and_window_flag(
    store: Store, tmp_path: Path
) -> None:
    worker = await make_worker(store, make_config(tmp_path, {"retroactive_window": "7d"}))
    worker.services.policy.set_room_spaces({CHILD: (SPACE,)})
    in_child = msg("ticket SEC-12345 leaked", room=CHILD)
    in_room = msg("ticket SEC-99999 elsewhere", room=ROOM)
    week_old = msg("ticket SEC-55555", room=CHILD, age_ms=8 * DAY)
    await feed(worker, in_child, in_room, week_old)
    before = {a.id for a in await store.actions.due(now=10**12, limit=10_000)}
    acts = await feed(
        worker,
        msg(
            "!policy dlp add-regex tickets SEC-[0-9]{4,} --action redact --scope here"
            " --retroactive --window 10d",
            sender=ADMIN,
            room=SPACE,
        ),
    )
    # The bot does not answer in rooms it has not joined: join the space first.
    assert not acts
    worker.tracker.joined_rooms.add(SPACE)
    acts = await feed(
        worker,
        msg(
            "!policy dlp add-regex tickets SEC-[0-9]{4,} --action redact --scope here"
            " --retroactive --window 10d",
            sender=ADMIN,
            room=SPACE,
        ),
    )
    [reply] = [a for a in acts if a.kind == "send_notice"]
    assert "in !space:corp.example and the rooms of this space" in reply.payload["body"]
    assert "last 10d" in reply.payload["body"]
    await worker.services.scheduler.wait(retroactive.TASK_NAME)
    acts = await new_actions(worker, before)
    targets = {a.payload["event_id"] for a in acts if a.kind == "redact"}
    assert targets == {in_child["event_id"], week_old["event_id"]}
    notes = [a for a in acts if a.kind == "send_notice" and "Retroactive" in a.payload["body"]]
    assert {a.room_id for a in notes} == {MGMT, SPACE}


async def test_retroactive_needs_a_valid_window_and_an_enable(store: Store, tmp_path: Path) -> None:
    worker = await make_worker(store, make_config(tmp_path))
    [r1] = await feed(worker, msg("!policy dlp add-keyword x --window 3d", sender=ADMIN, room=MGMT))
    assert "--window only makes sense with --retroactive" in r1.payload["body"]
    [r2] = await feed(
        worker,
        msg("!policy dlp add-keyword x --retroactive --window 3 months", sender=ADMIN, room=MGMT),
    )
    assert "⚠️" in r2.payload["body"]
    [r3] = await feed(
        worker, msg("!policy dlp detectors disable card --retroactive", sender=ADMIN, room=MGMT)
    )
    assert "only applies when enabling" in r3.payload["body"]
    assert worker.services.policy.runtime_dlp == {}


async def test_rooms_in_scope() -> None:
    managed = [MGMT, ROOM, CHILD, "!c2:x"]
    spaces = {CHILD: (SPACE,), "!c2:x": (SPACE,), "!unmanaged:x": (SPACE,)}
    assert retroactive.rooms_in_scope(GLOBAL, managed, spaces, MGMT) == sorted(
        [ROOM, CHILD, "!c2:x"]
    )
    assert retroactive.rooms_in_scope(SPACE, managed, spaces, MGMT) == [SPACE, "!c2:x", CHILD]
    assert retroactive.rooms_in_scope(ROOM, managed, spaces, MGMT) == [ROOM]


async def test_encryption_on_the_ingest_path_is_reported_not_redacted(
    store: Store, tmp_path: Path
) -> None:
    worker = await make_worker(store, make_config(tmp_path, {"forbid_encryption": True}))
    acts = await feed(
        worker,
        {
            "event_id": "$enc",
            "room_id": ROOM,
            "sender": JOE,
            "type": "m.room.encryption",
            "state_key": "",
            "origin_server_ts": 1,
            "content": {"algorithm": "m.megolm.v1.aes-sha2"},
        },
    )
    assert not [a for a in acts if a.kind == "redact"]
    [note] = [a for a in acts if a.kind == "send_notice"]
    assert note.room_id == MGMT
    assert "turned on end-to-end encryption in !room:corp.example" in note.payload["body"]
    assert JOE in note.payload["body"] and "cannot be turned off" in note.payload["body"]
    [decision] = [r async for r in store.reader.iter(kind="decision")]
    assert decision["data"]["actions"] == ["notify"]


async def test_encryption_command_and_list(store: Store, tmp_path: Path) -> None:
    worker = await make_worker(store, make_config(tmp_path))
    [r1] = await feed(
        worker, msg("!policy dlp encryption forbid --scope here", sender=ADMIN, room=ROOM)
    )
    assert "forbidden in !room:corp.example" in r1.payload["body"]
    engine = worker.services.policy.engine
    assert engine.encryption_forbidden(ROOM) and not engine.encryption_forbidden(CHILD)
    [r2] = await feed(worker, msg("!policy dlp list --scope here", sender=ADMIN, room=ROOM))
    assert "end-to-end encryption: forbidden" in r2.payload["body"]
    [r3] = await feed(
        worker, msg("!policy dlp encryption inherit --scope here", sender=ADMIN, room=ROOM)
    )
    assert "wider scope decides" in r3.payload["body"]
    assert not worker.services.policy.engine.encryption_forbidden(ROOM)


@pytest.mark.parametrize("scope", ["global", "here"])
async def test_list_shows_space_rules_in_a_child(store: Store, tmp_path: Path, scope: str) -> None:
    worker = await make_worker(
        store,
        make_config(tmp_path, {"spaces": {SPACE: {"detectors": {"iban": "notify"}}}}),
    )
    worker.services.policy.set_room_spaces({CHILD: (SPACE,)})
    [reply] = await feed(worker, msg(f"!policy dlp list --scope {scope}", sender=ADMIN, room=CHILD))
    # outside the management room: counts only (bridge.commands.disclosure)
    assert ("1 detector" in reply.payload["body"]) == (scope == "here")
    assert "iban" not in reply.payload["body"]


async def test_a_scan_interrupted_by_a_restart_runs_again(store: Store, tmp_path: Path) -> None:
    worker = await make_worker(store, make_config(tmp_path))
    old = msg("bluefin at noon")
    await feed(worker, old)
    # The bridge stopped after the command committed but before its scan finished: the job
    # is recorded as pending in the store (as `start` records it before scanning).
    await feed(worker, msg("!policy dlp add-keyword bluefin", sender=ADMIN, room=MGMT))
    job = retroactive.RetroJob(
        scope=retroactive.GLOBAL,
        rules=frozenset({"keyword:admin-block"}),
        since_ms=int(time.time() * 1000) - DAY,
        window_ms=DAY,
        requested_by=ADMIN,
        command_room=MGMT,
        change="keyword 'bluefin' (keyword:admin-block)",
        probe_word="bluefin",
    )
    assert retroactive.RetroJob.from_json(job.to_json()).to_json() == job.to_json()
    await store.state.set(retroactive.PENDING_KEY, json.dumps([job.to_json()]))
    before = {a.id for a in await store.actions.due(now=10**12, limit=10_000)}
    # Start after the "restart": the pending scan runs again, then is cleared.
    assert await retroactive.resume(worker.services) == 1
    await worker.services.scheduler.wait(retroactive.TASK_NAME)
    redacts = [a for a in await new_actions(worker, before) if a.kind == "redact"]
    assert [a.payload["event_id"] for a in redacts] == [old["event_id"]]
    assert json.loads(await store.state.get(retroactive.PENDING_KEY) or "[]") == []
    assert await retroactive.resume(worker.services) == 0
