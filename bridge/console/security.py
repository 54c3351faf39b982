"""The console's web security primitives: session IDs, CSRF tokens, cookies, headers, and
the login rate limiter. No I/O.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import OrderedDict, deque
from dataclasses import dataclass

#: Every page: nothing but our own stylesheet and inline SVG / data: images; no script at all.
CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
}
#: Pages that show data are never stored by browsers or proxies.
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}

_CSRF_LABEL = b"policy-bridge console csrf v1"


def new_session_id() -> str:
    """A fresh session ID: 256 random bits, URL-safe."""
    return secrets.token_urlsafe(32)


def csrf_token(session_id: str) -> str:
    """The session's synchronizer token: an HMAC keyed by the (secret) session ID, so it is
    bound to the session and cannot be computed without its cookie."""
    return hmac.new(session_id.encode(), _CSRF_LABEL, hashlib.sha256).hexdigest()


def csrf_valid(session_id: str, given: str | None) -> bool:
    """Whether ``given`` is the session's CSRF token (compared in constant time)."""
    if not given:
        return False
    return hmac.compare_digest(csrf_token(session_id).encode(), given.encode("utf-8", "replace"))


@dataclass(frozen=True, slots=True)
class CookiePolicy:
    """How the session cookie is named and flagged."""

    secure: bool

    @property
    def name(self) -> str:
        """``__Host-`` (Secure, Path=/, no Domain: the browser enforces it) when secure."""
        return "__Host-policy-console" if self.secure else "policy-console"

    @property
    def sso_state_name(self) -> str:
        """The short-lived cookie binding an SSO round trip to the browser that began it."""
        return "__Host-policy-console-sso" if self.secure else "policy-console-sso"

    def attributes(self, *, strict: bool = True) -> dict[str, str | bool]:
        """Cookie attributes for aiohttp's ``set_cookie`` (``strict`` False: SameSite=Lax,
        for the SSO state cookie, which must survive the homeserver's redirect back)."""
        return {
            "path": "/",
            "httponly": True,
            "secure": self.secure,
            "samesite": "Strict" if strict else "Lax",
        }


class RateLimiter:
    """At most ``limit`` attempts per key within ``window`` seconds (sliding window).

    Bounded: at most ``max_keys`` keys are tracked (the least recently used are dropped).
    """

    def __init__(self, limit: int, window: float, max_keys: int = 100_000) -> None:
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self._hits: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, key: str, now: float) -> deque[float]:
        hits = self._hits.get(key)
        if hits is None:
            return deque()
        while hits and hits[0] <= now - self.window:
            hits.popleft()
        return hits

    def blocked(self, key: str, now: float) -> bool:
        """Whether ``key`` has used up its attempts."""
        return len(self._recent(key, now)) >= self.limit

    def retry_after(self, key: str, now: float) -> float:
        """Seconds until ``key`` may try again (0 if it may now)."""
        hits = self._recent(key, now)
        if len(hits) < self.limit:
            return 0.0
        return max(0.0, hits[0] + self.window - now)

    def hit(self, key: str, now: float) -> None:
        """Count one attempt of ``key``."""
        hits = self._recent(key, now)
        hits.append(now)
        self._hits[key] = hits
        self._hits.move_to_end(key)
        while len(self._hits) > self.max_keys:
            self._hits.popitem(last=False)


def neutralise_cell(value: str) -> str:
    """A CSV cell that spreadsheets will not run as a formula (= + - @, tab, CR first):
    prefixed with an apostrophe."""
    if value and value[0] in "=+-@\t\r":
        return "'" + value
    return value
