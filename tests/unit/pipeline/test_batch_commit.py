"""One commit per transaction: room rows, space links and confirmations are written with
the batch that marks the transaction processed, and remembered only once it is committed.

A commit that fails (a database error inside the transaction) leaves the store and the
worker's memory as they were; the transaction is processed again and acts once.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from bridge.app import build_registry
from bridge.pipeline.actions import ActionKind, leave
from bridge.pipeline.batch import Batch
from bridge.pipeline.command_runner import CONFIRMATIONS_KEY
from bridge.pipeline.enforcement import DRIFTED
from bridge.pipeline.live_policy import SPACES_KEY, stored_room_spaces
from bridge.pipeline.worker import Worker
from bridge.store import ActionRow, NewAction, Store, StoreUnavailable
from tests.kit.config import make_config
from tests.kit.services import Services

OWN = "corp.example"
MGMT = f"!mgmt:{OWN}"
ROOM = f"!room:{OWN}"
NEW = f"!new:{OWN}"
SPACE = f"!space:{OWN}"
ADMIN = f"@boss:{OWN}"


@pytest.fixture
async def worker(store: Store, tmp_path: Path) -> Worker:
    config = make_config(
        {
            "homeserver": {"domain": OWN},
            "bridge": {"permissions": {ADMIN: "admin"}},
            "federation": {"mode": "allowlist", "servers": ["partner.example"]},
        },
        base_dir=tmp_path,
    )
    services = Services(store, config, MGMT, own_server=OWN)
    w = Worker(store, lambda: config, lambda: services.policy.engine, build_registry(), services)
    for room in (MGMT, ROOM):
        await store.rooms.upsert(room, joined=True)
    await w.load()
    return w


_n = 0


def event(
    room: str, sender: str, etype: str, content: dict[str, Any], **extra: Any
) -> dict[str, Any]:
    global _n
    _n += 1
    return {
        "event_id": f"$b{_n}",
        "room_id": room,
        "sender": sender,
        "type": etype,
        "origin_server_ts": 1,
        "content": content,
        **extra,
    }


def member(room: str, user: str, membership: str) -> dict[str, Any]:
    return event(room, user, "m.room.member", {"membership": membership}, state_key=user)


def bot(worker: Worker) -> str:
    return worker.config().bot_mxid


async def rooms(store: Store) -> dict[str, dict[str, Any]]:
    return {r["room_id"]: r for r in await store.rooms.known()}


async def pending(store: Store) -> list[ActionRow]:
    return await store.actions.due(now=10**12, limit=10_000)


async def fail_next_commit(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """The next batch commit fails inside its database transaction: it carries an action
    whose ID is taken (a constraint violation, after the room rows were written)."""
    taken = leave("!elsewhere:x")
    await store.actions.enqueue([taken])
    real = store.queue.complete

    async def failing(queue_ids: Any, new_actions: Any = (), *args: Any, **kwargs: Any) -> None:
        monkeypatch.setattr(store.queue, "complete", real)  # only this once
        clash = NewAction(taken.kind, {}, room_id="!elsewhere:x", id=taken.id)
        await real(queue_ids, [*new_actions, clash], *args, **kwargs)

    monkeypatch.setattr(store.queue, "complete", failing)


async def process_failing_then_again(
    worker: Worker, monkeypatch: pytest.MonkeyPatch, *events: dict[str, Any]
) -> list[ActionRow]:
    """Ingest ``events`` as one transaction whose processing's commit fails; the actions
    queued by it (none are expected)."""
    before = {a.id for a in await pending(worker.store)}
    await worker.store.queue.ingest(f"t{time.time_ns()}", list(events))
    await fail_next_commit(worker.store, monkeypatch)
    before |= {a.id for a in await pending(worker.store)}
    with pytest.raises(StoreUnavailable):
        await worker.run_once()
    failed = [a for a in await pending(worker.store) if a.id not in before]
    return failed


async def rerun(worker: Worker, before: set[str]) -> list[ActionRow]:
    assert await worker.run_once() == 1
    assert await worker.run_once() == 0  # done, not redone
    return [a for a in await pending(worker.store) if a.id not in before]


async def test_a_failed_commit_leaves_a_join_unrecorded_and_the_rerun_records_it_once(
    worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = {a.id for a in await pending(worker.store)}
    failed = await process_failing_then_again(worker, monkeypatch, member(NEW, bot(worker), "join"))
    assert failed == []
    assert NEW not in await rooms(worker.store)  # no room row outside the batch's commit
    assert not worker.tracker.joined(NEW)  # nor in memory
    before |= {a.id for a in await pending(worker.store)}

    new = await rerun(worker, before)
    assert (await rooms(worker.store))[NEW]["joined"] is True
    assert worker.tracker.joined(NEW)
    reconciles = [a for a in new if a.kind == ActionKind.RECONCILE]
    assert [(a.room_id, a.payload["reason"]) for a in reconciles] == [(NEW, "bot joined")]


async def test_a_failed_commit_leaves_a_leave_unrecorded(
    worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = {a.id for a in await pending(worker.store)}
    await process_failing_then_again(worker, monkeypatch, member(ROOM, bot(worker), "leave"))
    assert (await rooms(worker.store))[ROOM]["joined"] is True
    assert worker.tracker.joined(ROOM)
    before |= {a.id for a in await pending(worker.store)}

    await rerun(worker, before)
    assert (await rooms(worker.store))[ROOM]["joined"] is False
    assert not worker.tracker.joined(ROOM)


async def test_a_failed_commit_leaves_drift_unrecorded_and_the_rerun_restores_once(
    worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened = event(ROOM, "@joe:corp.example", "m.room.server_acl", {"allow": ["*"]}, state_key="")
    before = {a.id for a in await pending(worker.store)}
    await process_failing_then_again(worker, monkeypatch, opened)
    assert (await rooms(worker.store))[ROOM]["lacking"] == ""
    before |= {a.id for a in await pending(worker.store)}

    new = await rerun(worker, before)
    assert (await rooms(worker.store))[ROOM]["lacking"] == DRIFTED
    assert [a.room_id for a in new if a.kind == ActionKind.RECONCILE] == [ROOM]
    assert len([a for a in new if "changed m.room.server_acl" in a.payload.get("body", "")]) == 1


async def test_later_events_see_the_rooms_as_earlier_events_of_the_transaction_left_them(
    worker: Worker,
) -> None:
    """The bot joins, then an excluded server's user joins, in one transaction: the
    second event knows the bot is in the room although nothing is committed yet."""
    before = {a.id for a in await pending(worker.store)}
    await worker.store.queue.ingest(
        "t-together",
        [
            member(NEW, bot(worker), "join"),
            member(NEW, bot(worker), "join"),  # a profile change: no second reconcile
            member(NEW, "@spy:evil.example", "join"),
        ],
    )
    new = await rerun(worker, before)
    assert [a.payload["reason"] for a in new if a.kind == ActionKind.RECONCILE] == [
        "bot joined",
        "excluded member @spy:evil.example",
    ]
    assert worker.services.rooms.members[NEW] == {"@spy:evil.example": "join"}


async def test_space_links_of_one_transaction_are_all_kept(worker: Worker) -> None:
    """A space adds two rooms at once: both links count (the second must not be judged
    against the links as they were before the first)."""
    await worker.store.rooms.upsert(NEW, joined=True)
    await worker.load()
    before = {a.id for a in await pending(worker.store)}
    children = [
        event(SPACE, ADMIN, "m.space.child", {"via": [OWN]}, state_key=child)
        for child in (ROOM, NEW)
    ]
    await worker.store.queue.ingest("t-space", children)
    new = await rerun(worker, before)
    expected = {ROOM: (SPACE,), NEW: (SPACE,)}
    assert worker.services.policy.room_spaces == expected
    assert stored_room_spaces(await worker.store.state.get(SPACES_KEY)) == expected
    assert sorted(a.room_id or "" for a in new if a.kind == ActionKind.RECONCILE) == [NEW, ROOM]


async def test_a_failed_commit_keeps_space_links_unchanged(
    worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    link = event(SPACE, ADMIN, "m.space.child", {"via": [OWN]}, state_key=ROOM)
    before = {a.id for a in await pending(worker.store)}
    await process_failing_then_again(worker, monkeypatch, link)
    assert worker.services.policy.room_spaces == {}
    assert await worker.store.state.get(SPACES_KEY) is None
    before |= {a.id for a in await pending(worker.store)}
    await rerun(worker, before)
    assert worker.services.policy.room_spaces == {ROOM: (SPACE,)}


async def test_a_confirmation_whose_commit_failed_still_confirms_on_the_rerun(
    worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker.services.rooms.note_member(ROOM, "@p:partner.example", "join")
    cmd = event(
        MGMT,
        ADMIN,
        "m.room.message",
        {"msgtype": "m.text", "body": "!policy federation mode internal"},
    )
    before = {a.id for a in await pending(worker.store)}
    await worker.store.queue.ingest("t-ask", [cmd])
    asked = await rerun(worker, before)
    assert any("would remove 1 member(s)" in a.payload["body"] for a in asked)
    assert cmd["event_id"] in worker.commands.pending_confirmations
    reaction = event(
        MGMT,
        ADMIN,
        "m.reaction",
        {"m.relates_to": {"rel_type": "m.annotation", "event_id": cmd["event_id"], "key": "✅"}},
    )
    before = {a.id for a in await pending(worker.store)}
    await process_failing_then_again(worker, monkeypatch, reaction)
    # still open, in memory and in the store
    assert cmd["event_id"] in worker.commands.pending_confirmations
    stored = json.loads(await worker.store.state.get(CONFIRMATIONS_KEY) or "{}")
    assert cmd["event_id"] in stored
    assert worker.services.policy.engine.federation_for(ROOM).mode.value == "allowlist"
    before |= {a.id for a in await pending(worker.store)}

    new = await rerun(worker, before)
    done = [a for a in new if "federation mode set to internal" in a.payload.get("body", "")]
    assert len(done) == 1
    assert worker.services.policy.engine.federation_for(ROOM).mode.value == "internal"
    assert worker.commands.pending_confirmations == {}
    assert json.loads(await worker.store.state.get(CONFIRMATIONS_KEY) or "{}") == {}


def test_a_batch_merges_the_changes_to_one_room() -> None:
    batch = Batch()
    batch.stage_room(ROOM, joined=True)
    batch.stage_room(ROOM, lacking=DRIFTED)
    batch.stage_room(NEW, lacking="x")
    batch.stage_room(NEW, joined=False)
    assert (batch.rooms[ROOM].joined, batch.rooms[ROOM].lacking) == (True, DRIFTED)
    assert (batch.rooms[NEW].joined, batch.rooms[NEW].lacking) == (False, "x")
    assert batch.staged_joined(ROOM) is True and batch.staged_joined(SPACE) is None


async def test_pending_transactions_are_one_batch_committed_all_or_none(
    worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = {a.id for a in await pending(worker.store)}
    joins = [NEW, f"!second:{OWN}", f"!third:{OWN}"]
    for room in joins:
        await worker.store.queue.ingest(f"t-{room}", [member(room, bot(worker), "join")])
    await fail_next_commit(worker.store, monkeypatch)
    before |= {a.id for a in await pending(worker.store)}
    with pytest.raises(StoreUnavailable):
        await worker.run_once()
    # nothing of any of them: not processed, no room rows, no actions, nothing remembered
    assert len(await worker.store.queue.pending()) == 3
    assert not set(joins) & set(await rooms(worker.store))
    assert [a for a in await pending(worker.store) if a.id not in before] == []
    assert not any(worker.tracker.joined(room) for room in joins)

    real, commits = worker.store.queue.complete, []

    async def counted(queue_ids: Any, *args: Any, **kwargs: Any) -> None:
        commits.append(list(queue_ids))
        await real(queue_ids, *args, **kwargs)

    monkeypatch.setattr(worker.store.queue, "complete", counted)
    assert await worker.run_once() == 3
    assert await worker.run_once() == 0
    assert [len(ids) for ids in commits] == [3]  # one batch, one commit
    assert set(joins) <= set(await rooms(worker.store))
    new = [a for a in await pending(worker.store) if a.id not in before]
    assert sorted(a.room_id or "" for a in new if a.kind == ActionKind.RECONCILE) == sorted(joins)
