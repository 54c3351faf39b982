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
from bridge.policy.dlp import DlpEngine, DlpPolicy
from bridge.policy.federation import FederationPolicy
from bridge.policy.model import ALLOW, Action, Finding, Verdict
from bridge.policy.retention import RetentionPolicy
from bridge.policy.rooms import RoomPlan, RoomState, plan_room
from bridge.policy.scopes import ScopedSetting, federation_setting, retention_setting

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
