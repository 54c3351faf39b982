"""The errors a command answers with instead of a result."""

from __future__ import annotations


class CommandError(Exception):
    """A user-facing problem with a command (bad arguments, not allowed, …)."""


class NeedsConfirmation(CommandError):
    """The command would have wide effects: repeat with ``--yes`` or react ✅ to confirm."""
