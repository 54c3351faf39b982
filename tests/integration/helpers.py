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


async def notice_invite(
    client: MatrixTestClient, bot: str, since: str
) -> tuple[str, dict[str, Any]]:
    """The notice room the bot invited the user to after ``since`` (a sync token), and the
    user's invite member event. (Incremental syncs: Synapse caches an initial sync.)"""
    token = since

    async def find() -> tuple[str, dict[str, Any]] | None:
        nonlocal token
        sync = await client.request(
            "GET", "/_matrix/client/v3/sync", params={"timeout": "0", "since": token}
        )
        token = sync["next_batch"]
        for room, data in sync.get("rooms", {}).get("invite", {}).items():
            for ev in data.get("invite_state", {}).get("events", []):
                if ev.get("type") == "m.room.member" and ev.get("state_key") == client.user_id:
                    if ev.get("sender") == bot:
                        return room, ev
        return None

    return await wait_for(find, timeout=20, message="the notice room's invite")


async def sync_token(client: MatrixTestClient) -> str:
    sync = await client.request("GET", "/_matrix/client/v3/sync", params={"timeout": "0"})
    return str(sync["next_batch"])


async def bot_notices(client: MatrixTestClient, room: str, bot: str) -> list[dict[str, Any]]:
    events = await client.messages(room, limit=100)
    return [
        e
        for e in events
        if e.get("sender") == bot
        and e.get("type") == "m.room.message"
        and e.get("content", {}).get("msgtype") == "m.notice"
    ]
