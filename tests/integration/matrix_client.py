"""A small async Matrix client-server API client for integration tests.

Deliberately independent of the product code (and of mautrix), so tests exercise the bridge
from the outside, the way a user's client would.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp

T = TypeVar("T")


class MatrixError(Exception):
    """The homeserver answered a request with a non-2xx status."""

    def __init__(self, status: int, errcode: str | None, error: str, body: Any = None) -> None:
        super().__init__(f"{status} {errcode}: {error}")
        self.status = status
        self.errcode = errcode
        self.error = error
        self.body = body


def _q(value: str) -> str:
    return quote(value, safe="")


class MatrixTestClient:
    """One logged-in user talking to a homeserver's client-server API.

    Usable as ``async with MatrixTestClient(...) as client:``; otherwise call :meth:`close`.
    """

    def __init__(
        self,
        base_url: str,
        user_id: str,
        access_token: str,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.user_id = user_id
        self.access_token = access_token
        self._session = session
        self._own_session = session is None

    async def __aenter__(self) -> MatrixTestClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the HTTP session if this client created it."""
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        """The aiohttp session, created on first use (inside the running loop)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        return self._session

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        params: dict[str, str] | None = None,
    ) -> Any:
        """Send one authenticated request; return the JSON body or raise :class:`MatrixError`."""
        headers = {"Authorization": f"Bearer {self.access_token}"}
        async with self.session.request(
            method, self.base_url + path, json=body, params=params, headers=headers
        ) as resp:
            text = await resp.text()
            try:
                data = await resp.json(content_type=None) if text else {}
            except ValueError:
                data = None
            if resp.status >= 300:
                if isinstance(data, dict):
                    raise MatrixError(
                        resp.status, data.get("errcode"), str(data.get("error", "")), data
                    )
                raise MatrixError(resp.status, None, text[:500], text)
            return data

    @staticmethod
    def _txn() -> str:
        return uuid.uuid4().hex

    # ------------------------------------------------------------------------------ rooms

    async def create_room(
        self,
        *,
        name: str | None = None,
        topic: str | None = None,
        invite: Iterable[str] = (),
        initial_state: Iterable[dict[str, Any]] = (),
        room_version: str | None = None,
        preset: str | None = None,
        **extra: Any,
    ) -> str:
        """Create a room and return its ID. ``extra`` is passed through into the body
        (e.g. ``creation_content={"m.federate": False}``, ``power_level_content_override``,
        ``is_direct``, ``visibility``, ``room_alias_name``)."""
        body: dict[str, Any] = dict(extra)
        if name is not None:
            body["name"] = name
        if topic is not None:
            body["topic"] = topic
        if invite:
            body["invite"] = list(invite)
        if initial_state:
            body["initial_state"] = list(initial_state)
        if room_version is not None:
            body["room_version"] = room_version
        if preset is not None:
            body["preset"] = preset
        result = await self.request("POST", "/_matrix/client/v3/createRoom", body)
        return str(result["room_id"])

    async def send_event(self, room_id: str, event_type: str, content: dict[str, Any]) -> str:
        """Send a message-like event and return its event ID."""
        path = f"/_matrix/client/v3/rooms/{_q(room_id)}/send/{_q(event_type)}/{self._txn()}"
        result = await self.request("PUT", path, content)
        return str(result["event_id"])

    async def send_text(
        self,
        room_id: str,
        body: str,
        formatted_body: str | None = None,
        extra_content: dict[str, Any] | None = None,
        msgtype: str = "m.text",
    ) -> str:
        """Send an ``m.room.message`` and return its event ID."""
        content: dict[str, Any] = {"msgtype": msgtype, "body": body}
        if formatted_body is not None:
            content["format"] = "org.matrix.custom.html"
            content["formatted_body"] = formatted_body
        if extra_content:
            content.update(extra_content)
        return await self.send_event(room_id, "m.room.message", content)

    async def send_state(
        self, room_id: str, event_type: str, state_key: str, content: dict[str, Any]
    ) -> str:
        """Send a state event and return its event ID."""
        path = f"/_matrix/client/v3/rooms/{_q(room_id)}/state/{_q(event_type)}/{_q(state_key)}"
        result = await self.request("PUT", path, content)
        return str(result["event_id"])

    async def get_state(
        self, room_id: str, event_type: str, state_key: str = ""
    ) -> dict[str, Any] | None:
        """Return the content of a state event, or None if it does not exist."""
        path = f"/_matrix/client/v3/rooms/{_q(room_id)}/state/{_q(event_type)}/{_q(state_key)}"
        try:
            result: dict[str, Any] = await self.request("GET", path)
        except MatrixError as err:
            if err.status == 404:
                return None
            raise
        return result

    async def invite(self, room_id: str, user_id: str, reason: str | None = None) -> None:
        """Invite ``user_id`` into the room."""
        body: dict[str, Any] = {"user_id": user_id}
        if reason:
            body["reason"] = reason
        await self.request("POST", f"/_matrix/client/v3/rooms/{_q(room_id)}/invite", body)

    async def join(self, room_id_or_alias: str) -> str:
        """Join a room (by ID or alias) and return the room ID."""
        result = await self.request("POST", f"/_matrix/client/v3/join/{_q(room_id_or_alias)}", {})
        return str(result["room_id"])

    async def leave(self, room_id: str) -> None:
        """Leave the room."""
        await self.request("POST", f"/_matrix/client/v3/rooms/{_q(room_id)}/leave", {})

    async def kick(self, room_id: str, user_id: str, reason: str | None = None) -> None:
        """Kick ``user_id`` from the room."""
        body: dict[str, Any] = {"user_id": user_id}
        if reason:
            body["reason"] = reason
        await self.request("POST", f"/_matrix/client/v3/rooms/{_q(room_id)}/kick", body)

    async def redact(self, room_id: str, event_id: str, reason: str | None = None) -> str:
        """Redact an event and return the redaction's event ID."""
        body: dict[str, Any] = {"reason": reason} if reason else {}
        path = f"/_matrix/client/v3/rooms/{_q(room_id)}/redact/{_q(event_id)}/{self._txn()}"
        result = await self.request("PUT", path, body)
        return str(result["event_id"])

    async def messages(
        self, room_id: str, limit: int = 100, event_filter: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        """Up to ``limit`` most recent events of the room, newest first (``/messages dir=b``).

        Pages backwards until ``limit`` events are collected or history ends.
        """
        events: list[dict[str, Any]] = []
        params: dict[str, str] = {"dir": "b"}
        if event_filter is not None:
            params["filter"] = json.dumps(event_filter)
        while len(events) < limit:
            params["limit"] = str(min(limit - len(events), 1000))
            page = await self.request(
                "GET", f"/_matrix/client/v3/rooms/{_q(room_id)}/messages", params=params
            )
            chunk = page.get("chunk", [])
            events.extend(chunk)
            if not chunk or not page.get("end"):
                break
            params["from"] = page["end"]
        return events[:limit]

    async def get_event(self, room_id: str, event_id: str) -> dict[str, Any]:
        """Fetch a single event."""
        return dict(
            await self.request(
                "GET", f"/_matrix/client/v3/rooms/{_q(room_id)}/event/{_q(event_id)}"
            )
        )

    async def joined_members(self, room_id: str) -> dict[str, Any]:
        """Map of joined user IDs to their profile (``display_name``, ``avatar_url``)."""
        result = await self.request("GET", f"/_matrix/client/v3/rooms/{_q(room_id)}/joined_members")
        return dict(result.get("joined", {}))

    async def whoami(self) -> str:
        """The user ID the access token belongs to."""
        result = await self.request("GET", "/_matrix/client/v3/account/whoami")
        return str(result["user_id"])


async def wait_for(
    predicate: Callable[[], Awaitable[T]],
    timeout: float = 10.0,
    interval: float = 0.1,
    message: str = "condition",
) -> T:
    """Call ``predicate`` until it returns a truthy value, and return that value.

    Exceptions from the predicate count as "not yet" but the last one is chained to the
    ``TimeoutError`` raised after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            result = await predicate()
            if result:
                return result
        except Exception as exc:
            last_exc = exc
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{message} not met within {timeout}s") from last_exc
        await asyncio.sleep(interval)
