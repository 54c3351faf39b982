"""Plan what a room needs to match policy: its ACL, its retention, its members. Pure.

Input is the room's current state (the client API's ``/state`` list) and the effective
policies; output is a :class:`RoomPlan` of state events to send and members to remove,
plus what the bot lacks to do it (power levels, room version 12 creators).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from bridge.policy.federation import FederationPolicy, acl_content, acl_matches, members_to_remove
from bridge.policy.model import server_name
from bridge.policy.retention import RetentionPolicy, retention_content, retention_matches

ACL = "m.room.server_acl"
RETENTION = "m.room.retention"
INFINITE = float("inf")
#: A room's ``lacking`` mark when someone changed its policy state after the bot set it.
DRIFTED = "drifted"


@dataclass(frozen=True, slots=True)
class RoomPlan:
    """What to do in one room. Empty tuples everywhere means the room is in line."""

    set_state: tuple[tuple[str, str, dict[str, Any]], ...] = ()
    kicks: tuple[tuple[str, str], ...] = ()
    lacking: tuple[str, ...] = ()
    unkickable: tuple[tuple[str, str], ...] = ()

    @property
    def in_line(self) -> bool:
        return not (self.set_state or self.kicks or self.lacking or self.unkickable)


@dataclass(frozen=True, slots=True)
class RoomState:
    """The parts of a room's state the planner reads."""

    creators: frozenset[str]
    power_levels: Mapping[str, Any]
    has_power_levels: bool
    members: Mapping[str, str]  # user -> membership
    acl: Mapping[str, Any] | None
    retention: Mapping[str, Any] | None
    room_version: str

    @classmethod
    def from_events(cls, events: Iterable[Mapping[str, Any]]) -> RoomState:
        creators: set[str] = set()
        pls: Mapping[str, Any] = {}
        has_pls = False
        members: dict[str, str] = {}
        acl = retention = None
        version = "1"
        for ev in events:
            etype, key = ev.get("type"), ev.get("state_key")
            raw = ev.get("content")
            content: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
            if etype == "m.room.create":
                version = str(content.get("room_version", "1"))
                if isinstance(ev.get("sender"), str):
                    creators.add(ev["sender"])
                extra = content.get("additional_creators")
                if isinstance(extra, list):
                    creators.update(u for u in extra if isinstance(u, str))
            elif etype == "m.room.power_levels":
                pls, has_pls = content, True
            elif etype == "m.room.member" and isinstance(key, str):
                members[key] = str(content.get("membership", ""))
            elif etype == ACL and content:
                acl = content
            elif etype == RETENTION and content:
                retention = content
        return cls(frozenset(creators), pls, has_pls, members, acl, retention, version)

    @property
    def creators_outrank(self) -> bool:
        """Room version 12 (MSC4289): creators have infinite power and cannot be kicked."""
        return self.room_version in ("12",) or self.room_version.startswith("org.matrix.hydra")

    def power_of(self, user: str) -> float:
        if self.creators_outrank and user in self.creators:
            return INFINITE
        users = self.power_levels.get("users") if self.has_power_levels else None
        if isinstance(users, Mapping) and isinstance(users.get(user), int):
            return float(users[user])
        if not self.has_power_levels:
            return 100.0 if user in self.creators else 0.0
        default = self.power_levels.get("users_default", 0)
        return float(default) if isinstance(default, int) else 0.0

    def needed_for_state(self, event_type: str) -> float:
        if not self.has_power_levels:
            return 0.0
        events = self.power_levels.get("events")
        if isinstance(events, Mapping) and isinstance(events.get(event_type), int):
            return float(events[event_type])
        default = self.power_levels.get("state_default", 50)
        return float(default) if isinstance(default, int) else 50.0

    def needed_for(self, action: str) -> float:
        """Power needed to ``kick``/``ban``/``redact``/``invite``. Without a power levels
        event the spec's defaults still apply (50; invite 0): only the creator, with 100,
        may kick then (Synapse's ``get_named_level``)."""
        default = 0 if action == "invite" else 50
        value = self.power_levels.get(action, default) if self.has_power_levels else default
        return float(value) if isinstance(value, int) else float(default)


def _power_text(value: float) -> str:
    return "creator" if value == INFINITE else str(int(value))


def plan_room(
    state: RoomState,
    *,
    bot: str,
    own_server: str,
    federation: FederationPolicy,
    retention: RetentionPolicy | None,
    kick_excluded: bool = True,
) -> RoomPlan:
    """Everything that must change in a room for it to match the policies."""
    bot_power = state.power_of(bot)
    set_state: list[tuple[str, str, dict[str, Any]]] = []
    lacking: list[str] = []
    wanted = (
        (ACL, state.acl, acl_content(federation, own_server), acl_matches),
        (RETENTION, state.retention, retention_content(retention), retention_matches),
    )
    for etype, current, desired, matches in wanted:
        if desired is None or matches(current, desired):
            continue
        need = state.needed_for_state(etype)
        if bot_power >= need:
            set_state.append((etype, "", desired))
        else:
            lacking.append(
                f"power level {_power_text(need)} to send {etype} (the bot has "
                f"{_power_text(bot_power)})"
            )
    kicks: list[tuple[str, str]] = []
    unkickable: list[tuple[str, str]] = []
    if kick_excluded:
        joined = [u for u, m in state.members.items() if m in ("join", "invite", "knock")]
        for user in members_to_remove(federation, own_server, joined):
            reason = f"federation with {server_name(user)} is not allowed by company policy"
            target_power = state.power_of(user)
            if target_power == INFINITE:
                unkickable.append((user, "a room creator cannot be removed (room version 12)"))
            elif bot_power < state.needed_for("kick"):
                unkickable.append(
                    (user, f"the bot needs power {_power_text(state.needed_for('kick'))} to kick")
                )
            elif target_power >= bot_power:
                unkickable.append((user, "the member's power is not below the bot's"))
            else:
                kicks.append((user, reason))
    return RoomPlan(tuple(set_state), tuple(kicks), tuple(lacking), tuple(unkickable))
