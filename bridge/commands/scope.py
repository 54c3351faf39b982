"""The ``--scope global|here`` option shared by the policy commands."""

from __future__ import annotations

from bridge.commands.context import CommandContext
from bridge.commands.registry import Flag
from bridge.policy.scopes import GLOBAL

SCOPE_FLAG = Flag(
    "scope",
    "global, or here (this room; in a space: the space and its rooms)",
    value="SCOPE",
    choices=("global", "here"),
)


def scope_of(ctx: CommandContext) -> str:
    """``global``, or the room the command was typed in for ``--scope here``."""
    return ctx.room_id if ctx.flags.get("scope") == "here" else GLOBAL


def room_of(scope: str) -> str | None:
    """The room a scope names, for the engine's ``…_for(room)`` lookups (None: global)."""
    return None if scope == GLOBAL else scope


def where(scope: str, ctx: CommandContext | None = None) -> str:
    """``globally``, ``in !room``, or, for a space, ``in !space and the rooms of this space``."""
    if scope == GLOBAL:
        return "globally"
    if ctx is not None:
        spaces = ctx.services.policy.room_spaces
        if any(scope in parents for parents in spaces.values()):
            return f"in {scope} and the rooms of this space"
    return f"in {scope}"
