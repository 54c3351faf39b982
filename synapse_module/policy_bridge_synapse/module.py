"""The Synapse module: Synapse's spam-checker callbacks, forwarded to the bridge's gate.

Protocol (the one ``synapse-http-antispam`` speaks, so a gate serves both modules):
``POST {base_url}/{callback}`` with a JSON body and ``Authorization: Bearer <token>``.
2xx with a JSON body allows; 4xx with ``{"errcode", "error"}`` refuses, with that error;
anything else (unreachable, timeout, 5xx, not JSON) is a failure, and the callback's fail
mode decides (``fail_open``). Files go to ``POST {base_url}/check_media_file_for_spam`` as
``application/octet-stream`` with ``X-Bridge-Media-*`` headers; with ``media_delivery: path``
only their path in the media store (``X-Bridge-Media-Path``, empty body), and the bytes
after all when the gate answers 409 ``BRIDGE_MEDIA_PATH_UNREADABLE`` (it cannot read the
store).

The module never logs what it forwards: only the callback, the HTTP status, the duration
and, on failure, the error's class.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO, Literal
from urllib.parse import parse_qs, quote, urlsplit

import synapse
from synapse.logging.context import current_context
from synapse.media._base import FileInfo
from synapse.media.media_storage import ReadableFileWrapper
from synapse.module_api import NOT_SPAM, EventBase, ModuleApi
from synapse.module_api.errors import Codes, ConfigError
from synapse.types import RoomAlias
from twisted.internet import defer

from policy_bridge_synapse.config import (
    Callback,
    MediaDelivery,
    MediaKind,
    ModuleConfig,
    ModuleConfigError,
    media_kind,
    parse_module_config,
    unsupported,
)
from policy_bridge_synapse.transport import Reply, Transport, TwistedTransport

log = logging.getLogger(__name__)

Allow = Literal["NOT_SPAM"]
Refusal = tuple[Codes, dict[str, Any]]

#: What the client sees when the gate cannot answer and the callback fails closed.
UNREACHABLE = "the policy service could not check this request; try again later"
#: Longest refusal text passed on to the client.
MAX_ERROR_CHARS = 2000
#: Keys of an event in the client format the gate reads.
CLIENT_KEYS = ("type", "room_id", "sender", "content", "state_key", "origin_server_ts", "redacts")
PING_INTERVAL = 5.0
#: The gate's errcode (with 409) for "send the bytes: I cannot read that path".
PATH_UNREADABLE = "BRIDGE_MEDIA_PATH_UNREADABLE"


@dataclass(frozen=True)
class Outcome:
    """What one call came to: allowed, refused (errcode, error), or failed (error class)."""

    allowed: bool
    errcode: Codes = Codes.FORBIDDEN
    error: str = ""
    failure: str = ""
    send_bytes: bool = False  # the gate could not read the file by its path


class PolicyBridgeModule:
    """``policy_bridge_synapse.PolicyBridgeModule`` in homeserver.yaml's ``modules:``."""

    def __init__(
        self,
        config: ModuleConfig,
        api: ModuleApi,
        *,
        transport: Transport | None = None,
        synapse_version: str | None = None,
    ) -> None:
        """Register the configured callbacks; refuse to load (``ConfigError``) when this
        Synapse cannot call one of them with its full context."""
        self.config = config
        self.api = api
        version = synapse_version if synapse_version is not None else synapse.__version__
        parameters = list(inspect.signature(api.register_spam_checker_callbacks).parameters)
        problems = unsupported(config.callbacks, parameters, version)
        if problems:
            raise ConfigError(
                "policy_bridge_synapse cannot load: "
                + "; ".join(problems)
                + ". Remove these from enabled_callbacks or upgrade Synapse."
            )
        if transport is None:
            from twisted.internet import reactor

            transport = TwistedTransport(reactor)
        self.transport = transport
        handlers = {
            Callback.CHECK_EVENT_FOR_SPAM: self.check_event_for_spam,
            Callback.USER_MAY_INVITE: self.user_may_invite,
            Callback.FEDERATED_USER_MAY_INVITE: self.federated_user_may_invite,
            Callback.USER_MAY_JOIN_ROOM: self.user_may_join_room,
            Callback.USER_MAY_CREATE_ROOM: self.user_may_create_room,
            Callback.USER_MAY_SEND_STATE_EVENT: self.user_may_send_state_event,
            Callback.CHECK_MEDIA_FILE_FOR_SPAM: self.check_media_file_for_spam,
            Callback.ACCEPT_MAKE_JOIN: self.accept_make_join,
            Callback.USER_MAY_CREATE_ROOM_ALIAS: self.user_may_create_room_alias,
        }
        api.register_spam_checker_callbacks(
            **{c.value: handlers[c] for c in config.callbacks}  # type: ignore[arg-type]
        )
        log.info(
            "policy bridge module: forwarding %s to %s",
            ", ".join(c.value for c in config.callbacks),
            config.base_url,
        )
        if config.do_ping:
            defer.ensureDeferred(self._ping_until_answered())

    @staticmethod
    def parse_config(config: Mapping[str, Any]) -> ModuleConfig:
        """Called by Synapse when it reads homeserver.yaml; problems stop it with their key."""
        try:
            return parse_module_config(config)
        except ModuleConfigError as e:
            raise ConfigError(e.message, e.path) from None

    # -- the HTTP exchange ----------------------------------------------------------------

    def _headers(self, content_type: str) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {self.config.token}",
            "Content-Type": content_type,
            "User-Agent": "policy-bridge-synapse",
        }

    async def _exchange(
        self, callback: Callback, headers: Mapping[str, str], body: Any, time_limit: float
    ) -> Outcome:
        """POST one callback and read the gate's decision. Logs no content, ever."""
        started = time.monotonic()
        try:
            reply = await self.transport.post(
                self.config.url(callback.value), headers, body, time_limit
            )
        except Exception as e:  # any failure to get an answer: the fail mode decides
            return self._failed(callback, started, e.__class__.__name__)
        outcome = _decision(reply)
        ms = (time.monotonic() - started) * 1000
        if outcome.send_bytes:
            return outcome
        if outcome.failure:
            return self._failed(callback, started, outcome.failure, reply.status)
        if outcome.allowed:
            log.debug("gate allowed %s (HTTP %d, %.0f ms)", callback.value, reply.status, ms)
        else:
            log.info(
                "gate refused %s (HTTP %d, %s, %.0f ms)",
                callback.value,
                reply.status,
                outcome.errcode.value,
                ms,
            )
        return outcome

    def _failed(self, callback: Callback, started: float, what: str, status: int = 0) -> Outcome:
        fail_open = self.config.fails_open(callback)
        log.warning(
            "gate call %s failed after %.0f ms: %s%s; failing %s",
            callback.value,
            (time.monotonic() - started) * 1000,
            what,
            f" (HTTP {status})" if status else "",
            "open (allowed)" if fail_open else "closed (refused)",
        )
        if fail_open:
            return Outcome(allowed=True, failure=what)
        return Outcome(allowed=False, errcode=Codes.UNKNOWN, error=UNREACHABLE, failure=what)

    async def _call(self, callback: Callback, payload: Mapping[str, Any]) -> Outcome:
        try:
            body = json.dumps(payload, separators=(",", ":"), default=_jsonable).encode("utf-8")
        except (TypeError, ValueError) as e:
            return self._failed(callback, time.monotonic(), e.__class__.__name__)
        return await self._exchange(
            callback, self._headers("application/json"), body, self.config.timeout
        )

    async def _answer(self, callback: Callback, payload: Mapping[str, Any]) -> Allow | Refusal:
        outcome = await self._call(callback, payload)
        return NOT_SPAM if outcome.allowed else (outcome.errcode, {"error": outcome.error})

    # -- the callbacks --------------------------------------------------------------------

    async def check_event_for_spam(self, event: EventBase) -> Allow | Refusal:
        """Every event a local client sends, and federated events (soft-failed if refused)."""
        return await self._answer(Callback.CHECK_EVENT_FOR_SPAM, {"event": client_event(event)})

    async def user_may_invite(self, inviter: str, invitee: str, room_id: str) -> Allow | Refusal:
        """A local user invites someone."""
        payload = {"inviter": inviter, "invitee": invitee, "room_id": room_id}
        return await self._answer(Callback.USER_MAY_INVITE, payload)

    async def federated_user_may_invite(self, event: EventBase) -> Allow | Refusal:
        """A remote user invites a local one."""
        return await self._answer(
            Callback.FEDERATED_USER_MAY_INVITE, {"event": client_event(event)}
        )

    async def user_may_join_room(self, user: str, room: str, is_invited: bool) -> Allow | Refusal:
        """A local user joins a room."""
        payload = {"user": user, "room": room, "is_invited": is_invited}
        return await self._answer(Callback.USER_MAY_JOIN_ROOM, payload)

    async def accept_make_join(self, user: str, room: str) -> Allow | Refusal:
        """A remote user asks to join through this server (Synapses that offer it)."""
        return await self._answer(Callback.ACCEPT_MAKE_JOIN, {"user": user, "room": room})

    async def user_may_create_room(
        self, user_id: str, room_config: Mapping[str, Any]
    ) -> Allow | Refusal:
        """A local user creates (or upgrades) a room: the whole createRoom body goes along."""
        payload = {"user_id": user_id, "room_config": room_config}
        return await self._answer(Callback.USER_MAY_CREATE_ROOM, payload)

    async def user_may_create_room_alias(
        self, user_id: str, room_alias: RoomAlias
    ) -> Allow | Refusal:
        """A local user creates an alias (``PUT /directory/room/{alias}``, or createRoom's
        ``room_alias_name``): its name is shown in the directory and to the room."""
        payload = {"user_id": user_id, "room_alias": room_alias.to_string()}
        return await self._answer(Callback.USER_MAY_CREATE_ROOM_ALIAS, payload)

    async def user_may_send_state_event(
        self,
        user_id: str,
        room_id: str,
        event_type: str,
        state_key: str,
        content: Mapping[str, Any],
    ) -> Allow | Codes:
        """A state event sent through ``PUT /rooms/{room}/state/...``, with its content.

        Synapse accepts only an error code here (a tuple is logged as invalid and replaced by
        ``M_FORBIDDEN``): the client sees the code, not the gate's text.
        """
        payload = {
            "user_id": user_id,
            "room_id": room_id,
            "event_type": event_type,
            "state_key": state_key,
            "content": content,
        }
        outcome = await self._call(Callback.USER_MAY_SEND_STATE_EVENT, payload)
        return NOT_SPAM if outcome.allowed else outcome.errcode

    async def check_media_file_for_spam(
        self, file_wrapper: ReadableFileWrapper, file_info: FileInfo
    ) -> Allow | Refusal:
        """A file Synapse is about to store: streamed to the gate up to ``media_max_bytes``.

        Kinds not in ``media_kinds`` (by default thumbnails and URL previews) pass unsent.
        A larger file is announced with an empty body and ``X-Bridge-Media-Over-Limit: 1``.
        The user whose request this is (the uploader; for remote media, who asked for it)
        goes in ``X-Bridge-Media-User``, so the bridge can tell them why a file was refused:
        Synapse answers every refused upload with "Bad content", the rule's text dropped.
        An upload's file name (``?filename=``, which Synapse stores and serves with the
        file) goes in ``X-Bridge-Media-Name``, percent-encoded: it is text a user chose.
        """
        callback = Callback.CHECK_MEDIA_FILE_FOR_SPAM
        kind = media_kind(
            thumbnail=file_info.thumbnail is not None,
            url_cache=bool(file_info.url_cache),
            remote=bool(file_info.server_name),
        )
        if kind not in self.config.media_kinds:
            return NOT_SPAM
        started = time.monotonic()
        try:
            handle = _open(file_wrapper.path)
        except OSError as e:
            outcome = self._failed(callback, started, e.__class__.__name__)
        else:
            request = _request()
            with handle:
                outcome = await self._send_file(
                    callback, kind, file_info.file_id, file_wrapper.path, handle, request
                )
        return NOT_SPAM if outcome.allowed else (outcome.errcode, {"error": outcome.error})

    async def _send_file(
        self,
        callback: Callback,
        kind: MediaKind,
        file_id: str,
        path: str,
        handle: BinaryIO,
        request: RequestFacts,
    ) -> Outcome:
        """The file to the gate: its path (``media_delivery: path``, falling back to its
        bytes when the gate cannot read it) or its bytes, or only its size when over the
        limit."""
        size = os.fstat(handle.fileno()).st_size
        headers = self._headers("application/octet-stream")
        headers["X-Bridge-Media-Kind"] = kind.value
        headers["X-Bridge-Media-Id"] = _header_safe(file_id)
        headers["X-Bridge-Media-Length"] = str(size)
        if request.user_id is not None:
            headers["X-Bridge-Media-User"] = request.user_id
        if request.file_name is not None and kind is MediaKind.UPLOAD:
            encoded, cut = _name_header(request.file_name)
            headers["X-Bridge-Media-Name"] = encoded
            if cut:  # the gate treats a name it cannot read whole as over its bounds
                headers["X-Bridge-Media-Name-Truncated"] = "1"
        time_limit = self.config.media_timeout
        if size > self.config.media_max_bytes:
            headers["X-Bridge-Media-Over-Limit"] = "1"
            return await self._exchange(callback, headers, b"", time_limit)
        if self.config.media_delivery is MediaDelivery.PATH:
            by_path = {**headers, "X-Bridge-Media-Path": quote(path, safe="/")}
            outcome = await self._exchange(callback, by_path, b"", time_limit)
            if not outcome.send_bytes:
                return outcome
            log.warning(
                "gate cannot read %s from the media store (see the bridge's"
                " attachments.shared_media_store); sending the file's bytes",
                callback.value,
            )
        return await self._exchange(callback, headers, handle, time_limit)

    # -- ping -----------------------------------------------------------------------------

    async def _ping_until_answered(self) -> None:
        """``POST {base_url}/ping`` at start until the gate answers (``do_ping``)."""
        while True:
            req_id = secrets.token_hex(8)
            body = json.dumps({"id": req_id}).encode()
            try:
                reply = await self.transport.post(
                    self.config.url("ping"),
                    self._headers("application/json"),
                    body,
                    self.config.timeout,
                )
                answer = json.loads(reply.body) if 200 <= reply.status < 300 else None
            except Exception as e:
                log.warning("gate ping failed: %s; retrying", e.__class__.__name__)
            else:
                if isinstance(answer, dict) and answer.get("id") == req_id:
                    log.info("gate ping answered (HTTP %d)", reply.status)
                    return
                log.warning("gate ping got an unexpected answer (HTTP %d); retrying", reply.status)
            await self.api.sleep(PING_INTERVAL)


