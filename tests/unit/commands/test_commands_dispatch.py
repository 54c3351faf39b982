"""run_command: roles, rooms, confirmations and failures become replies and outcomes."""

from __future__ import annotations

from bridge.commands.context import CommandContext
from bridge.commands.dispatch import CommandRequest, Outcome, run_command
from bridge.commands.errors import NeedsConfirmation
from bridge.commands.registry import Arg, CommandRegistry, Flag
from bridge.commands.replies import Reply
from bridge.commands.roles import Role
from tests.kit.services import CommandFake
from tests.unit.commands.conftest import ADMIN, MGMT, ROOM

SEEN: list[CommandContext] = []


def registry() -> CommandRegistry:
    r = CommandRegistry()

    @r.command("echo", summary="echo", role=Role.AUDITOR, args=[Arg("text", rest=True)])
    async def echo(ctx: CommandContext) -> Reply:
        SEEN.append(ctx)
        ctx.audit["echoed"] = len(ctx.args["text"])
        ctx.state_updates["k"] = "v"
        return Reply.plain(ctx.args["text"])

    @r.command("wide", summary="wide", flags=[Flag("yes")], room_scoped=True)
    async def wide(ctx: CommandContext) -> Reply:
        if not ctx.flags.get("yes"):
            raise NeedsConfirmation("this is wide")
        return Reply.plain("done")

    @r.command("boom", summary="boom", role=Role.AUDITOR)
    async def boom(ctx: CommandContext) -> Reply:
        raise RuntimeError("kaput")

    return r


def request(
    body: str, *, role: Role | None = Role.ADMIN, room: str = MGMT, **kw: bool
) -> CommandRequest:
    return CommandRequest(ADMIN, room, "$e", "!policy", body, role, room == MGMT, **kw)


async def test_a_command_runs_with_its_context_and_stages_its_changes(fake: CommandFake) -> None:
    result = await run_command(registry(), fake, request("!policy echo hello world"))
    assert (result.name, result.outcome, result.reply.text) == ("echo", Outcome.OK, "hello world")
    assert result.context is not None and result.context.state_updates == {"k": "v"}
    assert result.details == {"args": {"text": "hello world"}, "flags": {}, "echoed": 11}
    ctx = SEEN[-1]
    assert (ctx.sender, ctx.room_id, ctx.role, ctx.services) == (ADMIN, MGMT, Role.ADMIN, fake)


async def test_no_role_or_too_small_a_role_is_refused(fake: CommandFake) -> None:
    result = await run_command(registry(), fake, request("!policy echo x", role=None))
    assert result.outcome is Outcome.REFUSED and result.context is None
    assert "is not allowed to use policy commands" in result.reply.text
    result = await run_command(registry(), fake, request("!policy wide", role=Role.AUDITOR))
    assert result.outcome is Outcome.REFUSED
    assert result.reply.text == "⚠️ sorry, `!policy wide` needs the admin role; you have auditor."


async def test_management_room_commands_are_refused_elsewhere(fake: CommandFake) -> None:
    result = await run_command(registry(), fake, request("!policy echo x", room=ROOM))
    assert result.outcome is Outcome.REFUSED
    assert "only works in the management room" in result.reply.text
    assert (
        await run_command(registry(), fake, request("!policy wide --yes", room=ROOM))
    ).outcome is Outcome.OK


async def test_confirmation_is_asked_and_a_confirmed_request_runs_as_with_yes(
    fake: CommandFake,
) -> None:
    asked = await run_command(registry(), fake, request("!policy wide"))
    assert asked.outcome is Outcome.NEEDS_CONFIRMATION and asked.reply.text == "❓ this is wide"
    assert asked.context is None
    done = await run_command(registry(), fake, request("!policy wide", confirmed=True))
    assert (done.outcome, done.reply.text) == (Outcome.OK, "done")
    assert done.details["flags"] == {"yes": True}


async def test_bad_input_and_failures_become_replies(fake: CommandFake) -> None:
    unknown = await run_command(registry(), fake, request("!policy nope"))
    assert (unknown.name, unknown.outcome) == ("?", Outcome.ERROR)
    assert unknown.reply.text.startswith("⚠️ unknown command 'nope'")
    failed = await run_command(registry(), fake, request("!policy boom"))
    assert (failed.name, failed.outcome) == ("boom", Outcome.ERROR)
    assert failed.reply.text == "⚠️ the command failed unexpectedly; the error is in the logs."
    long = await run_command(registry(), fake, request("!policy echo " + "x" * 5000))
    assert "too long" in long.reply.text and long.outcome is Outcome.ERROR
