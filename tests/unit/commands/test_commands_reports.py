"""Self-service reports in a notice room: the dispatch rule, the report, the stats."""

from __future__ import annotations

from bridge import metrics
from bridge.commands.catalog import build_registry
from bridge.commands.dispatch import CommandRequest, Outcome, run_command
from bridge.commands.reports import REPORTS_KEY
from bridge.commands.roles import Role
from bridge.policy.notices import Ledger, NoticeSettings, Refusal, Subject, decide
from bridge.store.notice_rooms import save_ledger
from tests.kit.services import CommandFake
from tests.unit.commands.conftest import ADMIN, AUDITOR, MGMT, ROOM

ALICE = "@alice:corp.example"  # no role
NOTICES = "!notices-alice:corp.example"
REF = "K7QM-2XPA"


async def refused(fake: CommandFake, rule: str = "detector:card") -> None:
    refusal = Refusal(
        REF, rule, ROOM, 0.0, Subject.MESSAGE, "blocked by 'detector:card'", "4111 **** 1111"
    )
    ledger = decide(Ledger(), refusal, NoticeSettings()).ledger
    await save_ledger(fake.store, ALICE, ledger.dumps())


def req(body: str, *, sender: str = ALICE, room: str = NOTICES, owner: str | None = ALICE,
        role: Role | None = None) -> CommandRequest:  # fmt: skip
    return CommandRequest(
        sender, room, "$c", "!policy", body, role, room == MGMT, notice_owner=owner
    )


async def run(fake: CommandFake, request: CommandRequest):  # type: ignore[no-untyped-def]
    result = await run_command(build_registry(), fake, request)
    if result.context is not None:
        fake.commit(result.context)
    return result


async def test_the_recipient_reports_without_a_role_and_the_management_room_is_told(
    fake: CommandFake,
) -> None:
    await refused(fake)
    before = metrics.REGISTRY.get_sample_value(
        "bridge_dlp_reports_total", {"rule": "detector:card"}
    )
    result = await run(fake, req(f"!policy report {REF.lower()} it was a test number"))
    assert result.outcome is Outcome.OK, result.reply.text
    assert "sent to the compliance team" in result.reply.text
    assert result.context is not None
    [action] = result.context.actions
    assert (action.kind, action.room_id) == ("send_notice", MGMT)
    body = action.payload["body"]
    for part in (REF, ALICE, "detector:card", ROOM, "4111 **** 1111", "it was a test number"):
        assert part in body
    assert result.details["ref"] == REF and result.details["rule"] == "detector:card"
    assert result.context.state_updates[REPORTS_KEY] == '{"detector:card": 1}'
    after = metrics.REGISTRY.get_sample_value("bridge_dlp_reports_total", {"rule": "detector:card"})
    assert (after or 0) == (before or 0) + 1


async def test_a_report_of_an_upload_says_it_had_no_room(fake: CommandFake) -> None:
    """An upload is judged before it has a room (by the global rules): the report says so
    and suggests no --room."""
    refusal = Refusal(
        REF, "detector:card", "", 0.0, Subject.UPLOAD, "blocked", "4111 **** 1111",
        file="PDF, 12 KiB",
    )  # fmt: skip
    await save_ledger(fake.store, ALICE, decide(Ledger(), refusal, NoticeSettings()).ledger.dumps())
    result = await run(fake, req(f"!policy report {REF} a test card"))
    assert result.outcome is Outcome.OK, result.reply.text
    assert result.context is not None
    [action] = result.context.actions
    body = action.payload["body"]
    assert "room: (none: judged by the global rules)" in body
    assert "refused: their upload (PDF, 12 KiB) at" in body
    assert "--room" not in body and f"!policy dlp dismiss {REF}" in body


async def test_an_unknown_reference_is_refused(fake: CommandFake) -> None:
    await refused(fake)
    result = await run(fake, req("!policy report ZZZZ-ZZZZ"))
    assert result.outcome is Outcome.ERROR
    assert "ZZZZ-ZZZZ" in result.reply.text


async def test_someone_else_in_a_notice_room_is_ignored_even_an_admin(fake: CommandFake) -> None:
    await refused(fake)
    for sender, role in ((ADMIN, Role.ADMIN), ("@mallory:corp.example", None)):
        for body in (f"!policy report {REF}", "!policy help", "!policy status"):
            result = await run(fake, req(body, sender=sender, role=role))
            assert result.outcome is Outcome.IGNORED
            assert result.context is None


async def test_only_self_service_commands_work_in_a_notice_room(fake: CommandFake) -> None:
    result = await run(fake, req("!policy status", role=Role.ADMIN, sender=ALICE))
    assert result.outcome is Outcome.REFUSED
    assert "only `!policy report` and `!policy override` work" in result.reply.text


