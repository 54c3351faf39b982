"""What a handler gets: who asked, where, the parsed arguments, and the services."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bridge.commands.roles import Role
from bridge.commands.services import CommandServices, StagedChange
from bridge.store import AuditEntry, NewAction

if TYPE_CHECKING:
    from bridge.commands.registry import CommandRegistry


@dataclass
class CommandContext:
    """One command being run.

    Handlers never write directly: they stage ``state_updates``, ``actions``, an
    ``audit`` summary and extra audit ``records``, which the worker commits together with
    the command's record, and ``after_commit`` callbacks run once that commit succeeded.
    """

    sender: str
    room_id: str
    event_id: str
    role: Role | None  # None only for a self-service command in the asker's notice room
    in_management_room: bool
    args: dict[str, Any]
    flags: dict[str, Any]
    services: CommandServices
    registry: CommandRegistry
    state_updates: dict[str, str] = field(default_factory=dict)
    actions: list[NewAction] = field(default_factory=list)
    audit: dict[str, Any] = field(default_factory=dict)
    after_commit: list[Callable[[], None]] = field(default_factory=list)
    records: list[AuditEntry] = field(default_factory=list)  # audit records of its own kind

    @property
    def prefix(self) -> str:
        """The command prefix in force (``!policy``)."""
        return self.services.config.bridge.command_prefix

    def stage(self, change: StagedChange) -> None:
        """Add a change to the command's commit."""
        self.state_updates.update(change.state)
        self.actions.extend(change.actions)
        self.after_commit.extend(change.after_commit)
