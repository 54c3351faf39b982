"""Admin commands typed in Matrix rooms."""

from bridge.commands.registry import (
    Arg,
    CommandContext,
    CommandError,
    CommandRegistry,
    CommandSpec,
    Flag,
    ParsedCommand,
    Reply,
    role_allows,
    tokenize,
)

__all__ = [
    "Arg",
    "CommandContext",
    "CommandError",
    "CommandRegistry",
    "CommandSpec",
    "Flag",
    "ParsedCommand",
    "Reply",
    "role_allows",
    "tokenize",
]
