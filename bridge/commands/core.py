"""The always-present commands: help and status."""

from __future__ import annotations

import time

from bridge import __version__
from bridge.commands.registry import Arg, CommandContext, CommandRegistry, Reply


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


def register(registry: CommandRegistry) -> None:
    """Add help and status to ``registry``."""

    @registry.command(
        "help",
        summary="list the commands you may use",
        role="auditor",
        args=(Arg("topic", "only commands starting with these words", required=False, rest=True),),
        room_scoped=True,
    )
    async def help_cmd(ctx: CommandContext) -> Reply:
        topic = ctx.args.get("topic", "").split()
        prefix = ctx.services.config.bridge.command_prefix
        return registry.help(prefix, ctx.role, topic=topic)

    @registry.command(
        "status",
        summary="version, uptime, rooms, events stored, queue and executor backlog",
        role="auditor",
        room_scoped=True,
    )
    async def status_cmd(ctx: CommandContext) -> Reply:
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
        sweeper = getattr(svc, "sweeper", None)
        if sweeper is not None:
            items.extend(sweeper.status_lines())
        return Reply.lines("Policy bridge status", items)


def register_reload(registry: CommandRegistry) -> None:
    """Add ``reload`` (separate so tests can build a registry without a running bridge)."""

    @registry.command(
        "reload",
        summary="re-read the config file (policies, roles, rules) without a restart",
        role="admin",
    )
    async def reload_cmd(ctx: CommandContext) -> Reply:
        reload = getattr(ctx.services, "reload", None)
        if reload is None:
            return Reply.plain("reload is not available here")
        ok, notes = await reload(ctx.sender)
        if ok:
            return Reply.lines("✅ configuration reloaded", notes)
        return Reply.lines("⚠️ the new configuration was rejected; the old one stays", notes)
