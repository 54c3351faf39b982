"""Rooms judged before they exist: the createRoom body (``user_may_create_room``). Pure.

Synapse does not send the events ``createRoom`` makes (create, name, topic, initial state,
invites) to ``check_event_for_spam``; the whole request body reaches the gate instead, and is
judged here as a whole:

* **encryption**: an ``m.room.encryption`` in ``initial_state`` is refused where the scope
  forbids encryption (Element puts it there for every new DM and private room);
* **DLP**: the ``name``, the ``topic``, the alias (``room_alias_name``) and every
  ``initial_state`` content (as the events they become, so the same texts are read as in
  a sent event);
* **federation**: users in ``invite`` and ``creation_content.additional_creators`` (creators
  of room version 12 hold unlimited power and cannot be removed) must be on servers the
  policy allows; each ``invite_3pid`` entry's identity server, which Synapse will contact with
  the invitee's address, must be allowed too; a room created with ``m.federate: false`` can
  never hold users of other servers, so such invitees are refused with that reason.

**Which scope applies to a room that does not exist yet.** It has no room ID, so room rules
cannot name it; what decides is:

* the global scope, merged with the spaces that the body's ``initial_state`` names in
  ``m.space.parent`` **when that link would count** once the room exists (the rule of
  :mod:`bridge.policy.spaces`: non-empty ``via``, and the creator may send ``m.space.child``
  in the space as far as the bridge knows the space's power levels). A claim that would not
  count is ignored here as it would be later, so a room can neither shelter in a lax space
  nor be judged by a strict one it does not belong to;
* a room upgrade (``creation_content.predecessor``) is judged in the new room's own scope
  (above) **and** in the old room's scope (its own rules and spaces): the stricter wins.
  The predecessor is whatever the client wrote (a createRoom body may name any room, and
  Synapse checks it only on its own upgrade path), and the bridge does not carry a room's
  rules to its successor, so the old room can add refusals but never lend an exception
  (encryption allowed, a rule switched off) to a room that will live in the global scope.
  A room with rules of its own is not upgraded at all (the engine refuses it with
  ``upgrade:room-rules``): its rules would stay with the old room ID;
* a direct chat (``is_direct``) is judged like any other new room: DMs are in no space, so the
  global scope applies. Where encryption is forbidden globally, an encrypted DM is refused;
  where only some spaces forbid it, DMs may be encrypted.

With several parent spaces, the federation and encryption settings merge as for an existing
room; DLP applies each space's rules (the order in which the spaces would be linked is not
known before the room exists, so the strictest wins).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bridge.policy import federation as fed
from bridge.policy.model import Action, Finding, server_name
from bridge.policy.spaces import PARENT, SpacePower, listed

ENCRYPTION_EVENT = "m.room.encryption"
#: What a creator is told when a new room may not be encrypted.
ENCRYPTION_AT_CREATION_MESSAGE = (
    "end-to-end encryption is not allowed here by company policy: messages must be"
    " inspectable. Create the room without encryption (in Element: turn off 'Enable"
    " end-to-end encryption'); ask your administrator if this room needs an exception."
)


@dataclass(frozen=True, slots=True)
class NewRoom:
    """What a createRoom body says about the room to be, read leniently from untrusted JSON.

    ``state``: the state events the room starts with that carry text (name, topic, initial
    state) as ``(type, state_key, content)``. ``parents``: the spaces named in
    ``m.space.parent`` with a non-empty ``via`` (whether each link would count is decided
    with the spaces' power). ``predecessor``: the old room of an upgrade.
    """

    creator: str
    state: tuple[tuple[str, str, Mapping[str, Any]], ...] = ()
    encrypted: bool = False
    invites: tuple[str, ...] = ()
    identity_servers: tuple[str, ...] = ()
    additional_creators: tuple[str, ...] = ()
    federate: bool = True
    alias: str = ""
    parents: tuple[str, ...] = ()
    predecessor: str | None = None
    is_direct: bool = False

    def parent_spaces(self, power: Mapping[str, SpacePower]) -> tuple[str, ...]:
        """The named spaces whose link would count: the creator may list children there."""
        return tuple(
            space
            for space in self.parents
            if power.get(space, SpacePower()).may_list_children(self.creator)
        )


def _strings(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        return ()
    return tuple(v for v in value if isinstance(v, str))


def read_new_room(creator: str, body: Mapping[str, Any]) -> NewRoom:
    """The :class:`NewRoom` a createRoom ``body`` by ``creator`` asks for (never raises)."""
    state: list[tuple[str, str, Mapping[str, Any]]] = []
    name, topic = body.get("name"), body.get("topic")
    if isinstance(name, str):
        state.append(("m.room.name", "", {"name": name}))
    if isinstance(topic, str):
        state.append(("m.room.topic", "", {"topic": topic}))
    encrypted = False
    parents: list[str] = []
    initial = body.get("initial_state")
    for item in initial if isinstance(initial, list) else ():
        if not isinstance(item, Mapping) or not isinstance(item.get("type"), str):
            continue
        etype, key = item["type"], item.get("state_key", "")
        key = key if isinstance(key, str) else ""
        content = item.get("content")
        content = content if isinstance(content, Mapping) else {}
        state.append((etype, key, content))
        if etype == ENCRYPTION_EVENT:
            encrypted = True
        elif etype == PARENT and key.startswith("!") and listed(dict(content)):
            parents.append(key)
    creation = body.get("creation_content")
    creation = creation if isinstance(creation, Mapping) else {}
    if creation:
        state.append(("m.room.create", "", creation))
    predecessor = creation.get("predecessor")
    old_room = predecessor.get("room_id") if isinstance(predecessor, Mapping) else None
    id_servers: list[str] = []
    third_party = body.get("invite_3pid")
    for entry in third_party if isinstance(third_party, list) else ():
        server = entry.get("id_server") if isinstance(entry, Mapping) else None
        id_servers.append(server if isinstance(server, str) else "")
    alias = body.get("room_alias_name")
    return NewRoom(
        creator=creator,
        state=tuple(state),
        encrypted=encrypted,
        invites=_strings(body.get("invite")),
        identity_servers=tuple(id_servers),
        additional_creators=_strings(creation.get("additional_creators")),
        federate=creation.get("m.federate", True) is not False,
        alias=alias if isinstance(alias, str) else "",
        parents=tuple(dict.fromkeys(parents)),
        predecessor=old_room if isinstance(old_room, str) else None,
        is_direct=body.get("is_direct") is True,
    )


ENCRYPTION_AT_CREATION = Finding(
    rule="encryption:forbidden",
    category="encryption",
    actions=frozenset({Action.BLOCK, Action.NOTIFY}),
    message=ENCRYPTION_AT_CREATION_MESSAGE,
)


def _federation_finding(policy: fed.FederationPolicy, server: str, message: str) -> Finding:
    return Finding(
        rule=f"federation:{policy.mode.value}",
        category=fed.CATEGORY,
        actions=frozenset({Action.BLOCK}),
        message=message,
        excerpt=server,
    )


def _is_own(server: str, own_server: str) -> bool:
    """Whether ``server`` is this homeserver (ports ignored): the only server an
    ``internal`` policy lets in."""
    return fed.server_allowed(fed.FederationPolicy(fed.FederationMode.INTERNAL), own_server, server)


def federation_findings(
    room: NewRoom, policy: fed.FederationPolicy, own_server: str
) -> list[Finding]:
    """Refusals of the body's invites, extra creators and identity servers (pure)."""
    out: list[Finding] = []
    for invitee in room.invites:
        verdict = fed.check_invite(policy, own_server, room.creator, invitee)
        if verdict.first_block is not None:
            out.append(verdict.first_block)
        elif not room.federate and not _is_own(server_name(invitee), own_server):
            out.append(
                _federation_finding(
                    policy,
                    server_name(invitee),
                    f"cannot invite {invitee}: this room is created without federation"
                    " (m.federate: false), so users of other servers can never join it",
                )
            )
    for creator in room.additional_creators:
        server = server_name(creator)
        if not fed.server_allowed(policy, own_server, server):
            out.append(
                _federation_finding(
                    policy,
                    server,
                    f"cannot make {creator} a creator of the room: federation with"
                    f" {server or 'a server without a name'} is not allowed by company policy",
                )
            )
    for id_server in room.identity_servers:
        if not id_server or not fed.server_allowed(policy, own_server, id_server):
            out.append(
                _federation_finding(
                    policy,
                    id_server,
                    "cannot invite by e-mail or phone through the identity server"
                    f" {id_server or '(none named)'}: it would receive the invitee's address,"
                    " and it is not a server company policy allows",
                )
            )
    return out
