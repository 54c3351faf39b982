"""Console logins: password and SSO through the homeserver, roles, rate limits, sessions."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from bridge.audit.kinds import AuditKind
from bridge.store import Store
from tests.kit.config import DOMAIN
from tests.kit.console import ConsoleRig, form_token, make_rig


async def records(store: Store, kind: str) -> list[dict[str, Any]]:
    return [r async for r in store.reader.iter(kind=kind)]


async def test_pages_need_a_session(rig: ConsoleRig) -> None:
    for path in ("/console/", "/console/archive", "/console/holds", "/console/archive/1"):
        resp = await rig.client.get(path, allow_redirects=False)
        assert resp.status == 303 and resp.headers["Location"] == "/console/login", path


async def test_password_login_learns_the_user_and_logs_the_token_out(rig: ConsoleRig) -> None:
    resp = await rig.login("admin")
    assert resp.status == 303 and resp.headers["Location"] == "/console/"
    page = await rig.client.get("/console/")
    assert page.status == 200
    text = await page.text()
    assert f"@admin:{DOMAIN}" in text and "(admin)" in text
    # the homeserver token was used for whoami, then logged out; none is left
    assert rig.hs.logged_out == ["tok0"] and rig.hs.tokens == {}
    (login,) = await records(rig.store, AuditKind.LOGIN)
    assert login["sender"] == f"@admin:{DOMAIN}" and login["type"] == "ok"
    assert login["data"]["method"] == "password"
    assert login["data"]["role"] == "admin"


async def test_a_wrong_password_is_refused_and_recorded(rig: ConsoleRig) -> None:
    resp = await rig.login("admin", "wrong")
    assert resp.status == 401
    assert "Wrong user name or password" in await resp.text()
    assert (await rig.client.get("/console/", allow_redirects=False)).status == 303
    (failed,) = await records(rig.store, AuditKind.LOGIN)
    assert failed["type"] == "failed" and failed["data"]["user"] == "admin"
    assert "wrong" not in str(failed)  # never the password


async def test_a_user_without_a_role_is_refused_with_a_clear_page(rig: ConsoleRig) -> None:
    resp = await rig.login("nobody")
    assert resp.status == 403
    text = await resp.text()
    assert "No access to the compliance console" in text and f"@nobody:{DOMAIN}" in text
    assert (await rig.client.get("/console/", allow_redirects=False)).status == 303
    (refused,) = await records(rig.store, AuditKind.LOGIN)
    assert refused["type"] == "refused" and refused["sender"] == f"@nobody:{DOMAIN}"
    assert rig.hs.tokens == {}  # its token was logged out too


async def test_a_role_taken_away_ends_the_session(rig: ConsoleRig) -> None:
    await rig.login("auditor")
    assert (await rig.client.get("/console/")).status == 200
    rig.services.config = rig.services.config.__class__(
        **{
            **{f: getattr(rig.services.config, f) for f in rig.services.config.__slots__},
            "bridge": rig.services.config.bridge.__class__(
                **{
                    **{
                        f: getattr(rig.services.config.bridge, f)
                        for f in rig.services.config.bridge.__slots__
                    },
                    "permissions": {},
                }
            ),
        }
    )
    resp = await rig.client.get("/console/")
    assert resp.status == 403 and "No access" in await resp.text()
    assert (await rig.client.get("/console/", allow_redirects=False)).status == 303


async def test_the_login_form_needs_its_csrf_token(rig: ConsoleRig) -> None:
    await rig.client.get("/console/login")
    resp = await rig.client.post(
        "/console/login", data={"username": "admin", "password": "admin-pw"}
    )
    assert resp.status == 403
    assert rig.hs.logins == []  # the homeserver was never asked


async def test_login_attempts_are_limited_per_address(rig: ConsoleRig) -> None:
    for _ in range(3):  # successful logins do not count
        rig.client.session.cookie_jar.clear()
        assert (await rig.login("auditor")).status == 303
    rig.client.session.cookie_jar.clear()
    for _ in range(5):
        assert (await rig.login("admin", "wrong")).status == 401
    resp = await rig.login("admin")  # the right password, too late
    assert resp.status == 429 and "Too many login attempts" in await resp.text()
    assert len(rig.hs.logins) == 8
    rig.clock.now += 301  # the window (5m) has passed
    assert (await rig.login("admin")).status == 303


async def test_login_attempts_are_limited_per_user(rig: ConsoleRig) -> None:
    console = rig.console
    for _ in range(5):
        console.by_user.hit("admin", rig.clock.now)
    resp = await rig.login("admin")
    assert resp.status == 429
    assert rig.hs.logins == []
    assert (await rig.login("auditor")).status == 303  # another user from the same address


async def test_idle_timeout(rig: ConsoleRig) -> None:
    await rig.login("admin")
    rig.clock.now += 29 * 60
    assert (await rig.client.get("/console/")).status == 200  # used: idle time starts again
    rig.clock.now += 29 * 60
    assert (await rig.client.get("/console/")).status == 200
    rig.clock.now += 31 * 60
    resp = await rig.client.get("/console/", allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == "/console/login"


async def test_absolute_timeout(rig: ConsoleRig) -> None:
    await rig.login("admin")
    for _ in range(40):  # busy for over 12 hours, never idle
        rig.clock.now += 20 * 60
        resp = await rig.client.get("/console/", allow_redirects=False)
        if resp.status != 200:
            break
    assert resp.status == 303
    assert rig.clock.now - 1_750_000_000.0 > 12 * 3600


async def test_logout_ends_the_session(rig: ConsoleRig) -> None:
    await rig.login("admin")
    token = await rig.csrf()
    resp = await rig.client.post("/console/logout", data={"csrf": token}, allow_redirects=False)
    assert resp.status == 303
    assert (await rig.client.get("/console/", allow_redirects=False)).status == 303
    kinds = [r["type"] for r in await records(rig.store, AuditKind.LOGIN)]
    assert kinds == ["ok", "logout"]


async def test_sessions_are_stored_hashed(rig: ConsoleRig) -> None:
    resp = await rig.login("admin")
    sid = resp.cookies["policy-console"].value
    async with rig.store.db.connect() as conn:
        rows = (await conn.exec_driver_sql("SELECT id_hash, data FROM console_sessions")).all()
    assert len(rows) == 1
    assert sid.encode() not in bytes(rows[0][0]) and b"admin" not in bytes(rows[0][1])


async def test_secure_cookies(tmp_path: Path) -> None:
    async for rig in make_rig(tmp_path, {"secure_cookies": True}):
        # the client does not send Secure cookies over plain HTTP: hand the nonce over
        page = await rig.client.get("/console/login")
        nonce = page.cookies["policy-console-login"]
        assert nonce["secure"] and nonce["httponly"] and nonce["samesite"] == "Strict"
        resp = await rig.client.post(
            "/console/login",
            data={
                "username": "admin",
                "password": "admin-pw",
                "csrf": form_token(await page.text()),
            },
            headers={"Cookie": f"policy-console-login={nonce.value}"},
            allow_redirects=False,
        )
        assert resp.status == 303
        cookie = resp.headers.getall("Set-Cookie")
        (session,) = [c for c in cookie if c.startswith("__Host-policy-console=")]
        parts = {p.strip().split("=")[0].lower() for p in session.split(";")}
        assert {"httponly", "secure", "path", "samesite"} <= parts
        assert "SameSite=Strict" in session and "Path=/" in session and "Domain" not in session


async def test_single_sign_on_needs_the_public_url(rig: ConsoleRig) -> None:
    assert "single sign-on" not in (await (await rig.client.get("/console/login")).text())
    resp = await rig.client.get("/console/login/sso", allow_redirects=False)
    assert resp.status == 404 and "console.public_url" in await resp.text()


async def test_single_sign_on_round_trip(tmp_path: Path) -> None:
    async for rig in make_rig(tmp_path, {"public_url": "https://console.example/console"}):
        await _sso_round_trip(rig)


async def _sso_round_trip(rig: ConsoleRig) -> None:
    assert "single sign-on" in (await (await rig.client.get("/console/login")).text())
    resp = await rig.client.get("/console/login/sso", allow_redirects=False)
    assert resp.status == 303
    target = urlparse(resp.headers["Location"])
    assert target.path == "/_matrix/client/v3/login/sso/redirect"
    callback = urlparse(parse_qs(target.query)["redirectUrl"][0])
    assert callback.netloc == "console.example" and callback.path == "/console/login/sso/callback"
    state = parse_qs(callback.query)["state"][0]
    # a callback with another state (started elsewhere) is refused
    rig.hs.login_tokens["lt1"] = f"@auditor:{DOMAIN}"
    bad = await rig.client.get(
        "/console/login/sso/callback", params={"state": "forged", "loginToken": "lt1"}
    )
    assert bad.status == 403 and rig.hs.logins == []
    ok = await rig.client.get(
        "/console/login/sso/callback",
        params={"state": state, "loginToken": "lt1"},
        allow_redirects=False,
    )
    assert ok.status == 303 and ok.headers["Location"] == "/console/"
    assert rig.hs.logins[0]["type"] == "m.login.token" and rig.hs.tokens == {}
    assert "(auditor)" in await (await rig.client.get("/console/")).text()
