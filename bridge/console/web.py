"""The console's aiohttp application: login, sessions, CSRF, and the pages.

Mounted under ``console.path`` on the appservice listener, or served at the root of its own
listener (``console.listen``). Every response carries the strict CSP and security headers;
every page with data is ``no-store``; every form carries the session's CSRF token; every
login, record view, search and export is an audit record naming who did it.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import urlencode

import jinja2
from aiohttp import ClientSession, web
from multidict import MultiDictProxy

from bridge.audit.chain import SigningKeyError, load_public_key
from bridge.audit.kinds import AuditKind
from bridge.console import exporting
from bridge.console.homeserver import (
    PASSWORD,
    SSO,
    HomeserverError,
    HomeserverLogin,
    LoginRefused,
)
from bridge.console.readmodel import (
    ACTIVITY_KINDS,
    LAST_VERIFY_KEY,
    RANGES,
    FilterError,
    IncidentFilters,
    ReadModel,
    SearchFilters,
    incident_of,
    iso,
    policy_rows,
)
from bridge.console.security import (
    NO_STORE,
    SECURITY_HEADERS,
    CookiePolicy,
    RateLimiter,
    csrf_token,
    csrf_valid,
    new_session_id,
)
from bridge.console.services import ConsoleServices
from bridge.console.sessions import Session, SessionManager
from bridge.roles import Role
from bridge.store import AuditEntry
from bridge.store.models import StoreUnavailable, now_ms

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sent the request: their session and role (None: no session, or no role)."""

    session: Session | None = None
    role: Role | None = None


CALLER = web.RequestKey("console_caller", Caller)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_LOGIN_NONCE = "policy-console-login"
_SSO_TTL_S = 600
_CSS = resources.files("bridge.console").joinpath("static/console.css").read_bytes()


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("bridge.console", "templates"),
        autoescape=True,  # every value is text, never markup
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["iso"] = iso
    env.filters["pretty"] = lambda v: json.dumps(v, indent=2, ensure_ascii=False, default=str)
    return env


def client_address(request: web.Request) -> str:
    """The client's address as the listener sees it (a reverse proxy's, behind one)."""
    return request.remote or "unknown"