def _decision(reply: Reply) -> Outcome:
    """The gate's answer as an outcome (``failure`` set when it is no decision at all)."""
    try:
        body = json.loads(reply.body) if reply.body else None
    except (ValueError, UnicodeDecodeError):
        body = None
    if 200 <= reply.status < 300:
        if isinstance(body, dict):
            return Outcome(allowed=True)
        return Outcome(allowed=False, failure="NotJsonAnswer")
    if reply.status == 409 and isinstance(body, dict) and body.get("errcode") == PATH_UNREADABLE:
        return Outcome(allowed=False, send_bytes=True)
    if 400 <= reply.status < 500 and isinstance(body, dict):
        errcode = body.get("errcode")
        error = body.get("error")
        code = Codes.FORBIDDEN
        if isinstance(errcode, str):
            try:
                code = Codes(errcode)
            except ValueError:
                code = Codes.FORBIDDEN
        text = error[:MAX_ERROR_CHARS] if isinstance(error, str) and error else "refused by policy"
        return Outcome(allowed=False, errcode=code, error=text)
    return Outcome(allowed=False, failure="HttpStatus")


def client_event(event: EventBase) -> dict[str, Any]:
    """An event in the client format the gate reads, with its event ID."""
    raw = event.get_dict()
    out = {key: raw[key] for key in CLIENT_KEYS if key in raw}
    out["event_id"] = event.event_id
    return out


