"""Who is logging in: the homeserver's login API, used only to learn a Matrix user ID.

A password or an SSO login token is exchanged for an access token, ``whoami`` names the
user, and that token is logged out at once: the console never keeps homeserver tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from aiohttp import ClientError, ClientSession, ClientTimeout

log = logging.getLogger(__name__)

PASSWORD = "m.login.password"  # noqa: S105 - a login type, not a password
SSO = "m.login.sso"
TOKEN = "m.login.token"  # noqa: S105 - a login type
_TIMEOUT = ClientTimeout(total=15)
DEVICE_NAME = "policy bridge console (logged out at once)"


class HomeserverError(Exception):
    """The homeserver could not be asked (down, or an unexpected answer)."""


class LoginRefused(Exception):
    """The homeserver refused the credentials (its errcode, e.g. M_FORBIDDEN)."""

    def __init__(self, errcode: str) -> None:
        super().__init__(errcode)
        self.errcode = errcode


class HomeserverLogin:
    """The client-server API calls a console login makes."""

    def __init__(self, base_url: str, session: ClientSession) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = session

    async def _call(
        self, method: str, path: str, *, body: Mapping[str, Any] | None = None, token: str = ""
    ) -> tuple[int, dict[str, Any]]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            async with self.session.request(
                method, self.base_url + path, json=body, headers=headers, timeout=_TIMEOUT
            ) as resp:
                try:
                    data = await resp.json(content_type=None)
                except ValueError:
                    data = {}
                return resp.status, data if isinstance(data, dict) else {}
        except (ClientError, TimeoutError) as e:
            raise HomeserverError(f"{method} {path}: {e.__class__.__name__}") from e

    async def flows(self) -> frozenset[str]:
        """The login types the homeserver offers (``GET /login``)."""
        status, data = await self._call("GET", "/_matrix/client/v3/login")
        if status != 200:
            raise HomeserverError(f"GET /login answered {status}")
        flows = data.get("flows")
        if not isinstance(flows, list):
            return frozenset()
        return frozenset(
            str(f["type"])
            for f in flows
            if isinstance(f, Mapping) and isinstance(f.get("type"), str)
        )

    def sso_redirect(self, callback_url: str) -> str:
        """Where to send the browser for single sign-on (back to ``callback_url``)."""
        return (
            f"{self.base_url}/_matrix/client/v3/login/sso/redirect?redirectUrl="
            f"{quote(callback_url, safe='')}"
        )

    async def _login(self, body: Mapping[str, Any]) -> str:
        status, data = await self._call("POST", "/_matrix/client/v3/login", body=body)
        if status == 200 and isinstance(data.get("access_token"), str):
            return str(data["access_token"])
        if status in (400, 401, 403):
            raise LoginRefused(str(data.get("errcode") or "M_FORBIDDEN"))
        raise HomeserverError(f"POST /login answered {status}")

    async def identify(self, body: Mapping[str, Any]) -> str:
        """Log in with ``body``, learn the user ID (``whoami``), log the token out again.

        Raises LoginRefused (bad credentials) or HomeserverError.
        """
        token = await self._login(
            {**body, "initial_device_display_name": DEVICE_NAME, "refresh_token": False}
        )
        try:
            status, data = await self._call("GET", "/_matrix/client/v3/account/whoami", token=token)
            user_id = data.get("user_id")
            if status != 200 or not isinstance(user_id, str):
                raise HomeserverError(f"whoami answered {status}")
            return user_id
        finally:
            try:
                await self._call("POST", "/_matrix/client/v3/logout", body={}, token=token)
            except HomeserverError as e:
                log.warning("could not log out the console's login token: %s", e)

    async def password(self, user: str, password: str) -> str:
        """The user ID of a password login (``m.login.password``)."""
        return await self.identify(
            {
                "type": PASSWORD,
                "identifier": {"type": "m.id.user", "user": user},
                "password": password,
            }
        )

    async def login_token(self, token: str) -> str:
        """The user ID behind an SSO ``loginToken`` (``m.login.token``)."""
        return await self.identify({"type": TOKEN, "token": token})
