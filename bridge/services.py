"""The typed seams between the bridge's parts: what a consumer may use of the running
bridge, instead of the whole bridge. ``app.Bridge`` satisfies each of them (mypy-checked).

The scheduler of background tasks is :mod:`bridge.scheduler`; the seam of a retroactive scan
is :class:`bridge.pipeline.retroactive.RetroServices`, next to it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from bridge.commands.services import CommandServices

if TYPE_CHECKING:  # the protocols only name these types; importing them would be a cycle
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
