"""The room tracker on its own: what each room event stages, and when it is remembered."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from bridge.config import Config
from bridge.pipeline.actions import ActionKind
from bridge.pipeline.batch import Batch
from bridge.pipeline.room_tracker import ENROLL_DELAY, RoomTracker
from bridge.store import Store
from tests.kit.config import make_config
from tests.kit.services import Services

OWN = "corp.example"
MGMT = f"!mgmt:{OWN}"
ROOM = f"!room:{OWN}"
FRIEND = "@friend:partner.example"  # a remote user with a role


def config(tmp_path: Path, **bridge: Any) -> Config:
    return make_config(
        {
            "homeserver": {"domain": OWN, "admin_token": "adm-token"},
            "bridge": {"permissions": {FRIEND: "auditor"}, **bridge},
        },
        base_dir=tmp_path,
    )


def tracker(store: Store, cfg: Config) -> RoomTracker:
    services = Services(store, cfg, MGMT, own_server=OWN)
    return RoomTracker(store, lambda: cfg, lambda: services.policy.engine, services)


def ev(etype: str, sender: str, room: str = ROOM, **fields: Any) -> dict[str, Any]:
    return {"event_id": "$x", "room_id": room, "sender": sender, "type": etype, **fields}


@pytest.mark.parametrize(
    ("inviter", "joins"),
    [(f"@alice:{OWN}", True), (FRIEND, True), ("@stranger:evil.example", False)],
)
def test_invitations_from_our_server_or_users_with_a_role_are_accepted(
    store: Store, tmp_path: Path, inviter: str, joins: bool
) -> None:
    cfg = config(tmp_path)
    t, batch = tracker(store, cfg), Batch()
    invite = ev("m.room.member", inviter, state_key=cfg.bot_mxid, content={"membership": "invite"})
    t.on_event(invite, batch, cfg)
    assert [(a.kind, a.room_id) for a in batch.actions] == (
        [(ActionKind.JOIN, ROOM)] if joins else []
    )
    assert batch.rooms == {}  # an invitation is not a membership yet


def test_the_bots_join_is_staged_and_remembered_after_the_commit(
    store: Store, tmp_path: Path
) -> None:
    cfg = config(tmp_path)
    t, batch = tracker(store, cfg), Batch()
    join = ev("m.room.member", cfg.bot_mxid, state_key=cfg.bot_mxid, content={"membership": "join"})
    t.on_event(join, batch, cfg)
    assert batch.rooms[ROOM].joined is True
    assert t.joined(ROOM, batch) and not t.joined(ROOM)  # not committed yet
    for callback in batch.after_commit:
        callback()
    assert t.joined(ROOM)


def test_new_rooms_are_enrolled_when_auto_enrolment_is_on(store: Store, tmp_path: Path) -> None:
    cfg = config(tmp_path, auto_enroll=True)
    t, batch = tracker(store, cfg), Batch()
    before = time.time()
    t.on_event(ev("m.room.create", f"@alice:{OWN}", content={}), batch, cfg)
    admin, join = batch.actions
    assert (admin.kind, admin.room_id, dict(admin.payload)) == (
        ActionKind.MAKE_ROOM_ADMIN,
        ROOM,
        {"user_id": cfg.bot_mxid},
    )
    assert admin.not_before >= before + ENROLL_DELAY
    assert (join.kind, join.room_id, join.not_before) == (
        ActionKind.JOIN,
        ROOM,
        admin.not_before + 0.5,
    )
    # the bot's own rooms, and no auto-enrolment: nothing
    mine = Batch()
    t.on_event(ev("m.room.create", cfg.bot_mxid, content={}), mine, cfg)
    off, quiet = config(tmp_path), Batch()
    tracker(store, off).on_event(ev("m.room.create", f"@alice:{OWN}", content={}), quiet, off)
    assert mine.actions == [] and quiet.actions == []
