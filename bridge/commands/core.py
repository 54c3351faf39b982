"""The always-present commands: help, status and reload."""

from __future__ import annotations

import time

from bridge import __version__
from bridge.commands.context import CommandContext
from bridge.commands.registry import Arg, CommandGroup
from bridge.commands.replies import Reply
from bridge.commands.roles import Role

commands = CommandGroup()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rem = divmod(seconds, 86400)
    hours, rem = divmod(rem, 3600)
    minutes, secs = divmod(rem, 60)
    if days:
        return f"{days}d {hours}h {minutes}m"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {secs}s"


@commands.command(
    "help",
    summary="list the commands you may use",
    role=Role.AUDITOR,
    args=(Arg("topic", "only commands starting with these words", required=False, rest=True),),
    room_scoped=True,
)
async def help_cmd(ctx: CommandContext) -> Reply:
    """The commands the asker's role may use (optionally only those of a topic)."""
    topic = ctx.args.get("topic", "").split()
    return ctx.registry.help(ctx.prefix, ctx.role, topic=topic)


@commands.command(
    "status",
    summary="version, uptime, rooms, events stored, queue and executor backlog",
    role=Role.AUDITOR,
    room_scoped=True,
)
async def status_cmd(ctx: CommandContext) -> Reply:
    """Version, uptime, database, counters, and the retention sweeper's state."""
    svc = ctx.services
    stats = await svc.store.stats.snapshot()
    items = [
        f"version {__version__}, up {_duration(time.monotonic() - svc.started_monotonic)}",
        f"database: {svc.store.db.backend}",
        f"rooms known: {stats.rooms_known}",
        f"events stored: {stats.events} ({stats.records} records in all)",
        f"queue: {stats.queue_depth} transactions waiting, lag {stats.queue_lag_s:.1f}s",
        f"executor: {stats.actions_pending} actions pending, {stats.actions_failed} failed",
    ]
    items.extend(svc.sweeper.status_lines())
    return Reply.lines("Policy bridge status", items)


@commands.command(
    "reload",
    summary="re-read the config file (policies, roles, rules) without a restart",
    role=Role.ADMIN,
)
async def reload_cmd(ctx: CommandContext) -> Reply:
    """Re-read the config file; a rejected file leaves the running config in place."""
    ok, notes = await ctx.services.reload(ctx.sender)
    if ok:
        return Reply.lines("✅ configuration reloaded", notes)
    return Reply.lines("⚠️ the new configuration was rejected; the old one stays", notes)
