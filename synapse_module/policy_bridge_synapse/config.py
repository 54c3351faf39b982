"""The module's configuration: read and checked once, when Synapse loads its config.

Pure and standard library only: every problem is a :class:`ModuleConfigError` naming the key
(its ``path``), the value that is wrong and what was expected.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from urllib.parse import urlsplit


class Callback(str, Enum):
    """The spam-checker callbacks the module can forward to the gate."""

    CHECK_EVENT_FOR_SPAM = "check_event_for_spam"
    USER_MAY_INVITE = "user_may_invite"
    FEDERATED_USER_MAY_INVITE = "federated_user_may_invite"
    USER_MAY_JOIN_ROOM = "user_may_join_room"
    USER_MAY_CREATE_ROOM = "user_may_create_room"
    USER_MAY_SEND_STATE_EVENT = "user_may_send_state_event"
    CHECK_MEDIA_FILE_FOR_SPAM = "check_media_file_for_spam"
    USER_MAY_CREATE_ROOM_ALIAS = "user_may_create_room_alias"
    # Not in Synapse 1.163's module API: forwarding it makes the module refuse to load there.
    ACCEPT_MAKE_JOIN = "accept_make_join"


class MediaKind(str, Enum):
    """Where a file handed to ``check_media_file_for_spam`` comes from."""

    UPLOAD = "upload"  # a local user's upload
    REMOTE = "remote"  # media of another server, fetched for a local user
    THUMBNAIL = "thumbnail"  # a thumbnail Synapse made (of an upload or of remote media)
    URL_PREVIEW = "url_preview"  # a web page or image fetched for a URL preview


class MediaDelivery(str, Enum):
    """How a file reaches the gate."""

    BODY = "body"  # its bytes, streamed in the request body
    PATH = "path"  # its path in the media store, which the bridge reads too (shared)


#: Forwarded when ``enabled_callbacks`` is not given.
DEFAULT_CALLBACKS: tuple[Callback, ...] = (
    Callback.CHECK_EVENT_FOR_SPAM,
    Callback.USER_MAY_INVITE,
    Callback.FEDERATED_USER_MAY_INVITE,
    Callback.USER_MAY_JOIN_ROOM,
    Callback.USER_MAY_CREATE_ROOM,
    Callback.USER_MAY_SEND_STATE_EVENT,
    Callback.CHECK_MEDIA_FILE_FOR_SPAM,
    Callback.USER_MAY_CREATE_ROOM_ALIAS,
)
#: Callbacks that let the operation through when the gate cannot answer, unless configured.
#: Events refused too late are repaired on the bridge's ingest path (redacted).
DEFAULT_FAIL_OPEN: frozenset[Callback] = frozenset({Callback.CHECK_EVENT_FOR_SPAM})
#: Files sent for scanning by default: thumbnails are made from a file that was checked.
DEFAULT_MEDIA_KINDS: tuple[MediaKind, ...] = (MediaKind.UPLOAD, MediaKind.REMOTE)
DEFAULT_TIMEOUT = 10.0
DEFAULT_MEDIA_TIMEOUT = 60.0
DEFAULT_MEDIA_MAX_BYTES = 50 * 1024 * 1024
MAX_TIMEOUT = 600.0

KEYS = frozenset(
    {
        "base_url",
        "authorization",
        "authorization_path",
        "enabled_callbacks",
        "fail_open",
        "timeout",
        "media_timeout",
        "media_max_bytes",
        "media_kinds",
        "media_delivery",
        "do_ping",
    }
)


class ModuleConfigError(ValueError):
    """A configuration problem; ``path`` is the key under the module's ``config:``."""

    def __init__(self, message: str, path: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.path = tuple(path)


@dataclass(frozen=True)
class ModuleConfig:
    """The checked configuration."""

    base_url: str
    token: str
    callbacks: tuple[Callback, ...] = DEFAULT_CALLBACKS
    fail_open: frozenset[Callback] = DEFAULT_FAIL_OPEN
    timeout: float = DEFAULT_TIMEOUT
    media_timeout: float = DEFAULT_MEDIA_TIMEOUT
    media_max_bytes: int = DEFAULT_MEDIA_MAX_BYTES
    media_kinds: frozenset[MediaKind] = field(
        default_factory=lambda: frozenset(DEFAULT_MEDIA_KINDS)
    )
    media_delivery: MediaDelivery = MediaDelivery.BODY
    do_ping: bool = False

    def url(self, callback: str) -> str:
        """Where ``callback`` (or ``ping``) is POSTed."""
        return f"{self.base_url}/{callback}"

    def fails_open(self, callback: Callback) -> bool:
        """Whether ``callback`` lets the operation through when the gate cannot answer."""
        return callback in self.fail_open


def _names(enum: type[Enum]) -> str:
    return ", ".join(str(m.value) for m in enum)


def _base_url(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ModuleConfigError(
            "expected the URL of the bridge's gate, e.g. http://bridge:29330/_bridge/antispam",
            ("base_url",),
        )
    url = value.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ModuleConfigError(
            f"{value!r} is not an http(s) URL with a host; expected e.g. "
            "http://bridge:29330/_bridge/antispam",
            ("base_url",),
        )
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ModuleConfigError(
            f"{value!r} must not hold a query, a fragment or credentials "
            "(the token goes in 'authorization')",
            ("base_url",),
        )
    try:
        parts.port  # noqa: B018  (raises on a bad port)
    except ValueError:
        raise ModuleConfigError(f"{value!r} has an invalid port", ("base_url",)) from None
    return url


def _token(data: Mapping[str, object]) -> str:
    inline, path = data.get("authorization"), data.get("authorization_path")
    if inline is not None and path is not None:
        raise ModuleConfigError(
            "set either 'authorization' or 'authorization_path', not both", ("authorization",)
        )
    if path is not None:
        if not isinstance(path, str) or not path:
            raise ModuleConfigError(
                "expected the path of a file holding the token", ("authorization_path",)
            )
        try:
            token = Path(path).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ModuleConfigError(
                f"cannot read the token file {path}: {e.__class__.__name__}",
                ("authorization_path",),
            ) from None
        where = "authorization_path"
    elif inline is not None:
        if not isinstance(inline, str):
            raise ModuleConfigError("expected the gate token as a string", ("authorization",))
        token, where = inline.strip(), "authorization"
    else:
        raise ModuleConfigError(
            "missing token: set 'authorization' (the bridge's gate.token) or "
            "'authorization_path' (a file holding it)",
            ("authorization",),
        )
    if not token:
        raise ModuleConfigError("the gate token is empty", (where,))
    if any(c.isspace() or not c.isprintable() for c in token):
        raise ModuleConfigError(
            "the gate token must not contain spaces or control characters", (where,)
        )
    return token


def _callback(value: object, where: tuple[str, ...]) -> Callback:
    try:
        return Callback(value)
    except ValueError:
        raise ModuleConfigError(
            f"unknown callback {value!r}; expected one of {_names(Callback)}", where
        ) from None


def _callbacks(value: object) -> tuple[Callback, ...]:
    if value is None:
        return DEFAULT_CALLBACKS
    if not isinstance(value, list) or not value:
        raise ModuleConfigError(
            f"expected a non-empty list of callbacks, some of {_names(Callback)}",
            ("enabled_callbacks",),
        )
    out = [_callback(v, ("enabled_callbacks", str(i))) for i, v in enumerate(value)]
    return tuple(dict.fromkeys(out))


def _fail_open(value: object, enabled: tuple[Callback, ...]) -> frozenset[Callback]:
    if value is None:
        return DEFAULT_FAIL_OPEN
    if not isinstance(value, Mapping):
        raise ModuleConfigError(
            "expected a mapping of callback name to true (fail open) or false (fail closed)",
            ("fail_open",),
        )
    chosen = set(DEFAULT_FAIL_OPEN)
    for name, flag in value.items():
        callback = _callback(name, ("fail_open", str(name)))
        if not isinstance(flag, bool):
            raise ModuleConfigError(
                f"expected true or false, got {flag!r}", ("fail_open", str(name))
            )
        if callback not in enabled:
            raise ModuleConfigError(
                f"{callback.value} is not in enabled_callbacks, so it has no fail mode",
                ("fail_open", str(name)),
            )
        if flag:
            chosen.add(callback)
        else:
            chosen.discard(callback)
    return frozenset(chosen)


def _seconds(value: object, key: str, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ModuleConfigError(f"expected a number of seconds, got {value!r}", (key,))
    seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0 or seconds > MAX_TIMEOUT:
        raise ModuleConfigError(
            f"expected more than 0 and at most {MAX_TIMEOUT:.0f} seconds, got {value!r}", (key,)
        )
    return seconds


def _max_bytes(value: object) -> int:
    if value is None:
        return DEFAULT_MEDIA_MAX_BYTES
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ModuleConfigError(
            f"expected a positive number of bytes, got {value!r}", ("media_max_bytes",)
        )
    return value


def _media_kinds(value: object) -> frozenset[MediaKind]:
    if value is None:
        return frozenset(DEFAULT_MEDIA_KINDS)
    if not isinstance(value, list):
        raise ModuleConfigError(
            f"expected a list, some of {_names(MediaKind)} (may be empty)", ("media_kinds",)
        )
    kinds = set()
    for i, item in enumerate(value):
        try:
            kinds.add(MediaKind(item))
        except ValueError:
            raise ModuleConfigError(
                f"unknown media kind {item!r}; expected some of {_names(MediaKind)}",
                ("media_kinds", str(i)),
            ) from None
    return frozenset(kinds)


def _media_delivery(value: object) -> MediaDelivery:
    if value is None:
        return MediaDelivery.BODY
    try:
        return MediaDelivery(value)
    except ValueError:
        raise ModuleConfigError(
            f"expected one of {_names(MediaDelivery)}, got {value!r}", ("media_delivery",)
        ) from None


def parse_module_config(data: object) -> ModuleConfig:
    """Check the module's ``config:`` mapping from homeserver.yaml.

    Raises :class:`ModuleConfigError` on the first problem (unknown keys, a bad base_url, a
    missing or empty token, unknown callbacks, bad fail modes, timeouts or limits).
    """
    if not isinstance(data, Mapping):
        raise ModuleConfigError("expected a mapping with at least base_url and authorization")
    unknown = sorted(str(k) for k in data if k not in KEYS)
    if unknown:
        raise ModuleConfigError(
            f"unknown option(s) {', '.join(unknown)}; known options: {', '.join(sorted(KEYS))}",
            (unknown[0],),
        )
    callbacks = _callbacks(data.get("enabled_callbacks"))
    do_ping = data.get("do_ping", False)
    if not isinstance(do_ping, bool):
        raise ModuleConfigError(f"expected true or false, got {do_ping!r}", ("do_ping",))
    return ModuleConfig(
        base_url=_base_url(data.get("base_url")),
        token=_token(data),
        callbacks=callbacks,
        fail_open=_fail_open(data.get("fail_open"), callbacks),
        timeout=_seconds(data.get("timeout"), "timeout", DEFAULT_TIMEOUT),
        media_timeout=_seconds(data.get("media_timeout"), "media_timeout", DEFAULT_MEDIA_TIMEOUT),
        media_max_bytes=_max_bytes(data.get("media_max_bytes")),
        media_kinds=_media_kinds(data.get("media_kinds")),
        media_delivery=_media_delivery(data.get("media_delivery")),
        do_ping=do_ping,
    )


def media_kind(*, thumbnail: bool, url_cache: bool, remote: bool) -> MediaKind:
    """The kind of a file from Synapse's ``FileInfo``: a thumbnail first (of anything), then
    a URL preview, then remote media, else a local upload."""
    if thumbnail:
        return MediaKind.THUMBNAIL
    if url_cache:
        return MediaKind.URL_PREVIEW
    if remote:
        return MediaKind.REMOTE
    return MediaKind.UPLOAD


#: Synapse versions (major, minor) from which each callback is forwarded with full context.
#: ``user_may_create_room`` exists since 1.37 but receives the createRoom body (a second
#: parameter) only since 1.132; on older versions it would be called with the user alone.
MIN_VERSION: Mapping[Callback, tuple[int, int]] = {
    Callback.USER_MAY_CREATE_ROOM: (1, 132),
    Callback.USER_MAY_SEND_STATE_EVENT: (1, 132),
}


def parse_version(text: str) -> tuple[int, int]:
    """``"1.163.2"`` / ``"1.132.0rc1"`` -> ``(1, 163)`` / ``(1, 132)``; ``(0, 0)`` if unreadable."""
    numbers: list[int] = []
    for part in text.split(".")[:2]:
        digits = ""
        for ch in part:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            return (0, 0)
        numbers.append(int(digits))
    return (numbers[0], numbers[1]) if len(numbers) == 2 else (0, 0)


def unsupported(
    callbacks: Sequence[Callback], parameters: Sequence[str], version: str
) -> list[str]:
    """Why this Synapse cannot take the callbacks to forward; empty when it can.

    ``parameters``: the parameters of its ``register_spam_checker_callbacks``;
    ``version``: its version string.
    """
    problems = []
    have = parse_version(version)
    for callback in callbacks:
        needed = MIN_VERSION.get(callback)
        if callback.value not in parameters:
            problems.append(
                f"{callback.value}: this Synapse ({version}) has no such spam-checker callback"
                + (f" (added in Synapse {needed[0]}.{needed[1]})" if needed else "")
            )
        elif needed is not None and have < needed:
            problems.append(
                f"{callback.value}: this Synapse ({version}) does not pass the full context "
                f"(needs Synapse {needed[0]}.{needed[1]} or later)"
            )
    return problems
