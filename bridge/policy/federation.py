"""Federation policy: which remote servers may take part in rooms of this homeserver.

Pure logic, no I/O. One :class:`FederationPolicy` drives three things that must agree:

* the gate checks (``user_may_invite``, ``federated_user_may_invite``,
  ``accept_make_join``, ``user_may_join_room``) that refuse a request before Synapse
  acts on it;
* the ``m.room.server_acl`` content the executor keeps in every managed room, so that
  servers already in a room (or joining through another server) are cut off too;
* the list of members to remove when a policy tightens.

Matching follows the ``m.room.server_acl`` rules of the Matrix spec, as Synapse
implements them:

* entries are globs: ``*`` matches any run of characters (including none), ``?``
  exactly one character; no CIDR ranges. Globs are matched with RE2, in time linear in
  the server name whatever the glob (a backtracking matcher needs minutes for
  ``*a*a*a*a*a*a*a*b`` against a 60-character name: one invite would stall the gate);
* entries match the server name *without its port* (``evil.example:8448`` is matched by
  ``evil.example``), and matching is case-insensitive (DNS names are; Synapse compiles
  ACL globs case-insensitively);
* evaluation order: IP literal check (``1.2.3.4`` and ``[::1]`` are refused unless
  ``allow_ip_literals``), then ``deny`` (any match refuses), then ``allow`` (any match
  accepts), else refused.

Our own server is always allowed. A policy whose ACL would lock our own server out of
its rooms (a deny glob that matches it, or an own server that is an IP literal while IP
literals are refused) is a configuration error: :func:`policy_problems` names it and
:func:`acl_content` refuses to build such an ACL.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache
from typing import Any

import re2

from bridge.policy.model import ALLOW, Action, Finding, Verdict, server_name

__all__ = [
    "FederationMode",
    "FederationPolicy",
    "FederationPolicyError",
    "acl_allows",
    "acl_content",
    "acl_matches",
    "check_federated_invite",
    "check_invite",
    "check_local_join",
    "check_remote_join",
    "glob_matches",
    "is_ip_literal",
    "members_to_remove",
    "policy_problems",
    "room_server",
    "server_allowed",
    "strip_port",
]

CATEGORY = "federation"


class FederationPolicyError(ValueError):
    """A federation policy that cannot be used as written (the message says why)."""


class FederationMode(StrEnum):
    """How remote servers are treated."""

    OPEN = "open"  # every server may federate; room ACLs are opened to everyone
    ALLOWLIST = "allowlist"  # only our own server and the listed ones
    DENYLIST = "denylist"  # every server except the listed ones
    INTERNAL = "internal"  # only our own server


_PORT_SUFFIX = re.compile(r":[0-9]+\Z")


def _check_glob(glob: object) -> str:
    """Return ``glob`` if it is a usable server glob, else raise FederationPolicyError."""
    if not isinstance(glob, str):
        raise FederationPolicyError(
            f"server entries must be strings like 'partner.example' or '*.partner.example', "
            f"got {glob!r}"
        )
    if not glob or glob != glob.strip() or any(c.isspace() for c in glob):
        raise FederationPolicyError(
            f"server entry {glob!r} is empty or contains whitespace; "
            "expected a server name like 'partner.example' or '*.partner.example'"
        )
    host = strip_port(glob)
    if host != glob:
        raise FederationPolicyError(
            f"server entry {glob!r} has a port; entries match the server name without "
            f"port: write {host!r}"
        )
    return glob


@dataclass(frozen=True, slots=True)
class FederationPolicy:
    """A federation policy.

    ``servers`` are globs (``*``, ``?``): the allowed servers in ``allowlist`` mode, the
    refused ones in ``denylist`` mode; ignored in ``open`` and ``internal`` mode.
    ``allow_ip_literals`` lets servers named by an IP address (``10.0.0.5``,
    ``[2001:db8::1]``) federate; refused by default, as the spec recommends.
    """

    mode: FederationMode
    servers: tuple[str, ...] = ()
    allow_ip_literals: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.mode, FederationMode):
            try:
                object.__setattr__(self, "mode", FederationMode(self.mode))
            except ValueError:
                choices = ", ".join(m.value for m in FederationMode)
                raise FederationPolicyError(
                    f"unknown federation mode {self.mode!r}; expected one of {choices}"
                ) from None
        if isinstance(self.servers, str):
            raise FederationPolicyError(
                f"servers must be a list of server names, got the string {self.servers!r}"
            )
        servers = tuple(_check_glob(g) for g in self.servers)
        object.__setattr__(self, "servers", servers)
        if not isinstance(self.allow_ip_literals, bool):
            raise FederationPolicyError(
                f"allow_ip_literals must be true or false, got {self.allow_ip_literals!r}"
            )


# --- server names and globs -------------------------------------------------------------


def strip_port(server: str) -> str:
    """The host part of a server name: ``a.example:8448`` -> ``a.example``,
    ``[::1]:8448`` -> ``[::1]``; a name without port is returned unchanged."""
    if server.startswith("["):
        end = server.find("]")
        if end != -1 and (end + 1 == len(server) or _PORT_SUFFIX.match(server, end + 1)):
            return server[: end + 1]
        return server
    return _PORT_SUFFIX.sub("", server)


def is_ip_literal(server: str) -> bool:
    """Whether a server name (port allowed) is an IP literal: dotted IPv4 or ``[IPv6]``.

    Like Synapse, anything that starts with ``[`` counts as an IPv6 literal.
    """
    host = strip_port(server)
    if host.startswith("["):
        return True
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


def _glob_to_re2(glob: str) -> str:
    """An RE2 pattern for one glob: ``*`` -> ``.*``, ``?`` -> ``.``, the rest literal."""
    out = []
    for ch in glob:
        if ch == "*":
            out.append(".*")
        elif ch == "?":
            out.append(".")
        elif ch.isascii() and not ch.isalnum():
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


def _re2_options() -> re2.Options:
    options = re2.Options()
    options.log_errors = False
    options.case_sensitive = False  # DNS names are case-insensitive, as Synapse matches
    options.dot_nl = True
    options.max_mem = 64 << 20
    return options


def _valid_utf8(text: str) -> str:
    """``text`` without lone surrogates (which cannot reach RE2), replaced by ``?``."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")
    return text


