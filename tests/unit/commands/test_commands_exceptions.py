"""Answering false-positive reports: exceptions (allowed phrases) and dismissals."""

from __future__ import annotations

import json

from bridge.commands.catalog import build_registry
from bridge.commands.dispatch import CommandRequest, Outcome, run_command
from bridge.commands.exceptions import OUTCOMES_KEY
from bridge.commands.roles import Role
from bridge.policy.layers import GLOBAL
from bridge.policy.model import Action
from bridge.policy.notices import Ledger, NoticeSettings, Refusal, Subject, decide
from bridge.store.notice_rooms import save_ledger
from tests.kit.services import CommandFake
from tests.unit.commands.conftest import ADMIN, AUDITOR, MGMT, ROOM

ALICE = "@alice:corp.example"
NOTICES = "!notices-alice:corp.example"
REF = "K7QM-2XPA"
CARD = "4111 1111 1111 1111"
TEST_MESSAGE = f"for the demo use the test card {CARD}"


async def run(fake: CommandFake, request: CommandRequest):  # type: ignore[no-untyped-def]
    """Run a command and do what the worker does on commit (state written, callbacks)."""
    result = await run_command(build_registry(), fake, request)
    if result.context is not None and result.outcome is Outcome.OK:
        for key, value in result.context.state_updates.items():
            await fake.store.state.set(key, value)
        fake.commit(result.context)
    return result


def admin(body: str, room: str = MGMT, role: Role = Role.ADMIN, sender: str = ADMIN):  # type: ignore[no-untyped-def]
    return CommandRequest(sender, room, "$c", "!policy", body, role, room == MGMT)


def blocks(fake: CommandFake, text: str, room: str = ROOM) -> bool:
    findings = fake.policy.engine.dlp_for(room).scan([text])
    return any(Action.BLOCK in f.actions for f in findings)


async def reported(fake: CommandFake) -> None:
    """Alice's message in ROOM was refused by detector:card and she reported it."""
    result = await run(fake, admin("!policy dlp detectors enable card"))
    assert result.outcome is Outcome.OK, result.reply.text
    refusal = Refusal(REF, "detector:card", ROOM, 0.0, Subject.MESSAGE, "blocked", "4111 …")
    await save_ledger(fake.store, ALICE, decide(Ledger(), refusal, NoticeSettings()).ledger.dumps())
    report = await run(
        fake,
        CommandRequest(
            ALICE, NOTICES, "$r", "!policy", f"!policy report {REF} test card", None, False,
            notice_owner=ALICE,
        ),
    )  # fmt: skip
    assert report.outcome is Outcome.OK, report.reply.text
    assert report.context is not None
    [told] = report.context.actions
    assert "!policy dlp except detector:card" in told.payload["body"]
    assert f"--report {REF}" in told.payload["body"] and f"--room {ROOM}" in told.payload["body"]


async def test_a_report_answered_with_an_exception_in_the_reported_room(fake: CommandFake) -> None:
    await reported(fake)
    assert blocks(fake, TEST_MESSAGE)
    result = await run(
        fake,
        admin(f'!policy dlp except detector:card "test card {CARD}" --report {REF} --room {ROOM}'),
    )
    assert result.outcome is Outcome.OK, result.reply.text
    assert "report K7QM-2XPA answered" in result.reply.text
    assert result.context is not None
    assert result.context.audit["change"] == f"allow a phrase for detector:card in {ROOM}"
    assert result.context.audit["outcome"] == "exception"
    assert CARD not in json.dumps(result.details)  # the phrase is audited with digits starred
    assert result.details["phrase"] == "test card **** **** **** ****"
    assert not blocks(fake, TEST_MESSAGE)
    assert blocks(fake, f"{TEST_MESSAGE} and the real one 5555 5555 5555 4444")
    assert blocks(fake, TEST_MESSAGE, room="!elsewhere:corp.example")  # scoped to the room
    assert json.loads(await fake.store.state.get(OUTCOMES_KEY) or "{}") == {
        "detector:card": {"exception": 1}
    }
    stats = await run(fake, admin("!policy dlp stats", role=Role.AUDITOR, sender=AUDITOR))
    assert "detector:card: 1 reports (1 answered with an exception, 0 dismissed)" in (
        stats.reply.text
    )
    # Answered once only; the exception is listed and can be removed.
    again = await run(fake, admin(f"!policy dlp dismiss {REF}"))
    assert again.outcome is Outcome.ERROR and "already answered" in again.reply.text
    in_force = await run(fake, admin("!policy dlp list --scope here", room=ROOM))
    assert f"exception detector:card: “test card {CARD}”" not in in_force.reply.text  # redacted
    listed = await run(fake, admin("!policy dlp exceptions", role=Role.AUDITOR, sender=AUDITOR))
    assert f"in {ROOM}: detector:card: “test card {CARD}” (report {REF})" in listed.reply.text
    elsewhere = await run(
        fake, admin("!policy dlp exceptions", room=ROOM, role=Role.AUDITOR, sender=AUDITOR)
    )
    assert elsewhere.outcome is Outcome.REFUSED and CARD not in elsewhere.reply.text
    removed = await run(
        fake, admin(f'!policy dlp remove-exception detector:card "test card {CARD}" --room {ROOM}')
    )
    assert removed.outcome is Outcome.OK, removed.reply.text
    assert blocks(fake, TEST_MESSAGE)


async def test_a_global_exception_and_refusals(fake: CommandFake) -> None:
    await reported(fake)
    result = await run(fake, admin(f'!policy dlp except detector:card "test card {CARD}"'))
    assert result.outcome is Outcome.OK, result.reply.text
    assert fake.policy.runtime_dlp[GLOBAL]["allowed_phrases"] == [
        {"rule": "detector:card", "phrase": f"test card {CARD}"}
    ]
    assert not blocks(fake, TEST_MESSAGE, room="!elsewhere:corp.example")
    in_force = await run(fake, admin("!policy dlp list"))
    assert f"exception detector:card: “test card {CARD}”" in in_force.reply.text
    for body, error in (
        (f'!policy dlp except detector:card "test card {CARD}"', "already allows"),
        ('!policy dlp except card "x"', "rule must be"),
        ('!policy dlp except detector:card "x" --report ZZZZ-ZZZZ', "no false-positive report"),
        (f'!policy dlp except keyword:x "x" --report {REF}', "is about detector:card"),
        ('!policy dlp except detector:card "x" --room nowhere', "room ID"),
        ('!policy dlp except detector:card "x" --room !r:x --scope here', "not both"),
        ('!policy dlp remove-exception detector:card "nope"', "no exception"),
    ):
        refused = await run(fake, admin(body))
        assert refused.outcome is Outcome.ERROR, body
        assert error in refused.reply.text, (body, refused.reply.text)
    # An auditor may not add exceptions.
    denied = await run(
        fake, admin('!policy dlp except detector:card "y"', role=Role.AUDITOR, sender=AUDITOR)
    )
    assert denied.outcome is Outcome.REFUSED


async def test_a_dismissed_report_is_counted(fake: CommandFake) -> None:
    await reported(fake)
    result = await run(fake, admin(f"!policy dlp dismiss {REF.lower()}"))
    assert result.outcome is Outcome.OK, result.reply.text
    assert blocks(fake, TEST_MESSAGE)
    stats = await run(fake, admin("!policy dlp stats", role=Role.AUDITOR, sender=AUDITOR))
    assert "(0 answered with an exception, 1 dismissed)" in stats.reply.text
