"""The policy fingerprint and the rollout after a changed room-level policy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bridge.pipeline.enforcement import RoomEnforcer
from bridge.pipeline.rollout import (
    FINGERPRINT_KEY,
    policy_fingerprint,
    rollout_if_policy_changed,
)
from bridge.store import Store
from tests.kit.config import make_config

MGMT = "!mgmt:x"


def _config(tmp_path: Path, **sections: Any) -> Any:
    return make_config(sections, base_dir=tmp_path)


def test_the_fingerprint_covers_room_policy_only(tmp_path: Path) -> None:
    base = _config(tmp_path)
    fp = policy_fingerprint(base, {})
    assert fp == policy_fingerprint(_config(tmp_path, dlp={"detectors": {"iban": "block"}}), {})
    assert fp == policy_fingerprint(base, {"dlp": {"keywords": ["x"]}})
    assert fp != policy_fingerprint(base, {"retention": {"global": {"max_lifetime": "30d"}}})
    assert fp != policy_fingerprint(_config(tmp_path, retention={"max_lifetime": "30d"}), {})


async def test_a_changed_fingerprint_rolls_out_to_joined_rooms_once(
    store: Store, tmp_path: Path
) -> None:
    async def quiet(_r: Any) -> None:
        return None

    for room in (MGMT, "!a:x", "!b:x"):
        await store.rooms.upsert(room, joined=True)
    await store.rooms.upsert("!left:x", joined=False)
    rooms = RoomEnforcer(store, lambda: 1000.0, quiet)
    woken: list[bool] = []
    fp = policy_fingerprint(_config(tmp_path), {})
    assert await rollout_if_policy_changed(store, rooms, fp, MGMT, lambda: woken.append(True)) == 2
    queued = await store.actions.due(now=10**12, limit=100)
    assert sorted(a.room_id for a in queued if a.kind == "reconcile") == ["!a:x", "!b:x"]
    assert await store.state.get(FINGERPRINT_KEY) == fp
    assert json.loads(await store.state.get("rollout") or "{}")["total"] == 2
    assert woken == [True]
    # unchanged: nothing more
    assert (
        await rollout_if_policy_changed(store, rooms, fp, MGMT, lambda: woken.append(True)) is None
    )
    assert woken == [True]
    await rooms.close()