@lru_cache(maxsize=1024)
def _compile(globs: tuple[str, ...]) -> Callable[[str], bool] | None:
    """A case-insensitive matcher: whether a name is matched, as a whole, by any of ``globs``.

    One RE2 alternation (linear time in the name); if RE2 refuses it as too large, one RE2
    program per glob, and a glob RE2 refuses even alone never matches.
    """
    if not globs:
        return None
    options = _re2_options()
    parts = [_glob_to_re2(_valid_utf8(glob)) for glob in globs]
    try:
        combined = re2.compile("(?:" + "|".join(parts) + ")", options)
    except re2.error:
        singles = []
        for part in parts:
            try:
                singles.append(re2.compile(part, options))
            except re2.error:
                continue
        return lambda host: any(r.fullmatch(host) is not None for r in singles)
    return lambda host: combined.fullmatch(host) is not None


def _any_match(globs: tuple[str, ...], host: str) -> bool:
    matcher = _compile(globs)
    return matcher is not None and matcher(_valid_utf8(host))


def glob_matches(glob: str, server: str) -> bool:
    """Whether one ACL glob matches a server name (its port ignored), case-insensitively."""
    return _any_match((glob,), strip_port(server))


def _same_server(a: str, b: str) -> bool:
    return strip_port(a).lower() == strip_port(b).lower()


# --- the policy as a predicate ----------------------------------------------------------


def server_allowed(policy: FederationPolicy, own_server: str, server: str) -> bool:
    """Whether ``server`` may federate with us under ``policy``.

    Our own server is always allowed. For other servers the ``m.room.server_acl``
    rules apply to the name without port: IP literals first, then the mode's globs.
    This agrees with :func:`acl_allows` on :func:`acl_content` for every server (except
    IP literals in ``open`` mode when our own server is one: that ACL has to let them in).
    """
    if _same_server(server, own_server):
        return True
    if not policy.allow_ip_literals and is_ip_literal(server):
        return False
    host = strip_port(server)
    match policy.mode:
        case FederationMode.OPEN:
            return True
        case FederationMode.INTERNAL:
            return False
        case FederationMode.ALLOWLIST:
            return _any_match(policy.servers, host)
        case FederationMode.DENYLIST:
            return not _any_match(policy.servers, host)
    raise AssertionError(f"unhandled federation mode {policy.mode!r}")  # pragma: no cover


def _problems(policy: FederationPolicy, own_server: str) -> tuple[list[str], list[str]]:
    """``(lockouts, ineffective)``: what would lock our own server out of its rooms, and
    entries that can never take effect."""
    lockouts: list[str] = []
    ineffective: list[str] = []
    own_host = strip_port(own_server)
    if policy.mode is not FederationMode.OPEN and not policy.allow_ip_literals:
        if is_ip_literal(own_server):
            lockouts.append(
                f"own server {own_server} is an IP literal but allow_ip_literals is false: "
                "the room ACL would lock this homeserver out; set allow_ip_literals: true"
            )
    if policy.mode is FederationMode.DENYLIST:
        for glob in policy.servers:
            if _any_match((glob,), own_host):
                lockouts.append(
                    f"denied server entry {glob!r} matches own server {own_host}: "
                    "the room ACL would lock this homeserver out; narrow the entry"
                )
    if policy.mode is FederationMode.ALLOWLIST and not policy.allow_ip_literals:
        for glob in policy.servers:
            if is_ip_literal(glob):
                ineffective.append(
                    f"allowed server entry {glob!r} is an IP literal but allow_ip_literals "
                    "is false, so it never takes effect"
                )
    return lockouts, ineffective


