"""Room bookkeeping on the ingest path: the bot's rooms, drift, space links, enrolment.

The tracker follows the event stream: which rooms the bot is joined to (its own
membership; invitations from our server or from users with a role are accepted), members
of other servers who may have to leave, changes to the state the policy owns (server ACL,
retention: restored), which rooms belong to which spaces (the scopes of space policies;
links a room cannot forge, judged by :mod:`bridge.policy.spaces`),
and rooms created on the homeserver (enrolled when auto-enrolment is on).

Like every stage of the worker it only stages: room rows, actions and state values go
into the :class:`~bridge.pipeline.batch.Batch`, and what the tracker remembers changes
after the batch is committed. While a transaction is judged, :meth:`RoomTracker.joined`
answers for the rooms as that transaction leaves them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from bridge.commands import Reply
from bridge.config import Config
from bridge.pipeline import actions
from bridge.pipeline.batch import Batch, as_str
from bridge.pipeline.enforcement import DRIFTED
from bridge.pipeline.live_policy import SPACES_KEY
from bridge.pipeline.services import WorkerServices
from bridge.policy.engine import PolicyEngine
from bridge.policy.federation import acl_content, acl_matches, server_allowed
from bridge.policy.model import server_name
from bridge.policy.retention import retention_content, retention_matches
from bridge.policy.rooms import ACL, RETENTION
from bridge.policy.spaces import CHILD, CREATE, PARENT, POWER_LEVELS, Side, SpaceLinks, listed
from bridge.store import Store

log = logging.getLogger(__name__)

ENROLL_DELAY = 3.0  # seconds between seeing a new room and enrolling it
#: The events space links are judged from: the claims, and the spaces' power.
SPACE_EVENTS = (CHILD, PARENT, CREATE, POWER_LEVELS)


class RoomTracker:
    """What the worker knows of rooms, kept from the event stream."""

    def __init__(
        self,
        store: Store,
        config: Callable[[], Config],
        engine: Callable[[], PolicyEngine],
        services: WorkerServices,
    ) -> None:
        self.store = store
        self.config = config
        self.engine = engine
        self.services = services
        #: Rooms the bot is joined to, as committed.
        self.joined_rooms: set[str] = set()
        #: The space links' claims and the spaces' power, as committed.
        self.spaces = SpaceLinks()

    async def load(self) -> None:
        """Read which rooms the bot is joined to, and the space links."""
        self.joined_rooms = {r["room_id"] for r in await self.store.rooms.known() if r["joined"]}
        self.spaces = SpaceLinks.decode(await self.store.state.get(SPACES_KEY))

    def joined(self, room_id: str, batch: Batch | None = None) -> bool:
        """Whether the bot is in ``room_id``: as ``batch`` leaves it, when given."""
        staged = None if batch is None else batch.staged_joined(room_id)
        return room_id in self.joined_rooms if staged is None else staged

    async def note_joined(self, room_id: str) -> None:
        """The bot joined ``room_id`` outside the worker (the management room at start):
        stored, then remembered."""
        await self.store.rooms.upsert(room_id, joined=True)
        self.joined_rooms.add(room_id)

    def on_event(self, event: Mapping[str, Any], batch: Batch, cfg: Config) -> None:
        """Stage what ``event`` changes about rooms."""
        etype = event.get("type")
        sender = as_str(event.get("sender")) or ""
        if etype == "m.room.member":
            self._membership(event, batch, cfg)
        elif etype in (ACL, RETENTION) and "state_key" in event and sender != cfg.bot_mxid:
            self._state_drift(event, batch)
        if etype in SPACE_EVENTS and isinstance(event.get("state_key"), str):
            self._space_event(event, batch)
        if (
            etype == "m.room.create"
            and sender != cfg.bot_mxid  # rooms the bot creates are its own already
            and cfg.bridge.auto_enroll
            and cfg.homeserver.admin_token
        ):
            self._enroll(as_str(event.get("room_id")) or "", batch, cfg)

    # -- membership ---------------------------------------------------------------------

    def _membership(self, event: Mapping[str, Any], batch: Batch, cfg: Config) -> None:
        room_id = as_str(event.get("room_id"))
        content = event.get("content")
        membership = content.get("membership") if isinstance(content, dict) else None
        target = event.get("state_key")
        if not room_id or not isinstance(target, str):
            return
        if target != cfg.bot_mxid:
            self._other_member(room_id, target, str(membership), batch, cfg)
            return
        if membership == "invite":
            inviter = as_str(event.get("sender")) or ""
            if server_name(inviter) == cfg.homeserver.domain or cfg.role_of(inviter):
                log.info(
                    "invited to %s by %s (event %s); joining",
                    room_id,
                    inviter,
                    event.get("event_id"),
                )
                batch.actions.append(actions.join(room_id))
            else:
                log.info(
                    "ignoring invite to %s from remote user %s (event %s)",
                    room_id,
                    inviter,
                    event.get("event_id"),
                )
        elif membership == "join":
            if not self.joined(room_id, batch):
                batch.actions.append(actions.reconcile(room_id, "bot joined"))
            self._stage_joined(room_id, True, batch)
        elif membership in ("leave", "ban"):
            self._stage_joined(room_id, False, batch)

    def _stage_joined(self, room_id: str, joined: bool, batch: Batch) -> None:
        batch.stage_room(room_id, joined=joined)
        batch.after_commit.append(lambda: self._set_joined(room_id, joined))

    def _set_joined(self, room_id: str, joined: bool) -> None:
        if joined:
            self.joined_rooms.add(room_id)
        else:
            self.joined_rooms.discard(room_id)

    def _other_member(
        self, room_id: str, user: str, membership: str, batch: Batch, cfg: Config
    ) -> None:
        enforcer = self.services.rooms
        batch.after_commit.append(lambda: enforcer.note_member(room_id, user, membership))
        if membership not in ("join", "invite", "knock") or not self.joined(room_id, batch):
            return
        policy = self.engine().federation_for(room_id)
        if not server_allowed(policy, cfg.homeserver.domain, server_name(user)):
            batch.actions.append(actions.reconcile(room_id, f"excluded member {user}"))

    # -- state the policy owns ----------------------------------------------------------

    def _state_drift(self, event: Mapping[str, Any], batch: Batch) -> None:
        """Someone changed a state event the policy owns: restore it and say so."""
        room_id = as_str(event.get("room_id")) or ""
        if not self.joined(room_id, batch) or event.get("state_key") != "":
            return
        engine = self.engine()
        etype = event["type"]
        content = event.get("content") if isinstance(event.get("content"), dict) else {}
        if etype == ACL:
            desired = acl_content(engine.federation_for(room_id), engine.policy.own_server)
            in_line = desired is None or acl_matches(content, desired)
        else:
            desired = retention_content(engine.retention_for(room_id))
            in_line = desired is None or retention_matches(content, desired)
        if in_line:
            return
        sender = as_str(event.get("sender")) or "?"
        log.info(
            "drift: %s changed %s in %s (event %s); restoring",
            sender,
            etype,
            room_id,
            event.get("event_id"),
        )
        batch.stage_room(room_id, lacking=DRIFTED)
        batch.actions.append(actions.reconcile(room_id, f"drift of {etype}"))
        if mgmt := self.services.management_room:
            batch.actions.append(
                actions.notice(
                    mgmt,
                    Reply.plain(
                        f"⚠️ {sender} changed {etype} in {room_id} away from company policy; "
                        "the bridge is restoring it."
                    ),
                )
            )

    # -- spaces -------------------------------------------------------------------------

    def _space_event(self, event: Mapping[str, Any], batch: Batch) -> None:
        """Track which rooms belong to which spaces (scopes of space policies): the links'
        claims and the spaces' power, judged by :mod:`bridge.policy.spaces`."""
        current = self.spaces if batch.spaces is None else batch.spaces
        new = current.apply(event)
        if event.get("type") == PARENT:
            self._log_refused_parent(event, new)
        if new is current:
            return
        if batch.spaces is None:
            batch.after_commit.append(lambda: self._set_spaces(batch.spaces or new))
        batch.spaces = new
        batch.state[SPACES_KEY] = new.encode()
        before, after = current.room_spaces(), new.room_spaces()
        for room in sorted(set(before) | set(after)):
            if before.get(room) != after.get(room) and self.joined(room, batch):
                batch.actions.append(actions.reconcile(room, "space membership changed"))

    def _set_spaces(self, spaces: SpaceLinks) -> None:
        self.spaces = spaces
        live = self.services.policy
        links = spaces.room_spaces()
        if links != live.room_spaces or spaces.power != live.space_power:
            live.set_room_spaces(links, spaces.power)

    @staticmethod
    def _log_refused_parent(event: Mapping[str, Any], after: SpaceLinks) -> None:
        room, space = as_str(event.get("room_id")) or "", event["state_key"]
        if listed(event.get("content")) and not after.claimed(room, space, Side.ROOM):
            log.warning(
                "%s named %s as the space of %s (event %s) without the power to add rooms "
                "to it; the room is not counted in that space",
                event.get("sender"),
                space,
                room,
                event.get("event_id"),
            )

    # -- enrolment ----------------------------------------------------------------------

    def _enroll(self, room_id: str, batch: Batch, cfg: Config) -> None:
        if not room_id:
            return
        # The create event reaches us while Synapse is still building the room: until its
        # power levels exist, make_room_admin answers "No local admin user in room".
        # make_room_admin invites the bot only where it could not join by itself (rooms
        # that are not public), so the join follows it (joining twice is harmless).
        at = time.time() + ENROLL_DELAY
        batch.actions.append(actions.make_room_admin(room_id, cfg.bot_mxid, not_before=at))
        batch.actions.append(actions.join(room_id, not_before=at + 0.5))