async def test_report_works_nowhere_but_the_own_notice_room(fake: CommandFake) -> None:
    await refused(fake)
    for room in (MGMT, ROOM):
        result = await run(fake, req(f"!policy report {REF}", room=room, owner=None, role=None))
        assert result.outcome is Outcome.REFUSED  # role-less: refused as before
        result = await run(
            fake, req(f"!policy report {REF}", sender=ADMIN, room=room, owner=None, role=Role.ADMIN)
        )
        assert result.outcome is Outcome.REFUSED
        assert "works only in your policy-notice room" in result.reply.text


async def test_dlp_stats_lists_reports_per_rule(fake: CommandFake) -> None:
    await fake.store.state.set(REPORTS_KEY, '{"detector:card": 3, "keyword:x": 1}')
    result = await run(
        fake,
        CommandRequest(AUDITOR, MGMT, "$c", "!policy", "!policy dlp stats", Role.AUDITOR, True),
    )
    assert result.outcome is Outcome.OK
    lines = result.reply.text.splitlines()
    assert lines[1].startswith("• detector:card: 3 reports")
    assert any(line.startswith("• keyword:x: 1 reports") for line in lines)


async def refused_overridable(fake: CommandFake, overridable: bool = True) -> Refusal:
    refusal = Refusal(
        REF,
        "detector:card",
        ROOM,
        0.0,
        Subject.MESSAGE,
        "blocked",
        "4111 **** 1111",
        overridable=overridable,
        digest="d" * 64,
    )
    await save_ledger(fake.store, ALICE, decide(Ledger(), refusal, NoticeSettings()).ledger.dumps())
    return refusal


async def test_an_override_is_granted_once_audited_and_told(fake: CommandFake) -> None:
    await refused_overridable(fake)
    result = await run(fake, req(f"!policy override {REF} customer asked for a refund"))
    assert result.outcome is Outcome.OK, result.reply.text
    grant = fake.overrides.get(REF)
    assert grant is not None and grant.usable(grant.expires - 1)
    assert (grant.sender, grant.room_id, grant.digest) == (ALICE, ROOM, "d" * 64)
    assert result.context is not None
    [record] = result.context.records
    assert record.kind == "override" and record.type == "granted"
    assert record.data["justification"] == "customer asked for a refund"
    [told] = result.context.actions
    assert told.room_id == MGMT and "customer asked for a refund" in told.payload["body"]
    # Used: a second override of the same refusal is refused.
    fake.overrides.consume(ALICE, ROOM, "d" * 64, grant.expires - 1)
    again = await run(fake, req(f"!policy override {REF} once more please"))
    assert again.outcome is Outcome.ERROR and "already used" in again.reply.text


async def test_a_rule_not_marked_overridable_refuses_with_a_reason(fake: CommandFake) -> None:
    await refused_overridable(fake, overridable=False)
    result = await run(fake, req(f"!policy override {REF} customer asked for a refund"))
    assert result.outcome is Outcome.ERROR
    assert "cannot be overridden" in result.reply.text and "report" in result.reply.text
    assert fake.overrides.get(REF) is None


async def test_admins_list_and_revoke_overrides(fake: CommandFake) -> None:
    await refused_overridable(fake)
    await run(fake, req(f"!policy override {REF} customer asked for a refund"))
    listed = await run(
        fake,
        CommandRequest(
            AUDITOR, MGMT, "$l", "!policy", "!policy overrides list", Role.AUDITOR, True
        ),
    )
    assert REF in listed.reply.text and "usable" in listed.reply.text
    revoked = await run(
        fake,
        CommandRequest(
            ADMIN, MGMT, "$r", "!policy", f"!policy overrides revoke {REF}", Role.ADMIN, True
        ),
    )
    assert revoked.outcome is Outcome.OK
    grant = fake.overrides.get(REF)
    assert grant is not None and grant.revoked_by == ADMIN
    assert fake.overrides.consume(ALICE, ROOM, "d" * 64, 0.0) is None


async def test_a_refusal_is_reported_once(fake: CommandFake) -> None:
    await refused(fake)
    first = await run(fake, req(f"!policy report {REF} first"))
    assert first.outcome is Outcome.OK and first.context is not None
    for key, value in first.context.state_updates.items():  # what the worker commits
        await fake.store.state.set(key, value)
    again = await run(fake, req(f"!policy report {REF} second"))
    assert again.outcome is Outcome.ERROR and "already reported" in again.reply.text
    assert again.context is None
