"""Where each user's policy notices go: the notice room per user, kept in the store.

A user's notice room is a private room with the bot, created on the first notice (by the
executor's ``policy_notice`` action) and reused. Both directions are kept in
``bridge_state`` (sealed): user -> room to write, room -> user to know whose commands a
notice room accepts. The user's ledger of recent refusals is kept there too.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bridge.store import Store

NOTICE_ROOM_NAME = "Policy notices"
NOTICE_ROOM_TOPIC = (
    "Why the policy bridge refused something of yours. Answer here with "
    "!policy report <reference> <comment> if you think it was a mistake."
)
_ROOM_KEY = "notices.room."  # + user ID
_OWNER_KEY = "notices.owner."  # + room ID
_LEDGER_KEY = "notices.ledger."  # + user ID


async def notice_room(store: Store, user_id: str) -> str | None:
    """The notice room of ``user_id``, or None if none was created yet."""
    return await store.state.get(_ROOM_KEY + user_id)


async def notice_room_owner(store: Store, room_id: str) -> str | None:
    """The user whose notice room ``room_id`` is, or None if it is not one."""
    return await store.state.get(_OWNER_KEY + room_id)


async def remember_notice_room(store: Store, user_id: str, room_id: str) -> None:
    """Record ``room_id`` as the notice room of ``user_id`` (both directions)."""
    await store.state.set(_OWNER_KEY + room_id, user_id)
    await store.state.set(_ROOM_KEY + user_id, room_id)


async def load_ledger(store: Store, user_id: str) -> str | None:
    """The stored notice ledger of ``user_id`` (JSON), if any."""
    return await store.state.get(_LEDGER_KEY + user_id)


async def save_ledger(store: Store, user_id: str, text: str) -> None:
    """Store the notice ledger of ``user_id``."""
    await store.state.set(_LEDGER_KEY + user_id, text)


async def update_ledger(
    store: Store, user_id: str, change: Callable[[str | None], Awaitable[str]]
) -> str:
    """Read, change and store the notice ledger of ``user_id`` in one transaction, the row
    locked: replicas refusing the same sender at once do not lose each other's entries."""
    return await store.state.merge(_LEDGER_KEY + user_id, change)


OVERRIDES_KEY = "notices.overrides"  # the overrides granted (JSON, see bridge.policy.overrides)


async def load_overrides(store: Store) -> str | None:
    """The stored overrides (JSON), if any."""
    return await store.state.get(OVERRIDES_KEY)


async def save_overrides(store: Store, text: str) -> None:
    """Store the overrides."""
    await store.state.set(OVERRIDES_KEY, text)
