"""help, status and reload, called alone."""

from __future__ import annotations

from bridge.commands import core
from bridge.commands.roles import Role
from tests.kit.services import CommandFake


async def test_help_lists_what_the_role_may_use(fake: CommandFake) -> None:
    admin = await core.help_cmd(fake.context())
    auditor = await core.help_cmd(fake.context(role=Role.AUDITOR))
    assert "!policy reload" in admin.text and "!policy reload" not in auditor.text
    assert "!policy status" in auditor.text
    topic = await core.help_cmd(fake.context(args={"topic": "dlp"}))
    assert "!policy dlp list" in topic.text and "!policy status" not in topic.text


async def test_status_counts_and_shows_the_sweeper(fake: CommandFake) -> None:
    fake.sweeper.lines = ["retention sweep: not run yet"]
    reply = await core.status_cmd(fake.context(role=Role.AUDITOR))
    assert reply.text.startswith("Policy bridge status\n• version ")
    assert "• database: sqlite" in reply.text
    assert "• rooms known: 2" in reply.text
    assert reply.text.endswith("• retention sweep: not run yet")


async def test_reload_reports_what_the_bridge_answers(fake: CommandFake) -> None:
    fake.reload_result = (True, ["changed: dlp"])
    reply = await core.reload_cmd(fake.context())
    assert reply.text == "✅ configuration reloaded\n• changed: dlp"
    fake.reload_result = (False, ["bridge.permissions.@x: expected a role"])
    reply = await core.reload_cmd(fake.context())
    assert reply.text.startswith("⚠️ the new configuration was rejected; the old one stays")
    assert fake.reloads == ["@admin:corp.example"] * 2
