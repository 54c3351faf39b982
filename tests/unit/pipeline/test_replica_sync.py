"""A policy change stored by one replica (runtime rules, overrides, the management room, a
config reload) reaches another replica within a second, through the change notice; and the
periodic re-read repairs a missed notice."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from bridge.pipeline.live_policy import LivePolicy, runtime_key
from bridge.pipeline.management import MANAGEMENT_ROOM_KEY
from bridge.pipeline.replicas import CONFIG_TOPIC, ReplicaHooks, ReplicaSync, broadcast_key
from bridge.policy.layers import add_keyword
from bridge.policy.overrides import Grant, OverrideBook
from bridge.store import Store, StoreSettings
from bridge.store.changes import ChangeFeed, publish
from bridge.store.notice_rooms import OVERRIDES_KEY
from tests.conftest import fresh_store_url
from tests.kit.config import make_config

EVENT = {
    "type": "m.room.message",
    "room_id": "!r:corp.example",
    "sender": "@u:corp.example",
    "content": {"msgtype": "m.text", "body": "the word is zanzibar"},
}


def blocked(policy: LivePolicy) -> bool:
    return bool(policy.engine.check_event(EVENT).first_block)


async def test_a_keyword_added_on_one_replica_is_enforced_by_another_within_a_second(
    tmp_path: Path,
) -> None:
    url = await fresh_store_url("postgresql", tmp_path)
    leader_store = await Store.open(url)
    follower_store = await Store.open(url, StoreSettings(keyring=leader_store.keyring))
    leader_store.state.broadcast = broadcast_key
    config = make_config()
    follower_policy, overrides = LivePolicy(config), OverrideBook()
    rooms: list[str] = []
    reloads: list[str] = []

    async def reload_config() -> None:
        reloads.append("reload")

    sync = ReplicaSync(
        follower_store,
        ReplicaHooks(
            policy=lambda: follower_policy,
            overrides=overrides,
            set_management_room=rooms.append,
            reload_config=reload_config,
            wake=lambda: None,
        ),
    )
    feed = ChangeFeed(follower_store.db.url, sync.on_change, resync=3600, check=0.2)
    task = asyncio.create_task(feed.run())
    try:
        await asyncio.wait_for(feed.listening.wait(), 10)
        assert not blocked(follower_policy)
        doc = add_keyword({}, "global", "zanzibar", "block")
        await leader_store.state.set(runtime_key("dlp"), LivePolicy(config).encode(doc))
        sent = time.monotonic()
        while not blocked(follower_policy):
            assert time.monotonic() - sent < 1.0, "not enforced within 1 s"
            await asyncio.sleep(0.01)
        grant = Grant("R1", "@u:corp.example", "!r:x", "d", "rule", time.time() + 60, "why")
        await leader_store.state.set(OVERRIDES_KEY, json.dumps([grant.to_json()]))
        await leader_store.state.set(MANAGEMENT_ROOM_KEY, "!mgmt:corp.example")
        sent = time.monotonic()
        while overrides.get("R1") is None or not rooms:
            assert time.monotonic() - sent < 1.0
            await asyncio.sleep(0.01)
        assert rooms == ["!mgmt:corp.example"]
        async with leader_store.db.transaction() as conn:  # `!policy reload` on the leader
            await publish(conn, leader_store.db.backend, CONFIG_TOPIC)
        sent = time.monotonic()
        while not reloads:
            assert time.monotonic() - sent < 1.0
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    # a notice missed while not listening: the periodic re-read (here: called directly)
    await leader_store.state.set(runtime_key("dlp"), "{}")
    assert blocked(follower_policy)
    await sync.on_change("*")
    assert not blocked(follower_policy)
    await follower_store.close()
    await leader_store.close()
