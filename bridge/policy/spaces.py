"""Which rooms are in which spaces: links that a room cannot forge. Pure: no I/O.

Space policies apply to the rooms of a space, so a room must not be able to put itself in a
lax space, nor take itself out of a strict one. Following the Matrix spec, a room is in a
space when one of two claims holds:

- the space lists it: ``m.space.child`` in the space, state key the room, non-empty ``via``
  (Synapse's auth rules already require the sender's power to send it in the space);
- the room names the space: ``m.space.parent`` in the room, state key the space, non-empty
  ``via``, sent by a user who has the power to send ``m.space.child`` *in the space*.

The power is judged against what the bridge knows of the space when the ``m.space.parent``
arrives (:class:`SpacePower`, kept from the space's ``m.room.create`` and
``m.room.power_levels``). A later demotion of that user does not undo a claim accepted
before: it was legitimate when made, and the bridge keeps no history of who sent what. The
room withdraws it with a new ``m.space.parent``; a space that must not contain the room
cannot withdraw a claim the room made (the spec gives spaces no such veto either).

Each side can only withdraw its own claim: an empty (or unauthorised) ``m.space.parent``
replaces the room's claim, an empty ``m.space.child`` the space's. The link holds while
either claim does.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum

CHILD = "m.space.child"
PARENT = "m.space.parent"
CREATE = "m.room.create"
POWER_LEVELS = "m.room.power_levels"
#: Room versions where the creators have unlimited power (MSC4289), besides 12 and later.
CREATOR_POWER_VERSIONS = frozenset({"org.matrix.hydra.11"})
FORMAT_VERSION = 2


class Side(StrEnum):
    """Which side of a link claimed it."""

    SPACE = "space"  # m.space.child in the space
    ROOM = "room"  # m.space.parent in the room, by a user with power in the space


@dataclass(frozen=True)
class SpacePower:
    """Who may send ``m.space.child`` in a space, as far as the bridge knows.

    ``creators``: users with unlimited power (room versions 12+: the ``m.room.create``
    sender and ``additional_creators``). ``founder``: the create event's sender in older
    versions, who holds power only while no power levels are known (the spec's default for
    a room without ``m.room.power_levels``). ``levels_known``: a power levels event was seen;
    then ``senders`` are the users whose level reaches the one ``m.space.child`` needs, and
    ``everyone`` says whether ``users_default`` reaches it. With nothing known, nobody has
    the power: a claim the bridge cannot check is refused.
    """

    creators: frozenset[str] = frozenset()
    founder: str = ""
    levels_known: bool = False
    senders: frozenset[str] = frozenset()
    everyone: bool = False

    def may_list_children(self, user: str) -> bool:
        """Whether ``user`` has the power to send ``m.space.child`` in the space."""
        if user in self.creators:
            return True
        if not self.levels_known:
            return bool(self.founder) and user == self.founder
        return self.everyone or user in self.senders


def creator_power(version: str) -> bool:
    """Whether creators have unlimited power in rooms of ``version`` (12 and later)."""
    if version.isdigit():
        return int(version) >= 12
    return version in CREATOR_POWER_VERSIONS


def _level(value: object, default: int) -> int:
    """A power level from untrusted JSON (older room versions allow numeric strings)."""
    if isinstance(value, bool):
        return default
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return default
    return default


def power_from_levels(power: SpacePower, content: Mapping[str, object]) -> SpacePower:
    """``power`` with the space's ``m.room.power_levels`` ``content`` in force."""
    events = content.get("events")
    events = events if isinstance(events, dict) else {}
    state_default = _level(content.get("state_default"), 50)
    needed = _level(events.get(CHILD), state_default)
    users = content.get("users")
    users = users if isinstance(users, dict) else {}
    users_default = _level(content.get("users_default"), 0)
    senders = frozenset(
        u for u, lvl in users.items() if isinstance(u, str) and _level(lvl, users_default) >= needed
    )
    return replace(power, levels_known=True, senders=senders, everyone=users_default >= needed)


def power_from_create(sender: str, content: Mapping[str, object]) -> SpacePower:
    """What a space's ``m.room.create`` says about power (no levels known yet)."""
    version = content.get("room_version")
    version = version if isinstance(version, str) else "1"
    if not creator_power(version):
        return SpacePower(founder=sender)
    extra = content.get("additional_creators")
    more = [u for u in extra if isinstance(u, str)] if isinstance(extra, list) else []
    return SpacePower(creators=frozenset([sender, *more]), founder=sender)


def listed(content: object) -> bool:
    """Whether a ``m.space.child``/``m.space.parent`` content makes a claim (non-empty
    ``via`` of server names); anything else withdraws it."""
    via = content.get("via") if isinstance(content, dict) else None
    return isinstance(via, list) and any(isinstance(v, str) and v for v in via)