def policy_problems(policy: FederationPolicy, own_server: str) -> list[str]:
    """Plain-language problems of ``policy`` for this homeserver; empty if it is sound.

    Reports what would lock our own server out of its rooms (:func:`acl_content`
    refuses such a policy) and entries that can never take effect (an allowlisted IP
    literal while IP literals are refused). Meant for ``check-config``.
    """
    lockouts, ineffective = _problems(policy, own_server)
    return lockouts + ineffective


# --- m.room.server_acl ------------------------------------------------------------------


def _dedup(items: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    out: list[str] = []
    for item in items:
        key = item.lower()
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out


def acl_content(policy: FederationPolicy, own_server: str) -> dict[str, Any] | None:
    """The ``m.room.server_acl`` content that enforces ``policy`` in a room.

    ``allow`` always holds our own server (without port), or ``*``:

    * ``open``:      ``allow ["*"]``, ``deny []``
    * ``internal``:  ``allow [own]``
    * ``allowlist``: ``allow [own, *servers]``
    * ``denylist``:  ``allow ["*"]``, ``deny [*servers]``

    In ``open`` mode the bridge still owns the ACL, so that going from ``internal`` (or any
    other mode) to ``open`` lifts the restrictive ACL it wrote before, and an ACL someone else
    writes to shut servers out is restored like in any other mode (moderators who want to
    shut out a spamming server ask for ``denylist`` mode in that room). A room that never had
    an ACL is left without one: :func:`acl_matches` counts no ACL as a match for an ACL that
    allows every server by name, whatever ``allow_ip_literals`` says.

    Raises :class:`FederationPolicyError` if the ACL would lock our own server out
    (see :func:`policy_problems`); the result always satisfies
    ``acl_allows(content, own_server)``.
    """
    lockout, _ = _problems(policy, own_server)
    if lockout:
        raise FederationPolicyError("; ".join(lockout))
    own_host = strip_port(own_server)
    allow: list[str]
    deny: list[str] = []
    match policy.mode:
        case FederationMode.OPEN:
            allow = ["*"]
        case FederationMode.INTERNAL:
            allow = [own_host]
        case FederationMode.ALLOWLIST:
            allow = _dedup([own_host, *policy.servers])
        case FederationMode.DENYLIST:
            allow = ["*"]
            deny = _dedup(policy.servers)
        case _:  # pragma: no cover
            raise AssertionError(f"unhandled federation mode {policy.mode!r}")
    allow_ip = policy.allow_ip_literals
    if policy.mode is FederationMode.OPEN and is_ip_literal(own_server):
        allow_ip = True  # an ACL refusing IP literals would lock this homeserver out
    content: dict[str, Any] = {"allow": allow, "deny": deny, "allow_ip_literals": allow_ip}
    assert acl_allows(content, own_server), "server ACL would lock out own server"
    return content


def _acl_parts(content: Mapping[str, Any] | None) -> tuple[bool, tuple[str, ...], tuple[str, ...]]:
    """``(allow_ip_literals, allow, deny)`` of ACL content, with the spec's defaults.

    No ACL at all allows everything. Malformed fields are read as Synapse reads them:
    a non-boolean ``allow_ip_literals`` means true, a non-list ``allow``/``deny`` means
    empty, non-string entries are skipped.
    """
    if content is None:
        return True, ("*",), ()
    ip = content.get("allow_ip_literals", True)
    if not isinstance(ip, bool):
        ip = True

    def entries(key: str) -> tuple[str, ...]:
        value = content.get(key, [])
        if not isinstance(value, list | tuple):
            return ()
        return tuple(e for e in value if isinstance(e, str))

    return ip, entries("allow"), entries("deny")


def acl_allows(content: Mapping[str, Any] | None, server: str) -> bool:
    """Whether ``m.room.server_acl`` content lets ``server`` take part in the room.

    The spec's evaluation order: an IP literal is refused unless ``allow_ip_literals``;
    then any ``deny`` match refuses; then any ``allow`` match accepts; anything else is
    refused. The port is ignored. ``None`` (no ACL in the room) allows every server.
    """
    allow_ip, allow, deny = _acl_parts(content)
    if not allow_ip and is_ip_literal(server):
        return False
    host = strip_port(server)
    if _any_match(deny, host):
        return False
    return _any_match(allow, host)


def acl_matches(current: Mapping[str, Any] | None, desired: Mapping[str, Any] | None) -> bool:
    """Whether a room's current ACL already is the desired one (drift check).

    Order, duplicates and letter case of entries do not matter; missing fields take the
    spec's defaults, and no ACL at all equals ``allow ["*"]`` with IP literals allowed.
    A room without an ACL (or with empty content, as :class:`~bridge.policy.rooms.RoomState`
    reads it) also matches a desired ACL that allows every server by name
    (``allow ["*"]``, nothing denied; ``open`` mode, or ``denylist`` with an empty list)
    even when that ACL refuses IP literals: writing an ACL into every room only to refuse
    servers named by an IP address is churn the policy does not need (the gate still
    refuses those servers' invites and joins).
    ``desired`` ``None`` means the policy does not manage ACLs: always a match.
    """
    if desired is None:
        return True

    def norm(entries: tuple[str, ...]) -> frozenset[str]:
        return frozenset(e.lower() for e in entries)

    if not current:  # empty content counts as no ACL, as the room planner reads it
        current = None
    cur_ip, cur_allow, cur_deny = _acl_parts(current)
    want_ip, want_allow, want_deny = _acl_parts(desired)
    if current is None and norm(want_allow) == {"*"} and not want_deny:
        return True

    return (
        cur_ip == want_ip
        and norm(cur_allow) == norm(want_allow)
        and norm(cur_deny) == norm(want_deny)
    )


# --- gate checks ------------------------------------------------------------------------


def _refusal(policy: FederationPolicy, server: str, what: str = "") -> Verdict:
    reason = ""
    if not policy.allow_ip_literals and is_ip_literal(server):
        reason = " (servers named by an IP address are refused)"
    shown = server or "a server without a name"
    return Verdict(
        (
            Finding(
                rule=f"federation:{policy.mode.value}",
                category=CATEGORY,
                actions=frozenset({Action.BLOCK}),
                message=f"{what}federation with {shown} is not allowed by company policy{reason}",
                excerpt=server,
            ),
        )
    )


def _check_servers(
    policy: FederationPolicy, own_server: str, servers: Iterable[str], what: str = ""
) -> Verdict:
    for server in servers:
        if not server_allowed(policy, own_server, server):
            return _refusal(policy, server, what)
    return ALLOW


def check_invite(policy: FederationPolicy, own_server: str, inviter: str, invitee: str) -> Verdict:
    """Gate for ``user_may_invite``: a local user invites someone.

    Blocks when the invitee's (or, defensively, the inviter's) server may not federate.
    """
    return _check_servers(
        policy,
        own_server,
        (server_name(invitee), server_name(inviter)),
        "cannot invite: ",
    )


def check_federated_invite(
    policy: FederationPolicy, own_server: str, event: Mapping[str, Any]
) -> Verdict:
    """Gate for ``federated_user_may_invite``: a remote user invites a local one.

    The inviter's server is the server part of the invite event's ``sender``; an event
    without a usable sender is judged as coming from a server with an empty name.
    """
    sender = event.get("sender")
    server = server_name(sender) if isinstance(sender, str) else ""
    return _check_servers(policy, own_server, (server,), "invite refused: ")


def check_remote_join(policy: FederationPolicy, own_server: str, user: str) -> Verdict:
    """Gate for ``accept_make_join``: a remote user asks to join a room through us."""
    return _check_servers(policy, own_server, (server_name(user),), "cannot join: ")


def room_server(room_id: str) -> str | None:
    """The server part of a room ID (``!abc:b.example`` -> ``b.example``).

    ``None`` when the ID has none: room version 12 IDs are ``!`` + a hash of the create
    event, without a server.
    """
    _, sep, server = room_id.partition(":")
    return server if sep and server else None


def check_local_join(policy: FederationPolicy, own_server: str, user: str, room_id: str) -> Verdict:
    """Gate for ``user_may_join_room``: a (local) user joins a room.

    The room's server is read from the room ID: the server of the room's creator in
    room versions up to 11. It says nothing about which servers are in the room now,
    so a local room with remote members passes here (the room ACL and member removal
    cover those). Room version 12 IDs carry no server: then the ID cannot decide and
    the join is allowed (no decision). The joining user's own server is checked too.
    """
    servers = [server_name(user)]
    remote = room_server(room_id)
    if remote is not None:
        servers.append(remote)
    return _check_servers(policy, own_server, servers, "cannot join: ")


def members_to_remove(
    policy: FederationPolicy, own_server: str, member_ids: Iterable[str]
) -> list[str]:
    """The members whose server may not federate under ``policy``, in input order,
    without duplicates. Members of our own server are never listed."""
    seen: set[str] = set()
    out: list[str] = []
    for member in member_ids:
        if member in seen:
            continue
        seen.add(member)
        if not server_allowed(policy, own_server, server_name(member)):
            out.append(member)
    return out
