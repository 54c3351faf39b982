"""The policy engine: one pure object that judges events and requests.

Built once per policy change (config load, reload, admin command) and swapped atomically,
so the gate answers from memory without I/O. The same engine judges the gate path, the
ingest path and ``dlp test``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .model import ALLOW, Verdict


@dataclass(frozen=True, slots=True)
class PolicySet:
    """Everything the engine needs, immutable."""

    own_server: str
    bot_mxid: str


class PolicyEngine:
    """Judges events and membership requests against a :class:`PolicySet`."""

    def __init__(self, policy: PolicySet) -> None:
        self.policy = policy

    def check_event(self, event: Mapping[str, Any]) -> Verdict:
        """Judge an event (client format) as the gate or the ingest worker sees it."""
        if event.get("sender") == self.policy.bot_mxid:
            return ALLOW
        return ALLOW

    def check_invite(self, inviter: str, invitee: str, room_id: str) -> Verdict:
        """A local user invites someone (``user_may_invite``)."""
        return ALLOW

    def check_federated_invite(self, event: Mapping[str, Any]) -> Verdict:
        """A remote server invites one of our users (``federated_user_may_invite``)."""
        return ALLOW

    def check_local_join(self, user: str, room_id: str, is_invited: bool) -> Verdict:
        """A local user joins a room (``user_may_join_room``)."""
        return ALLOW

    def check_remote_join(self, user: str, room_id: str) -> Verdict:
        """A remote user asks to join one of our rooms (``accept_make_join``)."""
        return ALLOW
