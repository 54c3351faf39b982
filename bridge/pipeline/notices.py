"""Policy notices to blocked senders: the effects around :mod:`bridge.policy.notices`.

The gate reports each refusal (synchronously, it must answer at once); for a local user,
:class:`SenderNotices` decides in the background, under one lock so that refusals of the
same moment are grouped and not raced, whether the user gets a notice, stores the user's
ledger, queues the ``policy_notice`` action (durable: the executor's queue) and records a
``notice`` audit record naming the refusal's reference (the gate's own record names it too).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from bridge.audit.kinds import AuditKind
from bridge.pipeline.actions import policy_notice
from bridge.policy.model import Action, Finding, Verdict
from bridge.policy.notices import (
    Decision,
    Ledger,
    NoticeOutcome,
    NoticeSettings,
    Refusal,
    Subject,
    decide,
    is_local_user,
    render,
    subject_of,
)
from bridge.scheduler import Scheduler, TaskKind
from bridge.store import AuditEntry, NewAction, Store
from bridge.store.notice_rooms import update_ledger

log = logging.getLogger(__name__)


class SenderNotices:
    """Tells local senders why the gate refused something of theirs."""

    def __init__(
        self,
        store: Store,
        submit: Callable[[list[NewAction]], Awaitable[None]],
        record: Callable[[AuditEntry], None],
        scheduler: Scheduler,
        settings: Callable[[], NoticeSettings],
        domain: str,
        bot: str,
        prefix: Callable[[], str],
    ) -> None:
        self.store = store
        self._submit = submit
        self._record = record
        self._scheduler = scheduler
        self._settings = settings
        self._domain = domain
        self._bot = bot
        self._prefix = prefix
        self._lock = asyncio.Lock()

    def blocked(self, subject: Mapping[str, Any], verdict: Verdict) -> None:
        """The gate refused ``subject`` (with its ``ref``): handle it in the background."""
        sender, ref, finding = subject.get("sender"), subject.get("ref"), verdict.first_block
        if finding is None or not isinstance(ref, str) or sender == self._bot:
            return
        if not isinstance(sender, str) or not is_local_user(sender, self._domain):
            return
        invitee, digest = subject.get("invitee"), subject.get("digest")
        blocking = [f for f in verdict.findings if Action.BLOCK in f.actions]
        refusal = Refusal(
            ref=ref,
            rule=finding.rule,
            room_id=str(subject.get("room_id") or ""),
            at=time.time(),
            subject=subject_of(subject),
            reason=finding.message,
            excerpt=finding.excerpt,
            invitee=invitee if isinstance(invitee, str) else "",
            overridable=all(f.overridable for f in verdict.findings if f in blocking),
            digest=digest if isinstance(digest, str) else "",
        )
        self._scheduler.spawn(
            self.handle(sender, refusal, finding), "sender-notice", TaskKind.ONE_OFF
        )

    def upload_refused(self, user_id: str, ref: str, finding: Finding, file: str) -> None:
        """The attachment gate refused ``user_id``'s upload (reference ``ref``; ``file`` its
        type and size): handle it in the background like any refusal. Synapse answers the
        upload with "Bad content" only, so this notice is how the uploader learns why."""
        if user_id == self._bot or not is_local_user(user_id, self._domain):
            return
        refusal = Refusal(
            ref=ref,
            rule=finding.rule,
            room_id="",
            at=time.time(),
            subject=Subject.UPLOAD,
            reason=finding.message,
            excerpt=finding.excerpt,
            file=file,
        )
        self._scheduler.spawn(
            self.handle(user_id, refusal, finding), "sender-notice", TaskKind.ONE_OFF
        )

    async def handle(self, sender: str, refusal: Refusal, finding: Finding) -> Decision:
        """Decide, store the ledger, queue the notice, record the decision."""
        async with self._lock:
            decided: list[Decision] = []

            async def change(stored: str | None) -> str:
                decided[:] = [
                    decide(
                        Ledger.loads(stored),
                        refusal,
                        self._settings(),
                        notify_sender=finding.notify_sender,
                    )
                ]
                return decided[0].ledger.dumps()

            # one transaction, the ledger row locked: another replica refusing the same
            # sender at the same moment decides after this one, on its result
            await update_ledger(self.store, sender, change)
            decision = decided[0]
            if decision.outcome is NoticeOutcome.SENT:
                settings = self._settings()
                text, html = render(
                    refusal,
                    decision.grouped_before,
                    self._prefix(),
                    settings.override_window,
                    settings.languages.for_user(sender),
                )
                details = {"ref": refusal.ref, "rule": refusal.rule, "about_room": refusal.room_id}
                await self._submit([policy_notice(sender, text, html, details)])
        self._record(
            AuditEntry(
                kind=AuditKind.NOTICE,
                room_id=refusal.room_id or None,
                sender=sender,
                type=refusal.rule,
                data={
                    "ref": refusal.ref,
                    "rule": refusal.rule,
                    "subject": str(refusal.subject),
                    "outcome": str(decision.outcome),
                    "grouped_before": decision.grouped_before,
                },
            )
        )
        log.info("refusal %s of %s: notice %s", refusal.ref, sender, decision.outcome)
        return decision
