"""The worker against a real store: commands, confirmations, policy on the ingest path."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from bridge import metrics
from bridge.app import build_registry
from bridge.pipeline.worker import Worker
from bridge.store import Store
from tests.kit.config import make_config
from tests.kit.services import Services

MGMT = "!mgmt:corp.example"
ROOM = "!room:corp.example"
ADMIN = "@boss:corp.example"


@pytest.fixture
async def worker(store: Store, tmp_path: Path) -> Worker:
    config = make_config(
        {
            "homeserver": {"domain": "corp.example"},
            "bridge": {"permissions": {ADMIN: "admin", "@eve:corp.example": "auditor"}},
            "dlp": {"keywords": [{"name": "secret", "keywords": ["bluefin"], "action": "redact"}]},
        },
        base_dir=tmp_path,
    )
    services = Services(store, config, MGMT)
    w = Worker(store, lambda: config, lambda: services.policy.engine, build_registry(), services)
    w.tracker.joined_rooms = {MGMT, ROOM}
    for room in (MGMT, ROOM):
        await store.rooms.upsert(room, joined=True)
    return w


_n = 0


def msg(body: str, sender: str = ADMIN, room: str = MGMT) -> dict[str, Any]:
    global _n
    _n += 1
    return {
        "event_id": f"$m{_n}",
        "room_id": room,
        "sender": sender,
        "type": "m.room.message",
        "origin_server_ts": 1,
        "content": {"msgtype": "m.text", "body": body},
    }


async def feed(worker: Worker, *events: dict[str, Any]) -> list[Any]:
    """Ingest events as one transaction, process them, return the new pending actions."""
    before = {a.id for a in await worker.store.actions.due(now=10**12, limit=10_000)}
    await worker.store.queue.ingest(f"t{time.time_ns()}", list(events))
    await worker.run_once()
    return [
        a for a in await worker.store.actions.due(now=10**12, limit=10_000) if a.id not in before
    ]


def notices(actions: list[Any]) -> list[str]:
    return [a.payload["body"] for a in actions if a.kind == "send_notice"]


async def test_commands_reply_in_thread_of_the_command(worker: Worker) -> None:
    cmd = msg("!policy status")
    [reply] = await feed(worker, cmd)
    assert reply.kind == "send_notice" and reply.room_id == MGMT
    assert reply.payload["reply_to"] == cmd["event_id"]
    assert "Policy bridge status" in reply.payload["body"]
    [record] = [r async for r in worker.store.reader.iter(kind="command")]
    assert record["sender"] == ADMIN and record["room_id"] == MGMT
    assert record["data"]["command"] == "status" and record["data"]["outcome"] == "ok"


async def test_strangers_and_wrong_roles_are_refused(worker: Worker) -> None:
    [r1] = notices(await feed(worker, msg("!policy status", sender="@nobody:evil.example")))
    assert "not allowed" in r1
    [r2] = notices(await feed(worker, msg("!policy dlp add-keyword x", sender="@eve:corp.example")))
    assert "needs the admin role" in r2
    assert worker.services.policy.runtime_dlp == {}


async def test_ingest_path_redacts_what_a_redact_rule_matches(worker: Worker) -> None:
    bad = msg("bluefin for lunch", sender="@joe:corp.example", room=ROOM)
    acts = await feed(worker, bad)
    [redact] = [a for a in acts if a.kind == "redact"]
    assert redact.payload["event_id"] == bad["event_id"] and redact.room_id == ROOM
    assert "keyword:secret" in redact.payload["reason"]


async def test_a_command_prefix_is_no_way_around_the_rules(worker: Worker) -> None:
    """`!policy bluefin …` in an ordinary room: refused as a command AND redacted."""
    bad = msg("!policy bluefin for lunch", sender="@joe:corp.example", room=ROOM)
    acts = await feed(worker, bad)
    assert any("not allowed" in n for n in notices(acts))
    [redact] = [a for a in acts if a.kind == "redact"]
    assert redact.payload["event_id"] == bad["event_id"]
    # In the management room (exempt from DLP) admins may quote the word in a command.
    acts = await feed(worker, msg("!policy dlp remove-keyword bluefin"))
    assert not [a for a in acts if a.kind == "redact"]


async def test_policy_change_applies_after_commit(worker: Worker) -> None:
    [reply] = notices(await feed(worker, msg('!policy dlp add-keyword "falcon x"')))
    assert "keyword added" in reply
    assert worker.services.policy.engine.check_event(
        msg("the FALCON  X plan", sender="@joe:corp.example", room=ROOM)
    ).blocked
    saved = json.loads(await worker.store.state.get("policy.dlp"))
    assert saved["global"]["keywords"][0]["keywords"] == ["falcon x"]


async def test_federation_change_needs_confirmation_by_reaction(worker: Worker) -> None:
    worker.services.rooms.note_member(ROOM, "@guest:other.example", "join")
    cmd = msg("!policy federation mode internal")
    [ask] = notices(await feed(worker, cmd))
    assert "would remove 1 member(s) from 1 room(s)" in ask and "other.example" in ask
    assert worker.services.policy.engine.federation_for(ROOM).mode.value == "open"

    def reaction(sender: str) -> dict[str, Any]:
        ev = msg("", sender=sender)
        ev["type"] = "m.reaction"
        ev["content"] = {
            "m.relates_to": {"rel_type": "m.annotation", "event_id": cmd["event_id"], "key": "✅️"}
        }
        return ev

    assert await feed(worker, reaction("@eve:corp.example")) == []  # not the one who asked
    # A restart between the question and the answer: the confirmation is kept.
    worker.commands.pending_confirmations = {}
    await worker.load()
    assert cmd["event_id"] in worker.commands.pending_confirmations
    acts = await feed(worker, reaction(ADMIN))
    assert any("federation mode set to internal" in b for b in notices(acts))
    assert any(a.kind == "reconcile" and a.room_id == ROOM for a in acts)
    assert worker.services.policy.engine.federation_for(ROOM).mode.value == "internal"


async def test_a_broken_event_does_not_block_the_queue(worker: Worker) -> None:
    weird = {"event_id": "$w", "type": "m.room.member", "room_id": ROOM, "state_key": 5}
    acts = await feed(worker, weird, msg("!policy help"))
    assert any("Commands" in b for b in notices(acts))
    assert (await worker.store.stats.snapshot()).queue_depth == 0


async def test_commands_take_several_actions_and_refuse_unknown_ones(worker: Worker) -> None:
    [ok] = notices(await feed(worker, msg("!policy dlp add-keyword osprey --action block,notify")))
    assert "keyword added (block+notify)" in ok
    verdict = worker.services.policy.engine.check_event(
        msg("an osprey overhead", sender="@joe:corp.example", room=ROOM)
    )
    [finding] = verdict.findings
    assert {a.value for a in finding.actions} == {"block", "notify"}
    [bad] = notices(await feed(worker, msg("!policy dlp add-keyword hawk --action block,shout")))
    assert "--action must be one or more of" in bad and "shout" in bad
    assert not worker.services.policy.engine.check_event(
        msg("a hawk", sender="@joe:corp.example", room=ROOM)
    ).findings


async def test_a_space_scoped_change_is_rolled_out_to_the_rooms_of_the_space(
    worker: Worker,
) -> None:
    space, outside = "!space:corp.example", "!outside:corp.example"
    for room in (space, outside):
        await worker.store.rooms.upsert(room, joined=True)
    worker.tracker.joined_rooms |= {space, outside}
    worker.services.policy.set_room_spaces({ROOM: (space,)})
    acts = await feed(worker, msg("!policy retention set 30d --scope here --yes", room=space))
    assert any("and the rooms of this space" in b for b in notices(acts))
    assert {a.room_id for a in acts if a.kind == "reconcile"} == {space, ROOM}
    assert worker.services.policy.engine.retention_for(ROOM).max_lifetime_ms == 30 * 86_400_000
    assert worker.services.policy.engine.retention_for(outside).max_lifetime_ms is None


# -- unreadable records, metrics ---------------------------------------------------------


async def _damage(store: Store, event_id: str, how: str) -> int:
    """Make the archived record of ``event_id`` unreadable; returns its seq."""
    from sqlalchemy import select, update

    from bridge.store.schema import records

    idx = store.keys.blind("event_id", event_id)
    async with store.db.engine.begin() as conn:
        seq, ct = (
            await conn.execute(
                select(records.c.seq, records.c.ciphertext).where(records.c.event_id_idx == idx)
            )
        ).one()
        if how == "gone":  # expired by archive retention, or its room key destroyed
            value = None
        else:  # altered: fails to authenticate
            value = bytes([ct[0] ^ 1]) + bytes(ct[1:])
        await conn.execute(update(records).where(records.c.seq == seq).values(ciphertext=value))
    return int(seq)


@pytest.mark.parametrize("how", ["gone", "altered"])
async def test_an_unreadable_record_is_skipped_and_reported_not_fatal(
    worker: Worker, how: str
) -> None:
    lost = msg("the unreadable one", sender="@joe:corp.example", room=ROOM)
    bad = msg("bluefin for lunch", sender="@joe:corp.example", room=ROOM)
    cmd = msg("!policy help")
    await worker.store.queue.ingest("t-damaged", [lost, bad, cmd])
    seq = await _damage(worker.store, lost["event_id"], how)
    worker.store.queue.forget_hand_off()  # as after a restart: read back from the store
    counted = metrics.REGISTRY.get_sample_value("bridge_worker_unreadable_events_total") or 0
    assert await worker.run_once() == 1  # no StoreError: the worker (and the bridge) lives on
    acts = await worker.store.actions.due(now=10**12, limit=10_000)
    # the transaction's other events were processed
    assert [a.payload["event_id"] for a in acts if a.kind == "redact"] == [bad["event_id"]]
    assert any("Commands" in b for b in notices(acts))
    # one notice to the management room naming the record, nothing of its content
    [warning] = [
        a for a in acts if a.kind == "send_notice" and "could not be read" in a.payload["body"]
    ]
    assert warning.room_id == MGMT and f"seq {seq}" in warning.payload["body"]
    assert "unreadable one" not in warning.payload["body"]
    [error] = [r async for r in worker.store.reader.iter(kind="error")]
    assert error["data"]["seq"] == seq and error["data"]["error"] == "unreadable"
    assert "unreadable one" not in json.dumps(error["data"])
    # the queue entry completed: a restart does not meet the record again
    assert (await worker.store.stats.snapshot()).queue_depth == 0
    assert await worker.store.queue.pending() == []
    assert await worker.run_once() == 0
    assert metrics.REGISTRY.get_sample_value("bridge_worker_unreadable_events_total") == (
        counted + 1
    )


async def test_dlp_findings_on_the_ingest_path_are_counted(worker: Worker) -> None:
    def hits() -> float:
        value = metrics.REGISTRY.get_sample_value(
            "bridge_dlp_hits_total", {"rule": "keyword:secret", "path": "ingest"}
        )
        return value or 0.0

    before = hits()
    await feed(worker, msg("bluefin for lunch", sender="@joe:corp.example", room=ROOM))
    assert hits() == before + 1
    await feed(worker, msg("salmon for lunch", sender="@joe:corp.example", room=ROOM))
    assert hits() == before + 1


async def test_a_stale_retention_limit_where_retention_is_off_is_restored_to_none(
    worker: Worker,
) -> None:
    def retention(content: dict[str, Any]) -> dict[str, Any]:
        ev = msg("", sender="@joe:corp.example", room=ROOM)
        ev.update(type="m.room.retention", state_key="", content=content)
        return ev

    [ok] = notices(await feed(worker, msg("!policy retention off --scope here", room=ROOM)))
    assert "retention off" in ok
    # someone puts the old limit back: the room must show the policy (none) again
    acts = await feed(worker, retention({"max_lifetime": 86_400_000}))
    assert [a.room_id for a in acts if a.kind == "reconcile"] == [ROOM]
    assert any("changed m.room.retention" in b for b in notices(acts))
    # an empty retention state is what the policy wants: nothing to do
    assert await feed(worker, retention({})) == []


async def test_a_crash_before_the_commit_redoes_the_work_exactly_once(
    worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker dies between judging a transaction and committing what it produced (the
    process is killed): nothing of it is kept, and the next run produces it once."""
    bad = msg("bluefin again", sender="@joe:corp.example", room=ROOM)
    cmd = msg("!policy status")
    before = {a.id for a in await worker.store.actions.due(now=10**12, limit=10_000)}
    await worker.store.queue.ingest("crash-txn", [bad, cmd])

    real_complete = worker.store.queue.complete

    async def killed(*_a: object, **_k: object) -> None:
        raise SystemExit("killed before the commit")

    monkeypatch.setattr(worker.store.queue, "complete", killed)
    with pytest.raises(SystemExit):
        await worker.run_once()
    new = [
        a for a in await worker.store.actions.due(now=10**12, limit=10_000) if a.id not in before
    ]
    assert new == []  # nothing half-done

    monkeypatch.setattr(worker.store.queue, "complete", real_complete)
    assert await worker.run_once() == 1
    assert await worker.run_once() == 0  # done, not redone
    new = [
        a for a in await worker.store.actions.due(now=10**12, limit=10_000) if a.id not in before
    ]
    redactions = [a for a in new if a.kind == "redact"]
    replies = [
        a for a in new if a.kind == "send_notice" and a.payload.get("reply_to") == cmd["event_id"]
    ]
    assert [r.payload["event_id"] for r in redactions] == [bad["event_id"]]
    assert len(replies) == 1
    commands = [r async for r in worker.store.reader.iter(kind="command")]
    assert len([c for c in commands if c["data"]["command"] == "status"]) == 1
