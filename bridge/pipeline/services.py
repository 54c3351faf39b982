"""The worker's seams: what the worker and the executor's other callers may use of the
running bridge, instead of the whole bridge. ``app.Bridge`` satisfies them (mypy-checked).

Each seam lives next to its consumers: the commands' is
:class:`bridge.commands.services.CommandServices`, a retroactive scan's is
:class:`bridge.pipeline.retroactive.RetroServices`; the scheduler of background tasks is
:mod:`bridge.scheduler`.
"""

from __future__ import annotations

from typing import Protocol

from bridge.commands.services import CommandServices
from bridge.pipeline.enforcement import RoomEnforcer
from bridge.pipeline.live_policy import LivePolicy
from bridge.store import NewAction


class ActionSubmitter(Protocol):
    """Queues actions for the executor outside a worker batch (the executor itself)."""

    async def submit(self, actions: list[NewAction]) -> None: ...


class WorkerServices(CommandServices, Protocol):
    """What the worker reads besides its constructor arguments: the commands' seam (it runs
    them with this object), with the live policy and the room enforcer themselves.
    """

    @property
    def management_room(self) -> str: ...
    @property
    def policy(self) -> LivePolicy: ...
    @property
    def rooms(self) -> RoomEnforcer: ...