def _jsonable(value: object) -> object:
    """Synapse's frozen mappings and sequences as plain JSON values."""
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, tuple | frozenset | set):
        return list(value)
    raise TypeError(f"cannot send a {value.__class__.__name__} as JSON")


@dataclass(frozen=True)
class RequestFacts:
    """What Synapse's logging context says of the request being served."""

    user_id: str | None = None  # the requester, when a header can carry it
    file_name: str | None = None  # ``?filename=`` of an upload


#: Longest percent-encoded file name sent (the gate's server reads header lines of up to
#: 8 KiB); a longer name is cut there and flagged.
MAX_NAME_HEADER = 6000


def _name_header(name: str) -> tuple[str, bool]:
    """The file name percent-encoded for a header, and whether it had to be cut."""
    encoded = quote(name, safe="")
    if len(encoded) <= MAX_NAME_HEADER:
        return encoded, False
    kept: list[str] = []
    size = 0
    for ch in name:
        part = quote(ch, safe="")
        if size + len(part) > MAX_NAME_HEADER:
            break
        kept.append(part)
        size += len(part)
    return "".join(kept), True


def _request() -> RequestFacts:
    """The requester and the upload's file name of the request Synapse is serving."""
    request = current_context().request
    if request is None:
        return RequestFacts()
    user_id = request.requester
    if not (user_id and user_id.isascii() and user_id.isprintable() and len(user_id) <= 255):
        user_id = None
    names = parse_qs(urlsplit(request.url).query, errors="replace").get("filename")
    return RequestFacts(user_id, names[0] if names and names[0] else None)


def _open(path: str) -> BinaryIO:
    """Open a stored file for reading (a local open: no network file system is awaited)."""
    return open(path, "rb")


def _header_safe(value: str) -> str:
    """A media ID for a header: printable ASCII only (Synapse's IDs are)."""
    return "".join(c for c in value if 0x20 < ord(c) < 0x7F)[:255]
