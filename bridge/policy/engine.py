"""The policy engine: one pure object that judges events and requests.

Built once per policy change (config load, reload, admin command) and swapped atomically,
so the gate answers from memory without I/O. The same engine judges the gate path, the
ingest path and ``dlp test``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bridge.policy import federation as fed
from bridge.policy.creation import ENCRYPTION_AT_CREATION, federation_findings, read_new_room
from bridge.policy.dlp import DlpEngine, DlpPolicy, Request
from bridge.policy.federation import FederationPolicy
from bridge.policy.model import ALLOW, Action, Finding, Verdict
from bridge.policy.retention import RetentionPolicy
from bridge.policy.rooms import RoomPlan, RoomState, plan_room
from bridge.policy.scopes import ScopedSetting, federation_setting, retention_setting
from bridge.policy.spaces import SpacePower

ENCRYPTION_EVENT = "m.room.encryption"
ENCRYPTION_RULE = "encryption:forbidden"
ENCRYPTION_MESSAGE = (
    "end-to-end encryption is not allowed in this room by company policy: messages here must"
    " be inspectable. Ask your administrator if this room needs an exception."
)
#: The finding for an m.room.encryption event where encryption is forbidden. The gate
#: refuses it; on the ingest path (createRoom's initial state never reaches the gate) it
#: cannot be undone, so the management room is told instead of redacting.
ENCRYPTION_FORBIDDEN = Finding(
    rule=ENCRYPTION_RULE,
    category="encryption",
    actions=frozenset({Action.BLOCK, Action.NOTIFY}),
    message=ENCRYPTION_MESSAGE,
)


def _no_encryption_rules() -> ScopedSetting[bool]:
    return ScopedSetting({}, {}, lambda f: bool(f.get("forbid", False)))


@dataclass(frozen=True, slots=True)
class PolicySet:
    """Everything the engine needs, immutable and compiled."""

    own_server: str
    bot_mxid: str
    dlp_global: DlpEngine = field(default_factory=lambda: DlpEngine.compile(DlpPolicy()))
    dlp_rooms: Mapping[str, DlpEngine] = field(default_factory=dict)
    # The management room: admins paste suspicious text there to test rules.
    management_room: str = ""
    federation: ScopedSetting[FederationPolicy] = field(
        default_factory=lambda: federation_setting(None)
    )
    retention: ScopedSetting[RetentionPolicy] = field(
        default_factory=lambda: retention_setting(None)
    )
    room_spaces: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    kick_excluded: bool = True
    # Scopes where the gate refuses m.room.encryption (DLP layers' forbid_encryption).
    encryption_forbidden: ScopedSetting[bool] = field(default_factory=_no_encryption_rules)
    # Who may add rooms to each known space: decides whether a new room's m.space.parent
    # would count (policy/spaces.py), so which space policies judge its creation.
    space_power: Mapping[str, SpacePower] = field(default_factory=dict)
    # Rooms and spaces with rules of their own (a DLP, federation or retention layer): an
    # upgrade of such a room would leave them behind (the new room has a new ID).
    rule_scopes: frozenset[str] = frozenset()


class PolicyEngine:
    """Judges events and membership requests against a :class:`PolicySet`."""

    def __init__(self, policy: PolicySet) -> None:
        self.policy = policy

    def dlp_for(self, room_id: object) -> DlpEngine:
        """The compiled DLP rules in force in ``room_id``."""
        if isinstance(room_id, str):
            return self.policy.dlp_rooms.get(room_id, self.policy.dlp_global)
        return self.policy.dlp_global

    def check_event(self, event: Mapping[str, Any]) -> Verdict:
        """Judge an event (client format) as the gate or the ingest worker sees it."""
        if event.get("sender") == self.policy.bot_mxid:
            return ALLOW  # the bot's own notices quote rule names, never secrets
        if self.policy.management_room and event.get("room_id") == self.policy.management_room:
            return ALLOW
        if event.get("type") == ENCRYPTION_EVENT and "state_key" in event:
            room = event.get("room_id")
            if self.encryption_forbidden(room if isinstance(room, str) else None):
                return Verdict((ENCRYPTION_FORBIDDEN,))
            return ALLOW
        return self.dlp_for(event.get("room_id")).check(event)

    def encryption_forbidden(self, room_id: str | None) -> bool:
        """Whether company policy forbids end-to-end encryption in ``room_id``."""
        spaces = self.policy.room_spaces.get(room_id, ()) if room_id else ()
        return self.policy.encryption_forbidden.resolve(room_id, spaces)

    def federation_for(self, room_id: str | None) -> FederationPolicy:
        """The federation policy in force in ``room_id`` (global for None)."""
        spaces = self.policy.room_spaces.get(room_id, ()) if room_id else ()
        return self.policy.federation.resolve(room_id, spaces)

    def retention_for(self, room_id: str | None) -> RetentionPolicy:
        """The retention policy in force in ``room_id`` (global for None)."""
        spaces = self.policy.room_spaces.get(room_id, ()) if room_id else ()
        return self.policy.retention.resolve(room_id, spaces)

    def check_invite(self, inviter: str, invitee: str, room_id: str) -> Verdict:
        """A local user invites someone (``user_may_invite``)."""
        return fed.check_invite(
            self.federation_for(room_id), self.policy.own_server, inviter, invitee
        )

    def check_federated_invite(self, event: Mapping[str, Any]) -> Verdict:
        """A remote server invites one of our users (``federated_user_may_invite``)."""
        room = event.get("room_id")
        policy = self.federation_for(room if isinstance(room, str) else None)
        return fed.check_federated_invite(policy, self.policy.own_server, event)

    def check_local_join(self, user: str, room_id: str, is_invited: bool) -> Verdict:
        """A local user joins a room (``user_may_join_room``)."""
        return fed.check_local_join(
            self.federation_for(room_id), self.policy.own_server, user, room_id
        )

    def check_remote_join(self, user: str, room_id: str) -> Verdict:
        """A remote user asks to join one of our rooms (``accept_make_join``)."""
        return fed.check_remote_join(self.federation_for(room_id), self.policy.own_server, user)

    def plan_room(self, room_id: str, state_events: Sequence[Mapping[str, Any]]) -> RoomPlan:
        """What must change in ``room_id`` (given its current state) to match policy."""
        return plan_room(
            RoomState.from_events(state_events),
            bot=self.policy.bot_mxid,
            own_server=self.policy.own_server,
            federation=self.federation_for(room_id),
            retention=self.retention_for(room_id),
            kick_excluded=self.policy.kick_excluded,
        )

    # -- rooms before they exist, and state sent through the state API -------------------

    def check_create_room(self, user_id: str, body: Mapping[str, Any]) -> Verdict:
        """A local user creates (or upgrades) a room (``user_may_create_room``): the whole
        createRoom body, judged in the scope the room will have (see policy/creation.py).

        ``creation_content.predecessor`` is whatever the client wrote (Synapse checks it only
        on its own upgrade path, and a createRoom body may name any room): it can add the old
        room's rules, never take the new room's own scope away.
        """
        if user_id == self.policy.bot_mxid:
            return ALLOW
        room = read_new_room(user_id, body)
        # (room ID, spaces) of every scope the new room must satisfy: its own first.
        scopes: list[tuple[str | None, tuple[str, ...]]] = [
            (None, room.parent_spaces(self.policy.space_power))
        ]
        if room.predecessor is not None:
            old = room.predecessor
            scopes.append((old, self.policy.room_spaces.get(old, ())))
        findings: list[Finding] = []
        if room.predecessor is not None and room.predecessor in self.policy.rule_scopes:
            findings.append(UPGRADE_LEAVES_RULES)
        if room.encrypted and any(
            self.policy.encryption_forbidden.resolve(rid, spaces) for rid, spaces in scopes
        ):
            findings.append(ENCRYPTION_AT_CREATION)
        for rid, spaces in scopes:
            federation = self.policy.federation.resolve(rid, spaces)
            findings += federation_findings(room, federation, self.policy.own_server)
        engines: list[tuple[DlpEngine, str | None]] = []
        for rid, spaces in scopes:
            if rid is not None:
                engines.append((self.dlp_for(rid), rid))
            else:
                own = [self.dlp_for(space) for space in spaces] or [self.policy.dlp_global]
                engines += [(dlp, None) for dlp in own]
        for dlp, rid in dict.fromkeys(engines):  # each distinct engine once
            for etype, key, content in room.state:
                event = {"type": etype, "state_key": key, "content": content, "sender": user_id}
                if rid is not None:
                    event["room_id"] = rid
                findings += dlp.for_request(dlp.check(event).findings, Request.ROOM)
            if room.alias and not dlp.is_exempt(user_id, rid):
                findings += dlp.for_request(dlp.scan([room.alias]), Request.ROOM)
        return Verdict(tuple(_unique(findings)))

    def check_room_alias(self, user_id: str, alias: str) -> Verdict:
        """A local user creates ``alias`` (``user_may_create_room_alias``; Synapse does not
        say for which room): its name (not its server) is read by the global DLP rules."""
        if user_id == self.policy.bot_mxid or self.policy.dlp_global.is_exempt(user_id, None):
            return ALLOW
        name = alias[1:].partition(":")[0] if alias.startswith("#") else alias
        dlp = self.policy.dlp_global
        return Verdict(tuple(_unique(dlp.for_request(dlp.scan([name]), Request.ALIAS))))

    def check_state_event(
        self,
        user_id: str,
        room_id: str,
        event_type: str,
        state_key: str,
        content: Mapping[str, Any],
    ) -> Verdict:
        """A state event sent through ``PUT /rooms/{room}/state/...``
        (``user_may_send_state_event``): judged with its content as the event it becomes,
        and a server ACL must be the one the federation policy sets."""
        event = {
            "type": event_type,
            "state_key": state_key,
            "content": dict(content),
            "sender": user_id,
            "room_id": room_id,
        }
        found = self.check_event(event).findings
        verdict = Verdict(tuple(self.dlp_for(room_id).for_request(found, Request.STATE)))
        if event_type != ACL_EVENT or user_id == self.policy.bot_mxid:
            return verdict
        acl = self._acl_finding(room_id, content)
        return Verdict((*verdict.findings, acl)) if acl is not None else verdict

    def _acl_finding(self, room_id: str, content: Mapping[str, Any]) -> Finding | None:
        own = self.policy.own_server
        if not fed.acl_allows(content, own):
            return _acl_refusal(f"this server ACL would lock {own} out of the room")
        policy = self.federation_for(room_id)
        try:
            desired = fed.acl_content(policy, own)
        except fed.FederationPolicyError:
            return None  # a policy that cannot be written as an ACL: check-config reports it
        if fed.acl_matches(content, desired):
            return None
        return _acl_refusal(
            f"the server ACL of this room follows company policy (federation mode"
            f" {policy.mode.value}); ask a policy admin to change the federation policy instead"
        )


ACL_EVENT = "m.room.server_acl"
#: A room with rules of its own cannot be upgraded by its members: the rules are keyed by the
#: old room's ID, and the new room would live under the global ones.
UPGRADE_LEAVES_RULES = Finding(
    rule="upgrade:room-rules",
    category="policy",
    actions=frozenset({Action.BLOCK, Action.NOTIFY}),
    message=(
        "this room has company-policy rules of its own, which an upgraded room would not"
        " keep; ask a policy administrator to move the rules to a space or to the new room"
        " before it is upgraded"
    ),
)


def _acl_refusal(message: str) -> Finding:
    return Finding(
        rule="federation:acl",
        category=fed.CATEGORY,
        actions=frozenset({Action.BLOCK}),
        message=message,
    )


def _unique(findings: Sequence[Finding]) -> list[Finding]:
    """One finding per rule, the first one kept (several texts may match one rule)."""
    seen: set[str] = set()
    out: list[Finding] = []
    for finding in findings:
        if finding.rule not in seen:
            seen.add(finding.rule)
            out.append(finding)
    return out
