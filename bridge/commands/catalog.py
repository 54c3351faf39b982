"""Every command group the bridge offers, collected into one registry."""

from __future__ import annotations

from bridge.commands import audit, core, dlp, exceptions, overrides, reports, rooms
from bridge.commands.registry import CommandGroup, CommandRegistry

GROUPS: tuple[CommandGroup, ...] = (
    core.commands,
    dlp.commands,
    rooms.commands,
    audit.commands,
    reports.commands,
    overrides.commands,
    exceptions.commands,
)


def build_registry() -> CommandRegistry:
    """A registry of every command (a new one each time: registries are not shared)."""
    return CommandRegistry(GROUPS)