@dataclass(frozen=True)
class SpaceLinks:
    """The claims on each (room, space) link, and the power facts of the spaces.

    ``claims``: room → space → the sides claiming the link (never empty). ``power``: what
    the bridge knows of each space's power levels. Immutable: :meth:`apply` returns a new
    value.
    """

    claims: Mapping[str, Mapping[str, frozenset[Side]]] = field(default_factory=dict)
    power: Mapping[str, SpacePower] = field(default_factory=dict)

    def room_spaces(self) -> dict[str, tuple[str, ...]]:
        """The link set: each room's spaces (rooms in no space are left out)."""
        return {room: tuple(spaces) for room, spaces in self.claims.items() if spaces}

    def claimed(self, room: str, space: str, side: Side) -> bool:
        """Whether ``side`` claims the link ``room`` → ``space``."""
        return side in self.claims.get(room, {}).get(space, frozenset())

    def apply(self, event: Mapping[str, object]) -> SpaceLinks:
        """These facts after ``event`` (untrusted JSON); ``self`` when it changes nothing."""
        etype, room, sender = event.get("type"), event.get("room_id"), event.get("sender")
        key, content = event.get("state_key"), event.get("content")
        if not isinstance(room, str) or not isinstance(key, str) or not isinstance(sender, str):
            return self
        body: Mapping[str, object] = content if isinstance(content, dict) else {}
        if etype == CHILD:
            return self.claim(key, room, Side.SPACE, listed(body))
        if etype == PARENT:
            space = self.power.get(key, SpacePower())
            valid = listed(body) and space.may_list_children(sender)
            return self.claim(room, key, Side.ROOM, valid)
        if etype == CREATE and key == "" and body.get("type") == "m.space":
            made = power_from_create(sender, body)
            known = self.power.get(room)
            if known is not None:  # keep levels already seen (a redelivered create)
                made = replace(known, creators=made.creators, founder=made.founder)
            return self._with_power(room, made)
        if etype == POWER_LEVELS and key == "" and room in self.power:
            return self._with_power(room, power_from_levels(self.power[room], body))
        return self

    def claim(self, room: str, space: str, side: Side, present: bool) -> SpaceLinks:
        """``side`` claims (``present``) or withdraws its claim on the link ``room`` → ``space``.

        A space that lists children is tracked as a space from then on (its power levels
        are kept), even if its creation was not seen.
        """
        if not room.startswith("!") or not space.startswith("!") or room == space:
            return self
        power = self.power
        if side is Side.SPACE and space not in power:
            power = {**power, space: SpacePower()}
        spaces = dict(self.claims.get(room, {}))
        sides = spaces.get(space, frozenset())
        sides = sides | {side} if present else sides - {side}
        if sides:
            spaces[space] = sides
        else:
            spaces.pop(space, None)
        claims = dict(self.claims)
        if spaces:
            claims[room] = spaces
        else:
            claims.pop(room, None)
        if claims == self.claims and power is self.power:
            return self
        return SpaceLinks(claims, power)

    def _with_power(self, space: str, power: SpacePower) -> SpaceLinks:
        if self.power.get(space) == power:
            return self
        return SpaceLinks(self.claims, {**self.power, space: power})

    # -- persistence ------------------------------------------------------------------

    def encode(self) -> str:
        """The stored form (JSON)."""
        doc = {
            "version": FORMAT_VERSION,
            "links": {
                room: {space: sorted(sides) for space, sides in spaces.items()}
                for room, spaces in self.claims.items()
            },
            "power": {
                space: {
                    "creators": sorted(p.creators),
                    "founder": p.founder,
                    "levels_known": p.levels_known,
                    "senders": sorted(p.senders),
                    "everyone": p.everyone,
                }
                for space, p in self.power.items()
            },
        }
        return json.dumps(doc, ensure_ascii=False, sort_keys=True)

    @classmethod
    def decode(cls, value: str | None) -> SpaceLinks:
        """Read the stored form. The earlier form (room → list of spaces, with no record
        of which side made a link) is read as links the spaces made: they stay in force,
        and only the space can drop them (a room could not shed a strict space)."""
        doc = json.loads(value) if value else {}
        if not isinstance(doc, dict):
            return cls()
        if doc.get("version") != FORMAT_VERSION:
            legacy = {
                room: {s: frozenset({Side.SPACE}) for s in spaces if isinstance(s, str)}
                for room, spaces in doc.items()
                if isinstance(room, str) and isinstance(spaces, list)
            }
            kept = {r: s for r, s in legacy.items() if s}
            spaces = {space for links in kept.values() for space in links}
            return cls(kept, {space: SpacePower() for space in sorted(spaces)})
        claims = {
            room: {space: frozenset(Side(s) for s in sides) for space, sides in spaces.items()}
            for room, spaces in doc.get("links", {}).items()
        }
        power = {
            space: SpacePower(
                creators=frozenset(p.get("creators", ())),
                founder=str(p.get("founder", "")),
                levels_known=bool(p.get("levels_known")),
                senders=frozenset(p.get("senders", ())),
                everyone=bool(p.get("everyone")),
            )
            for space, p in doc.get("power", {}).items()
        }
        return cls(claims, power)
