"""Console test kit: a console mounted as in production (under /console), a fake
homeserver for its logins, and helpers to log in."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from bridge.console.web import Console
from bridge.store import Store
from tests.kit.config import DOMAIN, make_config
from tests.kit.services import ConsoleFake

USERS = {"admin": "admin-pw", "auditor": "auditor-pw", "nobody": "nobody-pw"}
PERMISSIONS = {f"@admin:{DOMAIN}": "admin", f"@auditor:{DOMAIN}": "auditor"}


@dataclass
class FakeHomeserver:
    """The login API of a homeserver: password and token logins, whoami, logout."""

    tokens: dict[str, str] = field(default_factory=dict)  # access token -> user ID
    login_tokens: dict[str, str] = field(default_factory=dict)  # SSO loginToken -> user ID
    logged_out: list[str] = field(default_factory=list)
    logins: list[dict[str, Any]] = field(default_factory=list)

    def app(self) -> web.Application:
        async def flows(_: web.Request) -> web.Response:
            return web.json_response(
                {"flows": [{"type": "m.login.password"}, {"type": "m.login.sso"}]}
            )

        async def login(request: web.Request) -> web.Response:
            body = await request.json()
            self.logins.append(body)
            user_id = None
            if body.get("type") == "m.login.password":
                user = body["identifier"]["user"]
                if USERS.get(user) == body.get("password"):
                    user_id = f"@{user}:{DOMAIN}"
            elif body.get("type") == "m.login.token":
                user_id = self.login_tokens.pop(body.get("token"), None)
            if user_id is None:
                return web.json_response({"errcode": "M_FORBIDDEN", "error": "no"}, status=403)
            token = f"tok{len(self.tokens)}"
            self.tokens[token] = user_id
            return web.json_response({"access_token": token, "user_id": user_id})

        def bearer(request: web.Request) -> str:
            return request.headers.get("Authorization", "").removeprefix("Bearer ")

        async def whoami(request: web.Request) -> web.Response:
            user = self.tokens.get(bearer(request))
            if user is None:
                return web.json_response({"errcode": "M_UNKNOWN_TOKEN"}, status=401)
            return web.json_response({"user_id": user})

        async def logout(request: web.Request) -> web.Response:
            token = bearer(request)
            self.tokens.pop(token, None)
            self.logged_out.append(token)
            return web.json_response({})

        app = web.Application()
        app.add_routes(
            [
                web.get("/_matrix/client/v3/login", flows),
                web.post("/_matrix/client/v3/login", login),
                web.get("/_matrix/client/v3/account/whoami", whoami),
                web.post("/_matrix/client/v3/logout", logout),
            ]
        )
        return app


@dataclass
class Clock:
    now: float = 1_750_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class ConsoleRig:
    client: TestClient[Any, Any]
    hs: FakeHomeserver
    services: ConsoleFake
    console: Console
    clock: Clock

    @property
    def store(self) -> Store:
        return self.services.store

    async def login(self, user: str, password: str | None = None) -> web.StreamResponse:
        """Log in through the form (its CSRF token read from the page)."""
        page = await self.client.get("/console/login")
        token = form_token(await page.text())
        return await self.client.post(
            "/console/login",
            data={"username": user, "password": password or USERS[user], "csrf": token},
            allow_redirects=False,
        )

    async def csrf(self, path: str = "/console/") -> str:
        """The CSRF token on a page of the current session."""
        page = await self.client.get(path)
        assert page.status == 200, await page.text()
        return form_token(await page.text())


def form_token(html: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', html)
    assert match, html
    return match.group(1)


async def make_rig(
    tmp_path: Path, overrides: dict[str, Any] | None = None
) -> AsyncIterator[ConsoleRig]:
    hs = FakeHomeserver()
    hs_server = TestServer(hs.app())
    await hs_server.start_server()
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'console.db'}")
    config = make_config(
        {
            "homeserver": {"url": str(hs_server.make_url("")).rstrip("/")},
            "bridge": {"permissions": PERMISSIONS},
            "console": {"enabled": True, "secure_cookies": False, **(overrides or {})},
            "data_dir": str(tmp_path),
        }
    )
    services = ConsoleFake(store, config)
    clock = Clock()
    console = Console(services, "/console", clock=clock)
    root = web.Application()
    root.add_subapp("/console", console.application())
    async with TestClient(TestServer(root)) as client:
        yield ConsoleRig(client, hs, services, console, clock)
    await store.close()
    await hs_server.close()
