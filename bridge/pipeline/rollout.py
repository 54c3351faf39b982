"""Rollout after a changed policy: when the room-level policy (federation, retention) differs
from the one every managed room was last brought in line with, reconcile them all.

The policy's fingerprint is kept in the store, so a restart with an unchanged config does
nothing, and a restart or reload with a changed one starts one rollout.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

from bridge.config import Config
from bridge.pipeline.enforcement import ROLLOUT_KEY, RoomEnforcer
from bridge.store import Store

log = logging.getLogger(__name__)

FINGERPRINT_KEY = "policy.fingerprint"
ROOM_SECTIONS = ("federation", "retention")  # the sections enforced in room state


def policy_fingerprint(config: Config, runtime: Mapping[str, Any]) -> str:
    """A digest of the room-level policy: the config's sections and the runtime documents
    commands wrote for them."""
    doc = {
        # the sections as written, so an unchanged config keeps its digest across versions
        "federation": config.federation.to_doc(),
        "retention": config.retention.to_doc(),
        "runtime": {k: runtime.get(k) for k in ROOM_SECTIONS},
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


async def rollout_if_policy_changed(
    store: Store,
    rooms: RoomEnforcer,
    fingerprint: str,
    management_room: str,
    wake: Callable[[], None],
) -> int | None:
    """Reconcile every joined room but the management room if ``fingerprint`` differs from
    the stored one. Returns how many rooms were queued (None: the policy had not changed)."""
    if await store.state.get(FINGERPRINT_KEY) == fingerprint:
        return None
    targets = [
        r["room_id"]
        for r in await store.rooms.known()
        if r["joined"] and r["room_id"] != management_room
    ]
    acts, record = rooms.rollout(targets, "policy changed since the last start")
    await store.actions.enqueue(acts)
    await store.state.set(FINGERPRINT_KEY, fingerprint)
    await store.state.set(ROLLOUT_KEY, json.dumps(record))
    rooms.start_rollout(record)
    wake()
    log.info("policy changed since the last start: %d rooms to bring in line", len(targets))
    return len(targets)
