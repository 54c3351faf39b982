"""Small helpers shared by integration tests."""

from __future__ import annotations

from typing import Any

from matrix_client import MatrixTestClient, wait_for


async def bot_replies(
    client: MatrixTestClient, room_id: str, bot: str, after_event: str, timeout: float = 20
) -> list[dict[str, Any]]:
    """Wait for the bot's reply to ``after_event`` (an m.in_reply_to notice)."""

    async def find() -> list[dict[str, Any]] | None:
        events = await client.messages(room_id, limit=50)
        found = [
            e
            for e in events
            if e.get("sender") == bot
            and e.get("content", {})
            .get("m.relates_to", {})
            .get("m.in_reply_to", {})
            .get("event_id")
            == after_event
        ]
        return found or None

    return await wait_for(find, timeout=timeout, message=f"a reply to {after_event}")
