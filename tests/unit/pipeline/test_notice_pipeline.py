"""Sender notices: the gate's refusals become grouped, audited, queued notices."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from bridge.audit.kinds import AuditKind
from bridge.pipeline.actions import ActionKind
from bridge.pipeline.management import ManagementRoom
from bridge.pipeline.notices import SenderNotices
from bridge.policy.model import Action, Finding, Verdict
from bridge.policy.notices import Ledger, NoticeSettings
from bridge.scheduler import Scheduler
from bridge.store import AuditEntry, NewAction, Store
from bridge.store.notice_rooms import load_ledger

DOMAIN = "corp.example"
ALICE = "@alice:corp.example"
ROOM = "!room:corp.example"
CARD = Finding(
    rule="detector:card",
    category="dlp",
    actions=frozenset({Action.BLOCK}),
    message="Your message was blocked by the data-loss-prevention rule 'detector:card'.",
    excerpt="4111 **** **** 1111",
)


class Harness:
    def __init__(self, store: Store, settings: NoticeSettings | None = None) -> None:
        self.queued: list[NewAction] = []
        self.audit: list[AuditEntry] = []
        self.scheduler = Scheduler()
        self.notices = SenderNotices(
            store,
            self.submit,
            self.audit.append,
            self.scheduler,
            lambda: settings or NoticeSettings(),
            DOMAIN,
            "@policybot:corp.example",
            lambda: "!policy",
        )

    async def submit(self, actions: list[NewAction]) -> None:
        self.queued.extend(actions)

    async def settle(self) -> None:
        for _ in range(50):
            if not self.scheduler.running:
                return
            await asyncio.sleep(0.01)


def subject(ref: str, sender: str = ALICE) -> dict[str, object]:
    return {"sender": sender, "room_id": ROOM, "type": "m.room.message", "ref": ref}


async def test_five_blocks_give_one_notice_and_five_audit_records(store: Store) -> None:
    h = Harness(store)
    for i in range(5):
        h.notices.blocked(subject(f"REF{i}-XXXX"), Verdict((CARD,)))
    await h.settle()
    [notice] = h.queued
    assert notice.kind == ActionKind.POLICY_NOTICE
    assert notice.payload["user_id"] == ALICE
    assert notice.payload["ref"] == "REF0-XXXX"
    assert ROOM in notice.payload["body"] and "detector:card" in notice.payload["body"]
    assert "4111" not in notice.payload["body"] and "4111" not in notice.payload["html"]
    assert [e.kind for e in h.audit] == [AuditKind.NOTICE] * 5
    assert [e.data["outcome"] for e in h.audit] == ["sent"] + ["grouped"] * 4
    assert all("excerpt" not in e.data for e in h.audit)
    ledger = Ledger.loads(await load_ledger(store, ALICE))
    assert [r.ref for r in ledger.recent] == [f"REF{i}-XXXX" for i in range(5)]
    assert ledger.find("REF3-XXXX") is not None


async def test_remote_senders_the_bot_and_opted_out_rules_get_none(store: Store) -> None:
    h = Harness(store)
    h.notices.blocked(subject("AAAA-0001", "@mallory:other.example"), Verdict((CARD,)))
    h.notices.blocked(subject("AAAA-0002", "@policybot:corp.example"), Verdict((CARD,)))
    h.notices.blocked({"sender": ALICE, "room_id": ROOM}, Verdict((CARD,)))  # no ref
    quiet = replace(CARD, notify_sender=False)
    h.notices.blocked(subject("AAAA-0003"), Verdict((quiet,)))
    await h.settle()
    assert h.queued == []
    assert [e.data["outcome"] for e in h.audit] == ["opted out"]


async def test_disabled_notices_are_audited_not_sent(store: Store) -> None:
    h = Harness(store, NoticeSettings(enabled=False))
    h.notices.blocked(subject("AAAA-0004"), Verdict((CARD,)))
    await h.settle()
    assert h.queued == []
    assert h.audit[0].data["outcome"] == "disabled"


async def test_the_management_room_hands_refusals_to_the_sender_notices(store: Store) -> None:
    h = Harness(store)
    mgmt_queued: list[NewAction] = []

    async def submit(actions: list[NewAction]) -> None:
        mgmt_queued.extend(actions)

    mgmt = ManagementRoom(submit, h.scheduler, "!mgmt:corp.example")
    mgmt.sender_notices = h.notices
    mgmt.gate_blocked(subject("AAAA-0005"), Verdict((CARD,)))
    await h.settle()
    assert [a.kind for a in h.queued] == [ActionKind.POLICY_NOTICE]
    assert mgmt_queued == []  # a block-only rule does not notify the management room
