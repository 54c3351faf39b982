"""The to-device part of appservice transactions that arrives before the bot's E2EE device
is open (at start, or on a replica that is not the leader).

Synapse does not keep a transaction's to-device part for a retry: a transaction it sends
again after a non-2xx answer carries its events only (``get_oldest_unsent_txn`` in Synapse's
``storage/databases/main/appservice.py`` rebuilds it with empty to-device messages and key
counts). Refusing it would lose room keys for good. So that part is never refused: until the
device is open it is kept in the store (sealed, like all operational state) and handed to
the device when it opens.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from typing import Any

from bridge.store import Store

log = logging.getLogger(__name__)

BACKLOG_KEY = "e2ee_to_device_backlog"
#: Transactions' to-device parts kept at most (the oldest are dropped, and said so).
MAX_PARTS = 2000
#: The keys of a transaction that belong to the bot's device (MSC2409, MSC3202).
PREFIXES = ("de.sorunome.msc2409.to", "org.matrix.msc3202")


def to_device_part(payload: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of a transaction body that are for the bot's device ({} if none)."""
    return {k: v for k, v in payload.items() if k.startswith(PREFIXES)}


class ToDeviceBacklog:
    """To-device parts kept in the store until the device opens, in arrival order."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._lock = asyncio.Lock()

    async def keep(self, part: Mapping[str, Any]) -> None:
        """Append ``part``, durably (the transaction is acknowledged after this)."""
        async with self._lock:
            raw = await self._store.state.get(BACKLOG_KEY)
            parts: list[Any] = json.loads(raw) if raw else []
            parts.append(dict(part))
            if len(parts) > MAX_PARTS:
                log.warning("to-device backlog full: dropping %d oldest", len(parts) - MAX_PARTS)
                parts = parts[-MAX_PARTS:]
            await self._store.state.set(BACKLOG_KEY, json.dumps(parts))

    async def parts(self) -> list[dict[str, Any]]:
        """Everything kept, oldest first (still kept: :meth:`forget` once handled)."""
        raw = await self._store.state.get(BACKLOG_KEY)
        parts: list[dict[str, Any]] = json.loads(raw) if raw else []
        return parts

    async def forget(self, n: int) -> None:
        """Drop the ``n`` oldest parts (handed to the device)."""
        async with self._lock:
            raw = await self._store.state.get(BACKLOG_KEY)
            parts: list[Any] = json.loads(raw) if raw else []
            await self._store.state.set(BACKLOG_KEY, json.dumps(parts[n:]) if parts[n:] else "")
