"""Encrypted rooms on the processing path: decrypt, archive the plaintext, retry later.

The raw ``m.room.encrypted`` event is archived on ingest like any event. Here, while the
worker processes its transaction, the bot's E2EE device (:class:`bridge.e2ee.seam.RoomCrypto`)
decrypts it; the decrypted event becomes a ``decrypted`` audit record (sealed like every
record) that names the encrypted event's ID and archive seq, and is then judged like any
event (commands, DLP). An event that cannot be decrypted gets an ``undecryptable`` record
with the reason (no session yet, withheld with its code, …) and waits in ``e2ee_pending``
(sealed bridge state, written in the same commit) until a room key arrives; then it is
decrypted and processed as if it had just come in.

Also here: the transparency notice when the bot joins an encrypted room, and telling the
crypto layer when a room's members change (a new room key for the bot's next message).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from bridge import metrics
from bridge.audit.kinds import AuditKind
from bridge.commands import Reply
from bridge.config import Config
from bridge.e2ee.seam import (
    ENCRYPTED_EVENT,
    ENCRYPTION_STATE,
    Decrypted,
    NotDecrypted,
    RoomCrypto,
    Undecryptable,
)
from bridge.pipeline import actions
from bridge.pipeline.batch import Batch, as_str
from bridge.store import AuditEntry, Store, StoreUnavailable

log = logging.getLogger(__name__)

PENDING_KEY = "e2ee_pending"
DEFAULT_NOTICE = (
    "🔒 This room is end-to-end encrypted, and company policy applies here: the compliance "
    "bot {bot} (device {device}) is now a member. Messages sent from now on are archived "
    "and checked for compliance. Messages sent before it joined cannot be read by it."
)

Pending = dict[str, dict[str, Any]]


class DecryptionStage:
    """The worker's E2EE stage (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        config: Callable[[], Config],
        management_room: Callable[[], str],
    ) -> None:
        self.store = store
        self.config = config
        self.management_room = management_room
        self.crypto: RoomCrypto | None = None
        self.pending: Pending = {}
        self._staged: Pending | None = None
        self._staged_for: Batch | None = None
        self._keys_arrived = False
        self._next_retry = 0.0

    async def load(self) -> None:
        """Read the events still waiting for a key."""
        raw = await self.store.state.get(PENDING_KEY)
        self.pending = json.loads(raw) if raw else {}
        self._publish_counts()

    # -- bookkeeping --------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Undecryptable events waiting for a key, by room."""
        out: dict[str, int] = {}
        for entry in self.pending.values():
            room = str(entry.get("room", ""))
            out[room] = out.get(room, 0) + 1
        return out

    def _publish_counts(self) -> None:
        metrics.E2EE_PENDING.clear()
        for room, n in self.counts().items():
            metrics.E2EE_PENDING.labels(room).set(n)

    def _stage(self, batch: Batch) -> Pending:
        """The pending set as this batch leaves it (a copy until the commit)."""
        if self._staged_for is not batch or self._staged is None:
            self._staged = dict(self.pending)
            self._staged_for = batch
            staged = self._staged

            def commit() -> None:
                self.pending = staged
                self._publish_counts()

            batch.after_commit.append(commit)
        return self._staged

    def _write(self, batch: Batch, staged: Pending) -> None:
        limit = self.config().e2ee.max_pending
        while len(staged) > limit:
            dropped = next(iter(staged))
            entry = staged.pop(dropped)
            batch.audit.append(
                AuditEntry(
                    kind=AuditKind.UNDECRYPTABLE,
                    room_id=as_str(entry.get("room")),
                    type=ENCRYPTED_EVENT,
                    data={
                        "encrypted_event_id": dropped,
                        "encrypted_seq": entry.get("seq"),
                        "reason": "given_up",
                        "detail": f"more than {limit} events waiting for keys",
                    },
                )
            )
        batch.state[PENDING_KEY] = json.dumps(staged, separators=(",", ":"))

    def keys_arrived(self) -> None:
        """Room keys or withheld notices arrived: retry the pending events soon."""
        self._keys_arrived = True

    def retry_due(self) -> bool:
        """Whether :meth:`retry` has something to do now."""
        if not self.pending or self.crypto is None:
            return False
        return self._keys_arrived or time.monotonic() >= self._next_retry

    # -- the worker's calls -------------------------------------------------------------

    async def before_commit(self) -> None:
        """Make the replay protection of the batch's decrypted events durable (their
        message indexes, one transaction); awaited before the batch is committed, so no
        decrypted record is ever committed without its index. A failure raises
        :class:`StoreUnavailable` (the worker backs off and processes the batch again)."""
        if self.crypto is None:
            return
        try:
            await self.crypto.flush()
        except Exception as e:  # the batch is not committed; the worker retries it
            raise StoreUnavailable(
                f"the crypto store could not write message indexes ({e.__class__.__name__})"
            ) from e

    async def decrypt(
        self, event: Mapping[str, Any], seq: int, batch: Batch, *, wait: float, joined: bool
    ) -> Mapping[str, Any] | None:
        """The decrypted event of an archived ``m.room.encrypted`` one (recorded in the
        batch), or None (recorded as undecryptable and kept for retry). In a room the bot
        is not in (the appservice sees every room) no key will ever come: recorded as
        ``not_member``, not waited for, not kept."""
        crypto = self.crypto
        if crypto is None or event.get("type") != ENCRYPTED_EVENT:
            return None
        if not joined:
            content = event.get("content")
            session = content.get("session_id") if isinstance(content, dict) else None
            outside = NotDecrypted(
                Undecryptable.NOT_MEMBER, session if isinstance(session, str) else ""
            )
            self._record_undecryptable(event, seq, outside, batch)
            return None
        result = await crypto.decrypt(event, wait=wait)
        event_id = as_str(event.get("event_id")) or ""
        if isinstance(result, Decrypted):
            self._record_decrypted(event, seq, result, batch, late=False)
            return result.event
        self._record_undecryptable(event, seq, result, batch)
        staged = self._stage(batch)
        staged[event_id] = {
            "seq": seq,
            "room": as_str(event.get("room_id")) or "",
            "event": dict(event),
            "reason": str(result.reason),
            "code": result.code,
            "at": int(time.time() * 1000),
        }
        self._write(batch, staged)
        return None

    async def retry(
        self, handle: Callable[[Mapping[str, Any], Batch], Awaitable[None]]
    ) -> Batch | None:
        """Try the pending events again; decrypted ones are recorded and handled in the
        returned batch (None: nothing changed). A changed reason (e.g. a withheld notice
        arrived) is recorded once."""
        crypto = self.crypto
        self._keys_arrived = False
        self._next_retry = time.monotonic() + self.config().e2ee.retry_interval_s
        if crypto is None or not self.pending:
            return None
        batch = Batch()
        staged = self._stage(batch)
        changed = False
        for event_id, entry in list(self.pending.items()):
            event = entry.get("event")
            if not isinstance(event, dict):
                continue
            seq = int(entry.get("seq", 0))
            result = await crypto.decrypt(event)
            if isinstance(result, Decrypted):
                staged.pop(event_id, None)
                self._record_decrypted(event, seq, result, batch, late=True)
                await handle(result.event, batch)
                changed = True
            elif (
                isinstance(result, NotDecrypted)
                and (str(result.reason), result.code) != (entry.get("reason"), entry.get("code"))
                # withheld notices are kept in memory only: after a restart the device
                # answers no_session for them, which is not news
                and not (
                    result.reason is Undecryptable.NO_SESSION
                    and entry.get("reason") == Undecryptable.WITHHELD
                )
            ):
                self._record_undecryptable(event, seq, result, batch)
                staged[event_id] = {**entry, "reason": str(result.reason), "code": result.code}
                changed = True
        if not changed:
            batch.after_commit.clear()
            self._staged_for = None
            return None
        self._write(batch, staged)
        return batch

    def _record_decrypted(
        self,
        event: Mapping[str, Any],
        seq: int,
        result: Decrypted,
        batch: Batch,
        *,
        late: bool,
    ) -> None:
        plain = result.event
        batch.audit.append(
            AuditEntry(
                kind=AuditKind.DECRYPTED,
                room_id=as_str(plain.get("room_id")),
                sender=as_str(plain.get("sender")),
                type=as_str(plain.get("type")),
                data={
                    "end_to_end_encrypted": True,
                    "encrypted_event_id": event.get("event_id"),
                    "encrypted_seq": seq,
                    "session_id": result.session_id,
                    "sender_device_trust": str(result.trust),
                    "late_key": late,
                    "event": dict(plain),
                },
            )
        )
        when = "late" if late else "at_once"
        batch.after_commit.append(lambda: metrics.E2EE_DECRYPTED.labels(when).inc())

    def _record_undecryptable(
        self, event: Mapping[str, Any], seq: int, result: NotDecrypted, batch: Batch
    ) -> None:
        data: dict[str, Any] = {
            "encrypted_event_id": event.get("event_id"),
            "encrypted_seq": seq,
            "session_id": result.session_id,
            "reason": str(result.reason),
        }
        if result.code:
            data["withheld_code"] = result.code
        if result.detail:
            data["detail"] = result.detail
        batch.audit.append(
            AuditEntry(
                kind=AuditKind.UNDECRYPTABLE,
                room_id=as_str(event.get("room_id")),
                sender=as_str(event.get("sender")),
                type=ENCRYPTED_EVENT,
                data=data,
            )
        )
        reason = str(result.reason)
        batch.after_commit.append(lambda: metrics.E2EE_UNDECRYPTABLE.labels(reason).inc())

    async def on_event(self, event: Mapping[str, Any], batch: Batch, joined: bool) -> None:
        """Room changes that matter to the bot's device: the transparency notice when it
        joins an encrypted room (or encryption is turned on where it is), and a new room
        key for its next message when members change."""
        crypto = self.crypto
        if crypto is None:
            return
        cfg = self.config()
        etype = event.get("type")
        room_id = as_str(event.get("room_id")) or ""
        if etype == ENCRYPTION_STATE and event.get("state_key") == "":
            crypto.room_encrypted(room_id, members_changed=True)
            if joined:
                self._transparency(room_id, batch, crypto, cfg)
            return
        if etype != "m.room.member":
            return
        content = event.get("content")
        membership = content.get("membership") if isinstance(content, dict) else None
        unsigned = event.get("unsigned")
        prev = unsigned.get("prev_content") if isinstance(unsigned, dict) else None
        before = prev.get("membership") if isinstance(prev, dict) else None
        if membership == before:
            return  # a profile change
        crypto.room_encrypted(room_id, members_changed=True)
        if event.get("state_key") == cfg.bot_mxid and membership == "join":
            if await crypto.is_encrypted(room_id):
                self._transparency(room_id, batch, crypto, cfg)

    def _transparency(self, room_id: str, batch: Batch, crypto: RoomCrypto, cfg: Config) -> None:
        text = (
            (cfg.e2ee.notice or DEFAULT_NOTICE)
            .replace("{bot}", cfg.bot_mxid)
            .replace("{device}", crypto.device_id)
        )
        batch.actions.append(actions.notice(room_id, Reply.plain(text)))
        log.info("transparency notice queued for encrypted room %s", room_id)
