"""The ingest worker: turns committed transactions into decisions and actions.

It reads the work queue in order, judges each event with the policy engine, runs admin
commands, and commits the resulting executor actions and audit records in the same commit
that marks the transaction processed. A crash before that commit means the transaction is
processed again from scratch; after it, never again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from bridge import metrics
from bridge.commands import (
    CommandContext,
    CommandError,
    CommandRegistry,
    Reply,
    role_allows,
    tokenize,
)
from bridge.commands.registry import MAX_COMMAND_LENGTH, NeedsConfirmation, summarize_args
from bridge.config import Config
from bridge.pipeline.enforcement import DRIFTED
from bridge.pipeline.live_policy import SPACES_KEY
from bridge.policy.dlp import CATEGORY as DLP_CATEGORY
from bridge.policy.engine import ENCRYPTION_EVENT, ENCRYPTION_RULE, PolicyEngine
from bridge.policy.federation import acl_content, acl_matches, server_allowed
from bridge.policy.model import Action, Finding, Verdict, server_name
from bridge.policy.retention import retention_content, retention_matches
from bridge.policy.rooms import ACL, RETENTION
from bridge.store import AuditEntry, NewAction, Store, StoreUnavailable, WorkItem
from bridge.store.queue import UnreadableEvent

log = logging.getLogger(__name__)

CONFIRM_REACTION = "\u2705"  # ✅ (with or without a variation selector)
CONFIRM_SECONDS = 600
CONFIRMATIONS_KEY = "commands.pending_confirmations"
ENROLL_DELAY = 3.0  # seconds between seeing a new room and enrolling it


@dataclass
class Batch:
    """What processing one transaction produced, committed together."""

    actions: list[NewAction] = field(default_factory=list)
    audit: list[AuditEntry] = field(default_factory=list)
    state: dict[str, str] = field(default_factory=dict)
    after_commit: list[Callable[[], None]] = field(default_factory=list)


def notice(room_id: str, reply: Reply, *, reply_to: str | None = None, **extra: Any) -> NewAction:
    """An executor action sending a notice (text + HTML) to a room."""
    payload: dict[str, Any] = {"body": reply.text, "html": reply.html, **extra}
    if reply_to:
        payload["reply_to"] = reply_to
    return NewAction("send_notice", payload, room_id=room_id)


def notify_text(finding: Finding, verb: str, sender: object, room_id: object) -> str:
    """The management-room line of a ``notify`` rule (with the masked excerpt, if any)."""
    text = f"Policy {finding.rule} {verb} a message from {sender} in {room_id}"
    return text + (f": {finding.excerpt}" if finding.excerpt else "")


class Worker:
    """Processes the work queue."""

    def __init__(
        self,
        store: Store,
        config: Callable[[], Config],
        engine: Callable[[], PolicyEngine],
        registry: CommandRegistry,
        services: Any,
        on_actions: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        self.config = config
        self.engine = engine
        self.registry = registry
        self.services = services
        self.on_actions = on_actions
        self._wake = asyncio.Event()
        self.joined_rooms: set[str] = set()
        # Commands waiting for a ✅ reaction (persisted with the batch that asked).
        self.pending_confirmations: dict[str, dict[str, Any]] = {}

    def wake(self) -> None:
        self._wake.set()

    async def load(self) -> None:
        """Read which rooms the bot is joined to, and commands awaiting confirmation."""
        self.joined_rooms = {r["room_id"] for r in await self.store.rooms.known() if r["joined"]}
        raw = await self.store.state.get(CONFIRMATIONS_KEY)
        if raw:
            self.pending_confirmations = json.loads(raw)

    def _stage_confirmations(self, batch: Batch) -> None:
        """Persist the open confirmations (expired ones dropped) with this batch."""
        now = time.time()
        self.pending_confirmations = {
            k: v for k, v in self.pending_confirmations.items() if now - v["at"] <= CONFIRM_SECONDS
        }
        batch.state[CONFIRMATIONS_KEY] = json.dumps(self.pending_confirmations)

    async def run(self) -> None:
        """Process the queue forever, waking on new commits (and every few seconds)."""
        backoff = 0.5
        while True:
            try:
                done = await self.run_once()
                backoff = 0.5
            except (StoreUnavailable, SQLAlchemyError, OSError) as e:
                # Reads raise the driver's errors (connection refused, server shut down):
                # the database is away for a while; the worker must outlive it.
                log.warning("store unavailable in worker (%s); retrying in %.1fs", e, backoff)
                self._wake.clear()
                try:  # a new commit means the database is back: retry at once
                    await asyncio.wait_for(self._wake.wait(), backoff)
                except TimeoutError:
                    pass
                backoff = min(backoff * 2, 30)
                continue
            if done:
                continue
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), 5)
            except TimeoutError:
                pass

    async def run_once(self, limit: int = 20) -> int:
        """Process up to ``limit`` pending transactions; returns how many."""
        items = await self.store.queue.pending(limit)
        for item in items:
            await self.process(item)
        if items:
            depth, lag = await self.store.queue.backlog()
            metrics.QUEUE_DEPTH.set(depth)
            metrics.QUEUE_LAG.set(lag)
        return len(items)

    async def process(self, item: WorkItem) -> None:
        """Process one transaction and commit everything it produced at once."""
        batch = Batch()
        unreadable: list[UnreadableEvent] = []
        for stored in item.events:
            if isinstance(stored, UnreadableEvent):
                unreadable.append(stored)
                continue
            event = stored.event
            try:
                await self.handle_event(event, batch)
            except Exception as e:
                # An event we cannot handle must not block the queue: record and move on.
                log.exception(
                    "could not process event %s in %s", event.get("event_id"), event.get("room_id")
                )
                batch.audit.append(
                    AuditEntry(
                        kind="error",
                        room_id=_s(event.get("room_id")),
                        data={
                            "event_id": event.get("event_id"),
                            "seq": stored.seq,
                            "error": e.__class__.__name__,
                        },
                    )
                )
        if unreadable:
            self._unreadable(item, unreadable, batch)
        await self.store.queue.complete([item.queue_id], batch.actions, batch.audit, batch.state)
        for callback in batch.after_commit:
            callback()
        if batch.actions:
            self.on_actions()

    def _unreadable(self, item: WorkItem, events: list[UnreadableEvent], batch: Batch) -> None:
        """Archived events that cannot be read back are skipped, not retried forever: each
        gets an ``error`` audit record (its seq and why; nothing of its content), and the
        management room one notice per transaction. The record itself stays in the archive
        (``audit verify`` reports it if it was altered)."""
        for ev in events:
            log.error(
                "audit record seq %d of transaction %s cannot be read (%s); skipped by the worker",
                ev.seq,
                item.txn_id,
                ev.reason,
            )
            batch.audit.append(
                AuditEntry(
                    kind="error",
                    data={
                        "seq": ev.seq,
                        "error": "unreadable",
                        "reason": ev.reason,
                        "queue_id": item.queue_id,
                    },
                )
            )
        batch.after_commit.append(lambda: metrics.UNREADABLE_EVENTS.inc(len(events)))
        if self.services.management_room:
            seqs = ", ".join(str(e.seq) for e in events[:20])
            more = f" and {len(events) - 20} more" if len(events) > 20 else ""
            reasons = "; ".join(sorted({e.reason for e in events}))
            batch.actions.append(
                notice(
                    self.services.management_room,
                    Reply.plain(
                        f"⚠️ {len(events)} archived event(s) could not be read back for "
                        f"policy checks (audit record seq {seqs}{more}: {reasons}). They were "
                        "skipped; the transaction's other events were processed. "
                        "`!policy audit verify` checks the archive."
                    ),
                )
            )

    # -- per event ----------------------------------------------------------------------

    async def handle_event(self, event: Mapping[str, Any], batch: Batch) -> None:
        cfg = self.config()
        etype = event.get("type")
        sender = _s(event.get("sender")) or ""
        room_id = _s(event.get("room_id")) or ""
        if etype == "m.room.member":
            await self._membership(event, batch, cfg)
        elif etype in (ACL, RETENTION) and "state_key" in event and sender != cfg.bot_mxid:
            await self._state_drift(event, batch)
        elif etype in ("m.space.child", "m.space.parent") and isinstance(
            event.get("state_key"), str
        ):
            self._space_link(event, batch)
        if (
            etype == "m.room.create"
            and sender != cfg.bot_mxid  # rooms the bot creates are its own already
            and cfg.bridge.auto_enroll
            and cfg.homeserver.admin_token
        ):
            self._enroll(room_id, batch, cfg)
        if sender == cfg.bot_mxid:
            return
        if etype == "m.room.message" and self._is_command(event, cfg):
            await self._command(event, batch, cfg)
            # and judged like any message below: a command prefix must not be a way around
            # the rules (the management room is exempt from DLP, so admins can quote text)
        if etype == "m.reaction" and (original := self._confirmation(event)) is not None:
            await self._command(original, batch, cfg, confirmed=True)
            return
        verdict = self.engine().check_event(event)
        if verdict.findings:
            rules = [f.rule for f in verdict.findings if f.category == DLP_CATEGORY]
            if rules:  # counted once committed (a transaction processed again is not)
                batch.after_commit.append(lambda: _count_dlp_hits(rules))
            self._enforce(event, verdict, batch, cfg)

    def _is_command(self, event: Mapping[str, Any], cfg: Config) -> bool:
        content = event.get("content")
        body = content.get("body") if isinstance(content, dict) else None
        if not isinstance(body, str):
            return False
        prefix = cfg.bridge.command_prefix
        return body == prefix or body.startswith(prefix + " ")

    async def _membership(self, event: Mapping[str, Any], batch: Batch, cfg: Config) -> None:
        room_id = _s(event.get("room_id"))
        content = event.get("content")
        membership = content.get("membership") if isinstance(content, dict) else None
        target = event.get("state_key")
        if not room_id or not isinstance(target, str):
            return
        if target != cfg.bot_mxid:
            self._other_member(room_id, target, str(membership), batch, cfg)
            return
        if membership == "invite":
            inviter = _s(event.get("sender")) or ""
            if server_name(inviter) == cfg.homeserver.domain or cfg.role_of(inviter):
                log.info(
                    "invited to %s by %s (event %s); joining",
                    room_id,
                    inviter,
                    event.get("event_id"),
                )
                batch.actions.append(NewAction("join", {}, room_id=room_id))
            else:
                log.info(
                    "ignoring invite to %s from remote user %s (event %s)",
                    room_id,
                    inviter,
                    event.get("event_id"),
                )
        elif membership == "join":
            if room_id not in self.joined_rooms:
                batch.actions.append(self.services.rooms.reconcile(room_id, "bot joined"))
            self.joined_rooms.add(room_id)
            await self.store.rooms.upsert(room_id, joined=True)
        elif membership in ("leave", "ban"):
            self.joined_rooms.discard(room_id)
            await self.store.rooms.upsert(room_id, joined=False)

    def _other_member(
        self, room_id: str, user: str, membership: str, batch: Batch, cfg: Config
    ) -> None:
        self.services.rooms.note_member(room_id, user, membership)
        if membership not in ("join", "invite", "knock") or room_id not in self.joined_rooms:
            return
        policy = self.engine().federation_for(room_id)
        if not server_allowed(policy, cfg.homeserver.domain, server_name(user)):
            batch.actions.append(self.services.rooms.reconcile(room_id, f"excluded member {user}"))

    async def _state_drift(self, event: Mapping[str, Any], batch: Batch) -> None:
        """Someone changed a state event the policy owns: restore it and say so."""
        room_id = _s(event.get("room_id")) or ""
        if room_id not in self.joined_rooms or event.get("state_key") != "":
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
        sender = _s(event.get("sender")) or "?"
        log.info(
            "drift: %s changed %s in %s (event %s); restoring",
            sender,
            etype,
            room_id,
            event.get("event_id"),
        )
        await self.store.rooms.upsert(room_id, lacking=DRIFTED)
        batch.actions.append(self.services.rooms.reconcile(room_id, f"drift of {etype}"))
        if self.services.management_room:
            batch.actions.append(
                notice(
                    self.services.management_room,
                    Reply.plain(
                        f"⚠️ {sender} changed {etype} in {room_id} away from company policy; "
                        "the bridge is restoring it."
                    ),
                )
            )

    def _space_link(self, event: Mapping[str, Any], batch: Batch) -> None:
        """Track which rooms belong to which spaces (scopes of space policies)."""
        room_id = _s(event.get("room_id")) or ""
        key = event["state_key"]
        raw = event.get("content")
        content: Mapping[str, Any] = raw if isinstance(raw, dict) else {}
        present = bool(content.get("via"))
        child, parent = (key, room_id) if event["type"] == "m.space.child" else (room_id, key)
        if not child.startswith("!") or not parent.startswith("!"):
            return
        live = self.services.policy
        spaces = dict(live.room_spaces)
        parents = [p for p in spaces.get(child, ()) if p != parent]
        if present:
            parents.append(parent)
        if parents:
            spaces[child] = tuple(parents)
        else:
            spaces.pop(child, None)
        if spaces == live.room_spaces:
            return
        batch.state[SPACES_KEY] = live.encode({k: list(v) for k, v in spaces.items()})
        batch.after_commit.append(lambda: live.set_room_spaces(spaces))
        if child in self.joined_rooms:
            batch.actions.append(self.services.rooms.reconcile(child, "space membership changed"))

    def _enroll(self, room_id: str, batch: Batch, cfg: Config) -> None:
        if not room_id:
            return
        # The create event reaches us while Synapse is still building the room: until its
        # power levels exist, make_room_admin answers "No local admin user in room".
        # make_room_admin invites the bot only where it could not join by itself (rooms
        # that are not public), so the join follows it (joining twice is harmless).
        at = time.time() + ENROLL_DELAY
        batch.actions.append(
            NewAction("make_room_admin", {"user_id": cfg.bot_mxid}, room_id=room_id, not_before=at)
        )
        batch.actions.append(NewAction("join", {}, room_id=room_id, not_before=at + 0.5))

    # -- commands -----------------------------------------------------------------------

    def _confirmation(self, event: Mapping[str, Any]) -> Mapping[str, Any] | None:
        """The command a ✅ reaction confirms (same sender, within the time limit)."""
        content = event.get("content")
        rel = content.get("m.relates_to") if isinstance(content, dict) else None
        if not isinstance(rel, dict) or rel.get("rel_type") != "m.annotation":
            return None
        key = rel.get("key")
        if not isinstance(key, str) or not key.startswith(CONFIRM_REACTION):
            return None
        pending = self.pending_confirmations.get(str(rel.get("event_id")))
        if pending is None or pending["sender"] != event.get("sender"):
            return None
        if time.time() - pending["at"] > CONFIRM_SECONDS:
            return None
        return pending["event"]

    async def _command(
        self, event: Mapping[str, Any], batch: Batch, cfg: Config, *, confirmed: bool = False
    ) -> None:
        room_id = _s(event.get("room_id")) or ""
        sender = _s(event.get("sender")) or ""
        event_id = _s(event.get("event_id")) or ""
        body = event["content"]["body"]
        prefix = cfg.bridge.command_prefix
        mgmt = self.services.management_room
        in_mgmt = room_id == mgmt
        if not in_mgmt and room_id not in self.joined_rooms:
            return  # we cannot answer where we are not joined
        role = cfg.role_of(sender)
        name = "?"
        outcome = "error"
        started = time.perf_counter()
        try:
            if len(body) > MAX_COMMAND_LENGTH:
                raise CommandError(f"the command is too long (over {MAX_COMMAND_LENGTH} chars)")
            if role is None:
                outcome = "refused"
                raise CommandError(
                    f"sorry, {sender} is not allowed to use policy commands. "
                    "Ask a bridge admin to grant you a role."
                )
            tokens = tokenize(body[len(prefix) :])
            if confirmed:
                self.pending_confirmations.pop(event_id, None)
                self._stage_confirmations(batch)
                tokens.append("--yes")
            parsed = self.registry.parse(tokens, prefix)
            name = parsed.spec.name
            if not role_allows(role, parsed.spec.role):
                outcome = "refused"
                raise CommandError(
                    f"sorry, `{prefix} {name}` needs the {parsed.spec.role} role; you have {role}."
                )
            if not in_mgmt and not parsed.spec.room_scoped:
                outcome = "refused"
                raise CommandError(f"`{prefix} {name}` only works in the management room.")
            ctx = CommandContext(
                sender=sender,
                room_id=room_id,
                event_id=event_id,
                role=role,
                in_management_room=in_mgmt,
                args=parsed.args,
                flags=parsed.flags,
                services=self.services,
            )
            reply = await parsed.spec.handler(ctx)
            outcome = "ok"
            batch.actions.extend(ctx.actions)
            batch.state.update(ctx.state_updates)
            batch.after_commit.extend(ctx.after_commit)
            details = {**summarize_args(parsed), **ctx.audit}
        except NeedsConfirmation as e:
            outcome = "needs confirmation"
            self.pending_confirmations[event_id] = {
                "sender": sender,
                "event": dict(event),
                "at": time.time(),
            }
            self._stage_confirmations(batch)
            reply = Reply.plain(f"❓ {e}")
            details = {}
        except CommandError as e:
            reply = Reply.plain(f"⚠️ {e}")
            details = {}
        except Exception:
            log.exception("command %s failed", name)
            reply = Reply.plain("⚠️ the command failed unexpectedly; the error is in the logs.")
            details = {}
        metrics.COMMANDS.labels(name, outcome).inc()
        batch.actions.append(notice(room_id, reply, reply_to=event_id))
        batch.audit.append(
            AuditEntry(
                kind="command",
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

    # -- enforcement on the ingest path -------------------------------------------------

    def _enforce(
        self, event: Mapping[str, Any], verdict: Verdict, batch: Batch, cfg: Config
    ) -> None:
        room_id = _s(event.get("room_id")) or ""
        event_id = _s(event.get("event_id")) or ""
        sender = _s(event.get("sender")) or ""
        done: list[str] = []
        if event.get("type") == ENCRYPTION_EVENT:
            # Encryption cannot be switched off again (and createRoom's initial state never
            # reaches the gate): redacting the state event would not help, so tell the admins.
            self._encryption_enabled(room_id, sender, verdict, batch, done)
        elif verdict.wants(Action.BLOCK) or verdict.wants(Action.REDACT):
            rule = (verdict.first_block or verdict.findings[0]).rule
            batch.actions.append(
                NewAction(
                    "redact",
                    {"event_id": event_id, "reason": f"removed by company policy ({rule})"},
                    room_id=room_id,
                )
            )
            done.append("redact")
        for f in verdict.findings:
            if f.rule == ENCRYPTION_RULE:
                continue  # reported above
            if Action.WARN in f.actions and room_id in self.joined_rooms:
                batch.actions.append(
                    NewAction(
                        "send_notice",
                        {
                            "body": f"{sender}: {f.message}",
                            "html": Reply.plain(f"{sender}: {f.message}").html,
                            "thread_root": event_id,
                            "mentions": [sender],
                        },
                        room_id=room_id,
                    )
                )
                done.append("warn")
            if Action.NOTIFY in f.actions and self.services.management_room:
                text = notify_text(f, "matched", sender, room_id)
                batch.actions.append(notice(self.services.management_room, Reply.plain(text)))
                done.append("notify")
        batch.audit.append(
            AuditEntry(
                kind="decision",
                room_id=room_id,
                sender=sender,
                type=_s(event.get("type")),
                data={
                    "event_id": event_id,
                    "path": "ingest",
                    "actions": done,
                    "findings": [
                        {"rule": f.rule, "actions": sorted(f.actions), "excerpt": f.excerpt}
                        for f in verdict.findings
                    ],
                },
            )
        )

    def _encryption_enabled(
        self, room_id: str, sender: str, verdict: Verdict, batch: Batch, done: list[str]
    ) -> None:
        mgmt = self.services.management_room
        if not mgmt or not verdict.wants(Action.NOTIFY):
            return
        batch.actions.append(
            notice(
                mgmt,
                Reply.plain(
                    f"⚠️ {sender} turned on end-to-end encryption in {room_id}, where company"
                    f" policy ({ENCRYPTION_RULE}) forbids it (e.g. set when the room was"
                    " created, which the gate cannot refuse). Encryption cannot be turned off"
                    " again: the bridge cannot read or filter messages in this room. Consider"
                    " replacing the room (upgrade it, or create a new unencrypted room)."
                ),
            )
        )
        done.append("notify")


def _count_dlp_hits(rules: list[str]) -> None:
    for rule in rules:
        metrics.DLP_HITS.labels(rule, "ingest").inc()


def _s(value: Any) -> str | None:
    return value if isinstance(value, str) else None
