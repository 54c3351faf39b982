"""Admin commands typed in Matrix rooms.

``registry`` (declarations, parsing, help), ``dispatch`` (running one command line),
``context`` (what a handler gets), ``replies``, ``roles``, ``services`` (the typed seam to
the running bridge), and one module per command group (``core``, ``dlp``, ``rooms``,
``audit``), collected by ``catalog.build_registry``. Nothing here imports the pipeline or
the app: they call in, never the reverse.
"""

from bridge.commands.context import CommandContext
from bridge.commands.errors import CommandError, NeedsConfirmation
from bridge.commands.registry import (
    Arg,
    CommandGroup,
    CommandRegistry,
    CommandSpec,
    Flag,
    ParsedCommand,
    tokenize,
)
from bridge.commands.replies import Reply
from bridge.commands.roles import Role, role_allows

__all__ = [
    "Arg",
    "CommandContext",
    "CommandError",
    "CommandGroup",
    "CommandRegistry",
    "CommandSpec",
    "Flag",
    "NeedsConfirmation",
    "ParsedCommand",
    "Reply",
    "Role",
    "role_allows",
    "tokenize",
]
