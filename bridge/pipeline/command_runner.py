"""The command pipeline: admin commands typed in Matrix rooms, on the ingest path.

A command is parsed, its sender's role checked against the command's, the handler run,
and the reply sent as a notice in reply to the command; each command leaves a ``command``
audit record. A handler that needs confirmation asks, and the command runs again (with
``--yes``) when its sender reacts with ✅ within :data:`CONFIRM_SECONDS`; the open
confirmations are stored with the batch that changed them, so they survive a restart.

What handlers stage (actions, state values, callbacks) goes into the worker's
:class:`~bridge.pipeline.batch.Batch`, committed with the transaction.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any

from bridge import metrics
from bridge.audit.kinds import AuditKind
from bridge.commands.dispatch import CommandRequest, Outcome, run_command
from bridge.commands.registry import CommandRegistry
from bridge.commands.roles import role_of
from bridge.config import Config
from bridge.pipeline import actions
from bridge.pipeline.batch import Batch, PendingConfirmation, as_str
from bridge.pipeline.room_tracker import RoomTracker
from bridge.pipeline.services import WorkerServices
from bridge.store import AuditEntry, Store
from bridge.store.notice_rooms import notice_room_owner

log = logging.getLogger(__name__)

CONFIRM_REACTION = "\u2705"  # ✅ (with or without a variation selector)
CONFIRM_SECONDS = 600
CONFIRMATIONS_KEY = "commands.pending_confirmations"


class CommandRunner:
    """Runs the commands found on the event stream."""

    def __init__(
        self,
        store: Store,
        registry: CommandRegistry,
        services: WorkerServices,
        tracker: RoomTracker,
    ) -> None:
        self.store = store
        self.registry = registry
        self.services = services
        self.tracker = tracker
        #: Commands waiting for a ✅ reaction, by the command's event ID (as committed).
        self.pending_confirmations: dict[str, PendingConfirmation] = {}

    async def load(self) -> None:
        """Read the commands awaiting confirmation."""
        raw = await self.store.state.get(CONFIRMATIONS_KEY)
        if raw:
            self.pending_confirmations = json.loads(raw)

    async def handle(self, event: Mapping[str, Any], batch: Batch, cfg: Config) -> bool:
        """Run the command ``event`` carries or confirms, if any. True when the event is
        consumed by it (a confirming reaction); a command message is still a message."""
        etype = event.get("type")
        if etype == "m.room.message" and self.is_command(event, cfg):
            await self.run(event, batch, cfg)
            return False
        if etype == "m.reaction" and (original := self.confirmation(event, batch)) is not None:
            await self.run(original, batch, cfg, confirmed=True)
            return True
        return False

    @staticmethod
    def is_command(event: Mapping[str, Any], cfg: Config) -> bool:
        """Whether ``event``'s body starts with the command prefix."""
        content = event.get("content")
        body = content.get("body") if isinstance(content, dict) else None
        if not isinstance(body, str):
            return False
        prefix = cfg.bridge.command_prefix
        return body == prefix or body.startswith(prefix + " ")

    # -- confirmations ------------------------------------------------------------------

    def _pending(self, batch: Batch) -> Mapping[str, PendingConfirmation]:
        """The open confirmations as ``batch`` leaves them."""
        return self.pending_confirmations if batch.confirmations is None else batch.confirmations

    def _staged(self, batch: Batch) -> dict[str, PendingConfirmation]:
        """The batch's copy of the open confirmations, to change (adopted once committed)."""
        if batch.confirmations is None:
            batch.confirmations = dict(self.pending_confirmations)
            batch.after_commit.append(lambda: self._adopt(batch))
        return batch.confirmations

    def _adopt(self, batch: Batch) -> None:
        if batch.confirmations is not None:
            self.pending_confirmations = batch.confirmations

    @staticmethod
    def _stage(batch: Batch, pending: dict[str, PendingConfirmation]) -> None:
        """Store the open confirmations (expired ones dropped) with this batch."""
        now = time.time()
        for key in [k for k, v in pending.items() if now - v["at"] > CONFIRM_SECONDS]:
            del pending[key]
        batch.state[CONFIRMATIONS_KEY] = json.dumps(pending)

    def confirmation(self, event: Mapping[str, Any], batch: Batch) -> Mapping[str, Any] | None:
        """The command a ✅ reaction confirms (same sender, within the time limit)."""
        content = event.get("content")
        rel = content.get("m.relates_to") if isinstance(content, dict) else None
        if not isinstance(rel, dict) or rel.get("rel_type") != "m.annotation":
            return None
        key = rel.get("key")
        if not isinstance(key, str) or not key.startswith(CONFIRM_REACTION):
            return None
        pending = self._pending(batch).get(str(rel.get("event_id")))
        if pending is None or pending["sender"] != event.get("sender"):
            return None
        if time.time() - pending["at"] > CONFIRM_SECONDS:
            return None
        return pending["event"]

    # -- running ------------------------------------------------------------------------

    async def run(
        self, event: Mapping[str, Any], batch: Batch, cfg: Config, *, confirmed: bool = False
    ) -> None:
        """Run one command and stage its reply, effects and audit record."""
        room_id = as_str(event.get("room_id")) or ""
        sender = as_str(event.get("sender")) or ""
        event_id = as_str(event.get("event_id")) or ""
        body = event["content"]["body"]
        prefix = cfg.bridge.command_prefix
        in_mgmt = room_id == self.services.management_room
        owner = None if in_mgmt else await notice_room_owner(self.store, room_id)
        if not in_mgmt and owner is None and not self.tracker.joined(room_id, batch):
            return  # we cannot answer where we are not joined
        role = role_of(cfg, sender)
        started = time.perf_counter()
        if confirmed and role is not None:
            pending = self._staged(batch)
            pending.pop(event_id, None)
            self._stage(batch, pending)
        request = CommandRequest(
            sender,
            room_id,
            event_id,
            prefix,
            body,
            role,
            in_mgmt,
            confirmed=confirmed,
            notice_owner=owner,
        )
        result = await run_command(self.registry, self.services, request)
        name, outcome, reply, details = result.name, result.outcome, result.reply, result.details
        if result.context is not None:
            batch.actions.extend(result.context.actions)
            batch.state.update(result.context.state_updates)
            batch.after_commit.extend(result.context.after_commit)
            batch.audit.extend(result.context.records)
        elif outcome is Outcome.NEEDS_CONFIRMATION:
            pending = self._staged(batch)
            pending[event_id] = {"sender": sender, "event": dict(event), "at": time.time()}
            self._stage(batch, pending)
        counter = metrics.COMMANDS.labels(name, outcome)
        batch.after_commit.append(counter.inc)  # counted once committed
        if outcome is not Outcome.IGNORED:  # someone else's command in a notice room
            batch.actions.append(actions.notice(room_id, reply, reply_to=event_id))
        batch.audit.append(
            AuditEntry(
                kind=AuditKind.COMMAND,
                room_id=room_id,
                sender=sender,
                type=name,
                data={
                    "event_id": event_id,
                    "command": name,
                    "role": role,
                    "outcome": outcome,
                    "reply": reply.text[:2000],
                    "ms": round((time.perf_counter() - started) * 1000, 2),
                    **details,
                },
            )
        )