class Console:
    """The console's handlers, bound to the running bridge's services."""

    def __init__(
        self,
        services: ConsoleServices,
        base: str,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.services = services
        self.base = base.rstrip("/")
        self.clock = clock
        self.env = _environment()
        cfg = services.config.console
        self.cookies = CookiePolicy(cfg.secure_cookies)
        self.sessions = SessionManager(
            services.store.console,
            lambda: self.services.config.console,
            lambda: int(self.clock() * 1000),
        )
        self.by_address = RateLimiter(cfg.login_attempts, cfg.login_window_s)
        self.by_user = RateLimiter(cfg.login_attempts, cfg.login_window_s)
        self.read = ReadModel(services.store)
        self.http: ClientSession | None = None

    # -- plumbing -------------------------------------------------------------------------

    def homeserver(self) -> HomeserverLogin:
        assert self.http is not None, "the console app is not started"
        return HomeserverLogin(self.services.config.homeserver.url, self.http)

    def url(self, path: str, query: Mapping[str, str] | None = None) -> str:
        """A console URL (``path`` relative to the console's root)."""
        out = f"{self.base}{path}"
        if query:
            out += "?" + urlencode(query)
        return out

    def public_url(self, path: str) -> str | None:
        """An absolute URL of the console (``console.public_url``), None when not set: never
        taken from the request's Host header, which a proxy may pass on unchecked."""
        configured = self.services.config.console.public_url
        return configured + path if configured else None

    def render(
        self, request: web.Request, template: str, status: int = 200, **context: Any
    ) -> web.Response:
        session: Session | None = _caller(request).session
        role: Role | None = _caller(request).role
        body = self.env.get_template(template).render(
            base=self.base,
            url=self.url,
            user=session.user_id if session else None,
            role=role.value if role else None,
            is_admin=role is Role.ADMIN,
            csrf=csrf_token(session.id) if session else "",
            nav=context.pop("nav", ""),
            **context,
        )
        return web.Response(
            text=body, status=status, content_type="text/html", charset="utf-8", headers=NO_STORE
        )

    def error(self, request: web.Request, status: int, title: str, message: str) -> web.Response:
        return self.render(request, "error.html", status, title=title, message=message)

    async def audit(
        self, kind: AuditKind, what: str, who: str | None, data: Mapping[str, Any]
    ) -> None:
        """An audit record of a console action by ``who``."""
        await self.services.store.records.append(
            [AuditEntry(kind, {"via": "console", **data}, sender=who, type=what)]
        )

    def role_of(self, user_id: str) -> Role | None:
        return self.services.config.role_of(user_id)

    # -- middleware -----------------------------------------------------------------------

    @web.middleware
    async def headers(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """The security headers on every response, errors included."""
        try:
            response = await handler(request)
        except web.HTTPException as e:
            response = e
        except StoreUnavailable:
            log.warning(
                "console: the database is unreachable (%s %s)", request.method, request.path
            )
            response = self.error(
                request,
                503,
                "Database unreachable",
                "The bridge cannot reach its database at the moment. Try again shortly.",
            )
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        if isinstance(response, web.HTTPException):
            raise response
        return response

    @web.middleware
    async def authenticate(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """The session of the request (or a redirect to the login page), its role, and the
        CSRF check of every POST."""
        public = request.match_info.handler in self.public_handlers()
        session = await self.sessions.lookup(request.cookies.get(self.cookies.name))
        caller = Caller(session, self.role_of(session.user_id) if session else None)
        request[CALLER] = caller
        if public:
            return await handler(request)
        if session is None:
            raise web.HTTPSeeOther(self.url("/login"))
        if caller.role is None:
            await self.sessions.end(session.id)
            request[CALLER] = Caller()
            response = self.render(request, "refused.html", 403, who=session.user_id)
            response.del_cookie(self.cookies.name, path="/")
            return response
        if request.method == "POST":
            form = await request.post()
            token = form.get("csrf")
            if not csrf_valid(session.id, token if isinstance(token, str) else None):
                return self.error(
                    request,
                    403,
                    "Form refused",
                    "This form was not sent from a page of this session (its security token "
                    "is missing or wrong). Go back, reload the page and try again.",
                )
        return await handler(request)

    # -- login ----------------------------------------------------------------------------

    async def login_page(self, request: web.Request) -> web.Response:
        if _caller(request).session is not None and _caller(request).role is not None:
            raise web.HTTPSeeOther(self.url("/"))
        return await self._login_form(request)

    async def _login_form(
        self, request: web.Request, status: int = 200, message: str = "", user: str = ""
    ) -> web.Response:
        flows: frozenset[str] = frozenset()
        problem = ""
        try:
            flows = await self.homeserver().flows()
        except HomeserverError as e:
            log.warning("console: cannot read the homeserver's login flows: %s", e)
            problem = "The homeserver cannot be reached at the moment; try again shortly."
        nonce = request.cookies.get(_LOGIN_NONCE) or new_session_id()
        response = self.render(
            request,
            "login.html",
            status,
            password=PASSWORD in flows or not flows,
            sso=SSO in flows and bool(self.services.config.console.public_url),
            login_csrf=csrf_token(nonce),
            message=message or problem,
            username=user,
        )
        response.set_cookie(_LOGIN_NONCE, nonce, **self.cookies.attributes())  # type: ignore[arg-type]
        return response

    def _rate_limited(self, address: str, user: str) -> float:
        now = self.clock()
        wait = self.by_address.retry_after(address, now)
        if user:
            wait = max(wait, self.by_user.retry_after(user, now))
        return wait

    def _failed(self, address: str, user_key: str) -> None:
        """Count a failed login against the address and the user name tried."""
        now = self.clock()
        self.by_address.hit(address, now)
        if user_key:
            self.by_user.hit(user_key, now)

    async def login_password(self, request: web.Request) -> web.Response:
        form = await request.post()
        user = _field(form, "username", 255)
        password = _field(form, "password", 1024)
        token = _field(form, "csrf", 128)
        address = client_address(request)
        nonce = request.cookies.get(_LOGIN_NONCE, "")
        if not nonce or not csrf_valid(nonce, token):
            return self.error(
                request,
                403,
                "Form refused",
                "The login form's security token is missing or wrong: reload the login page.",
            )
        user_key = user.casefold()
        wait = self._rate_limited(address, user_key)
        if wait > 0:
            await self.audit(
                AuditKind.LOGIN,
                "failed",
                None,
                {"method": "password", "user": user, "address": address, "reason": "rate limit"},
            )
            return await self._login_form(
                request,
                429,
                f"Too many login attempts. Try again in {int(wait) + 1} seconds.",
                user,
            )
        if not user or not password:
            return await self._login_form(request, 400, "Enter your user name and password.", user)
        try:
            user_id = await self.homeserver().password(user, password)
        except LoginRefused as e:
            self._failed(address, user_key)
            await self.audit(
                AuditKind.LOGIN,
                "failed",
                None,
                {"method": "password", "user": user, "address": address, "reason": e.errcode},
            )
            return await self._login_form(request, 401, "Wrong user name or password.", user)
        except HomeserverError as e:
            log.warning("console: password login failed at the homeserver: %s", e)
            return await self._login_form(
                request, 502, "The homeserver could not check the password; try again.", user
            )
        return await self._logged_in(request, user_id, "password", address)

    async def login_sso(self, request: web.Request) -> web.Response:
        base = self.public_url("/login/sso/callback")
        if base is None:
            return self.error(
                request,
                404,
                "Single sign-on is not set up",
                "Single sign-on needs console.public_url in the bridge's configuration.",
            )
        state = secrets.token_urlsafe(24)
        callback = base + "?" + urlencode({"state": state})
        response = web.HTTPSeeOther(self.homeserver().sso_redirect(callback))
        response.set_cookie(
            self.cookies.sso_state_name,
            state,
            max_age=_SSO_TTL_S,
            **self.cookies.attributes(strict=False),  # type: ignore[arg-type]
        )
        raise response

    async def login_sso_callback(self, request: web.Request) -> web.Response:
        address = client_address(request)
        state = request.query.get("state", "")
        expected = request.cookies.get(self.cookies.sso_state_name, "")
        login_token = request.query.get("loginToken", "")
        if not state or not expected or not secrets.compare_digest(state, expected):
            return self.error(
                request,
                403,
                "Sign-in refused",
                "This sign-in was not started from this browser (or took too long). "
                "Start again from the login page.",
            )
        wait = self._rate_limited(address, "")
        if wait > 0:
            return self.error(
                request, 429, "Too many attempts", f"Try again in {int(wait) + 1} seconds."
            )
        try:
            user_id = await self.homeserver().login_token(login_token)
        except LoginRefused as e:
            self._failed(address, "")
            await self.audit(
                AuditKind.LOGIN,
                "failed",
                None,
                {"method": "sso", "address": address, "reason": e.errcode},
            )
            return self.error(request, 401, "Sign-in failed", "The homeserver refused it.")
        except HomeserverError as e:
            log.warning("console: SSO login failed at the homeserver: %s", e)
            return self.error(request, 502, "Sign-in failed", "The homeserver did not answer.")
        response = await self._logged_in(request, user_id, "sso", address)
        response.del_cookie(self.cookies.sso_state_name, path="/")
        return response

    async def _logged_in(
        self, request: web.Request, user_id: str, method: str, address: str
    ) -> web.Response:
        role = self.role_of(user_id)
        if role is None:
            await self.audit(
                AuditKind.LOGIN,
                "refused",
                user_id,
                {"method": method, "address": address, "reason": "no role"},
            )
            return self.render(request, "refused.html", 403, who=user_id)
        await self.sessions.purge()
        session = await self.sessions.create(user_id)
        await self.audit(
            AuditKind.LOGIN,
            "ok",
            user_id,
            {"method": method, "address": address, "role": role.value},
        )
        response = web.HTTPSeeOther(self.url("/"))
        response.set_cookie(
            self.cookies.name,
            session.id,
            max_age=int(self.services.config.console.session_max_s),
            **self.cookies.attributes(),  # type: ignore[arg-type]
        )
        response.del_cookie(_LOGIN_NONCE, path="/")
        raise response

    async def logout(self, request: web.Request) -> web.Response:
        session = _caller(request).session
        assert session is not None
        await self.sessions.end(session.id)
        await self.audit(AuditKind.LOGIN, "logout", session.user_id, {})
        response = web.HTTPSeeOther(self.url("/login"))
        response.del_cookie(self.cookies.name, path="/")
        raise response

    async def stylesheet(self, _: web.Request) -> web.Response:
        return web.Response(
            body=_CSS,
            content_type="text/css",
            charset="utf-8",
            headers={"Cache-Control": "public, max-age=3600"},
        )

    # -- pages ----------------------------------------------------------------------------

    def _who(self, request: web.Request) -> str:
        session = _caller(request).session
        assert session is not None
        return session.user_id

    async def overview(self, request: web.Request) -> web.Response:
        raw_days = request.query.get("days", "30")
        days = int(raw_days) if raw_days.isdigit() and int(raw_days) in RANGES else 30
        data = await self.read.overview(self.services.ready, days, int(self.clock() * 1000))
        return self.render(request, "overview.html", nav="overview", o=data, ranges=RANGES)

    async def verify(self, request: web.Request) -> web.Response:
        who = self._who(request)
        try:
            previous = self.services.config.audit_settings().previous_public_keys
            earlier = [load_public_key(p.read_bytes()) for p in previous]
        except (OSError, ValueError, SigningKeyError) as e:
            return self.error(request, 500, "Cannot verify", f"audit.previous_public_keys: {e}")
        started = time.monotonic()
        report = await self.services.verify_archive(earlier)
        result = {
            "ts": now_ms(),
            "by": who,
            "ok": report.ok,
            "records": report.records_checked,
            "checkpoints": report.checkpoints_checked,
            "signed_seq": report.signed_seq,
            "tail_records": report.tail_records,
            "first_bad_seq": report.first_bad_seq,
            "problem": report.problem,
            "seconds": round(time.monotonic() - started, 1),
        }
        await self.services.store.keys.op_key()
        await self.services.store.state.set(LAST_VERIFY_KEY, json.dumps(result))
        await self.audit(AuditKind.ACCESS, "verify", who, {"ok": report.ok})
        raise web.HTTPSeeOther(self.url("/"))

    async def incidents(self, request: web.Request) -> web.Response:
        try:
            f = IncidentFilters.parse(request.query)
            page = await self.read.incidents(f)
        except FilterError as e:
            return self.error(request, 400, "Filter not understood", str(e))
        if f.as_query():
            await self.audit(AuditKind.ACCESS, "search", self._who(request), {
                "page": "incidents", "filters": f.as_query()
            })  # fmt: skip
        return self.render(request, "incidents.html", nav="incidents", f=f, page=page)

    async def incident(self, request: web.Request) -> web.Response:
        return await self._record_page(request, "incident.html", "incidents")

    async def archive(self, request: web.Request) -> web.Response:
        try:
            f = SearchFilters.parse(request.query)
        except FilterError as e:
            return self.error(request, 400, "Filter not understood", str(e))
        searched = bool(f.as_query()) or "go" in request.query
        page = await self.read.search(f) if searched else None
        if searched:
            await self.audit(AuditKind.ACCESS, "search", self._who(request), {
                "page": "archive", "filters": f.as_query(), "before": f.before
            })  # fmt: skip
        return self.render(request, "archive.html", nav="archive", f=f, page=page, body_of=_body_of)

    async def record(self, request: web.Request) -> web.Response:
        return await self._record_page(request, "record.html", "archive")

    async def _record_page(self, request: web.Request, template: str, nav: str) -> web.Response:
        raw = request.match_info["seq"]
        if not raw.isdigit() or len(raw) > 19:
            return self.error(request, 404, "No such record", "Records are numbered 1, 2, 3 …")
        rec = await self.read.record(int(raw))
        if rec is None:
            return self.error(request, 404, "No such record", f"There is no record {raw}.")
        await self.audit(AuditKind.ACCESS, "view", self._who(request), {"seq": int(raw)})
        return self.render(
            request, template, nav=nav, rec=rec, incident=incident_of(rec), body_of=_body_of
        )

    async def export(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        fmt = _field(form, "format", 10)
        if fmt not in exporting.FORMATS:
            return self.error(request, 400, "Export refused", "Choose JSONL or CSV.")
        try:
            f = SearchFilters.parse({k: _field(form, k, 500) for k in SearchFilters.__slots__})
        except FilterError as e:
            return self.error(request, 400, "Filter not understood", str(e))
        who = self._who(request)
        await self.audit(AuditKind.EXPORT, "console", who, {"format": fmt, "filters": f.as_query()})
        return await exporting.stream(request, self.services.store, f, fmt)

    async def policies(self, request: web.Request) -> web.Response:
        cfg = self.services.config
        policy = self.services.policy
        rows = policy_rows(
            cfg.dlp,
            policy.runtime_dlp,
            {"federation": cfg.federation.scopes, "retention": cfg.retention.scopes},
            {"federation": policy.doc("federation"), "retention": policy.doc("retention")},
            policy.room_spaces,
        )
        history = await self.read.activity(AuditKind.COMMAND, None)
        changes = [
            r
            for r in history.items
            if str(r.get("type") or "").split(" ")[0] in ("dlp", "federation", "retention")
            or str(r.get("type") or "").startswith(("dlp", "federation", "retention"))
        ]
        return self.render(request, "policies.html", nav="policies", rows=rows, changes=changes)

    async def rooms(self, request: web.Request) -> web.Response:
        return self.render(request, "rooms.html", nav="rooms", rooms=await self.read.rooms())

    async def holds(self, request: web.Request) -> web.Response:
        return self.render(
            request,
            "holds.html",
            nav="holds",
            holds=await self.read.holds(),
            message=request.query.get("done", "")[:200],
        )

    async def hold_change(self, request: web.Request) -> web.Response:
        if _caller(request).role is not Role.ADMIN:
            return self.error(
                request, 403, "Not allowed", "Only admins can add or lift legal holds."
            )
        form = await request.post()
        on = request.match_info["action"] == "add"
        scope = _field(form, "scope", 8)
        target = _field(form, "target", 255)
        reason = _field(form, "reason", 1000)
        if scope not in ("room", "user"):
            return self.error(request, 400, "Hold refused", "Choose a room or a user.")
        if scope == "room" and not (target.startswith("!") and len(target) > 1):
            return self.error(request, 400, "Hold refused", "A room ID starts with !")
        if scope == "user" and not (target.startswith("@") and ":" in target):
            return self.error(request, 400, "Hold refused", "A user ID looks like @name:server")
        if not reason:
            return self.error(request, 400, "Hold refused", "Give a reason; it is recorded.")
        outcome = await self.services.store.holds.set(
            scope, target, on, by=self._who(request), reason=reason
        )
        done = {
            "on": "Hold added.",
            "off": "Hold lifted.",
            "unchanged": "Nothing changed (already so).",
            "config": "This hold comes from the configuration; only the configuration can lift it.",
        }[outcome]
        raise web.HTTPSeeOther(self.url("/holds", {"done": done}))

    async def activity(self, request: web.Request) -> web.Response:
        kind = request.query.get("kind", "")
        if kind and kind not in ACTIVITY_KINDS:
            return self.error(request, 400, "Filter not understood", "Unknown kind.")
        before_raw = request.query.get("before", "")
        before = int(before_raw) if before_raw.isdigit() and len(before_raw) < 20 else None
        page = await self.read.activity(kind, before)
        return self.render(
            request,
            "activity.html",
            nav="activity",
            page=page,
            kind=kind,
            kinds=[k.value for k in ACTIVITY_KINDS],
        )

    # -- the application ------------------------------------------------------------------

    def public_handlers(self) -> tuple[Handler, ...]:
        """The routes reachable without a session."""
        return (
            self.login_page,
            self.login_password,
            self.login_sso,
            self.login_sso_callback,
            self.stylesheet,
        )

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/", self.overview),
            web.get("/login", self.login_page),
            web.post("/login", self.login_password),
            web.get("/login/sso", self.login_sso),
            web.get("/login/sso/callback", self.login_sso_callback),
            web.post("/logout", self.logout),
            web.get("/static/console.css", self.stylesheet),
            web.post("/verify", self.verify),
            web.get("/incidents", self.incidents),
            web.get("/incidents/{seq}", self.incident),
            web.get("/archive", self.archive),
            web.get("/archive/{seq:[0-9]+}", self.record),
            web.post("/archive/export", self.export),
            web.get("/policies", self.policies),
            web.get("/rooms", self.rooms),
            web.get("/holds", self.holds),
            web.post("/holds/{action:add|lift}", self.hold_change),
            web.get("/activity", self.activity),
        ]

    async def _start(self, _: web.Application) -> None:
        self.http = ClientSession()
        await self.sessions.purge()  # left by logins that were never ended

    async def _stop(self, _: web.Application) -> None:
        if self.http is not None:
            await self.http.close()

    def application(self) -> web.Application:
        """The console as an aiohttp application (a sub-application, or its own)."""
        app = web.Application(
            middlewares=[self.headers, self.authenticate], client_max_size=1 << 20
        )
        app.add_routes(self.routes())
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app


def _caller(request: web.Request) -> Caller:
    return request.get(CALLER) or Caller()


def _field(form: MultiDictProxy[Any], name: str, limit: int) -> str:
    value = form.get(name)
    return value.strip()[:limit] if isinstance(value, str) else ""


def _body_of(rec: Mapping[str, Any]) -> str:
    """A short text of a record for lists: a message's body, else a summary of its data."""
    data = rec.get("data")
    if not isinstance(data, Mapping):
        return "(unreadable: " + str(rec.get("unreadable") or "no data") + ")"
    content = data.get("content")
    if isinstance(content, Mapping) and isinstance(content.get("body"), str):
        text = str(content["body"])
    else:
        text = json.dumps(data, ensure_ascii=False, default=str)
    return text if len(text) <= 200 else text[:199] + "…"


def build_console(services: ConsoleServices, base: str) -> web.Application:
    """The console application for ``services``; ``base`` is where it is mounted."""
    return Console(services, base).application()
