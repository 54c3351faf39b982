"""The seam between the commands and the running bridge: exactly what handlers use.

Commands import nothing from the pipeline or the app; the bridge (``bridge.app.Bridge``)
satisfies :class:`CommandServices`, and tests pass a small fake
(``tests/kit/services.py``). Changes a command makes are never written directly: the
pipeline hands back a :class:`StagedChange` (state to commit with the command's record,
actions to enqueue, what to run after the commit), and the worker commits it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from mautrix.types import RoomAlias, RoomAliasInfo

from bridge.audit.chain import VerifyReport
from bridge.config import Config
from bridge.policy.engine import PolicyEngine
from bridge.policy.federation import FederationPolicy
from bridge.policy.overrides import OverrideBook
from bridge.store import NewAction, Store


@dataclass(frozen=True, slots=True)
class StagedChange:
    """What a change adds to the command's commit, and what to do once it is committed."""

    state: Mapping[str, str]  # state-table entries written in the command's commit
    actions: tuple[NewAction, ...] = ()  # executor actions enqueued in the same commit
    after_commit: tuple[Callable[[], None], ...] = ()  # in order, after the commit


@dataclass(frozen=True, slots=True)
class RetroScan:
    """A retroactive DLP scan to start after a command's commit (``--retroactive``)."""

    scope: str  # GLOBAL or a room ID (a space's ID covers the rooms in it too)
    rules: frozenset[str]  # rule names (keyword:…, regex:…, detector:…) that count
    since_ms: int
    window_ms: int
    requested_by: str
    command_room: str
    change: str  # what changed, for the report
    probe_word: str | None = None  # a new keyword: only it counts, not its whole list


class LivePolicyView(Protocol):
    """The policy in force and its runtime documents (``bridge.pipeline.live_policy``)."""

    @property
    def engine(self) -> PolicyEngine: ...

    @property
    def room_spaces(self) -> Mapping[str, tuple[str, ...]]: ...

    @property
    def runtime_dlp(self) -> dict[str, Any]: ...

    def doc(self, section: str) -> dict[str, Any]:
        """A copy of a section's runtime document."""
        ...

    def preview(self, doc: Mapping[str, Any], section: str = "dlp") -> PolicyEngine:
        """Compile with a candidate document for ``section`` (raises ValueError)."""
        ...

    def stage(self, section: str, doc: Mapping[str, Any], engine: PolicyEngine) -> StagedChange:
        """Store ``doc`` as the section's runtime document and swap ``engine`` in after
        the commit."""
        ...


class RemovedMembers(Protocol):
    """The members a federation change would remove (``Affected`` in the pipeline)."""

    def __bool__(self) -> bool: ...

    def describe(self) -> str:
        """Counts, servers, and the first rooms with their members."""
        ...


class RoomRollouts(Protocol):
    """Bringing rooms in line with a changed policy (``RoomEnforcer`` in the pipeline)."""

    def stage_rollout(self, rooms: Iterable[str], reason: str) -> StagedChange:
        """Reconciles of ``rooms`` at the rollout rate, with progress reports."""
        ...

    async def affected(
        self,
        current: Callable[[str], FederationPolicy],
        candidate: Callable[[str], FederationPolicy],
        own_server: str,
        rooms: Iterable[str] | None = None,
    ) -> RemovedMembers:
        """The members ``candidate`` would remove that ``current`` keeps, by room."""
        ...

    async def known_lacks(self, rooms: Iterable[str], event_type: str) -> Mapping[str, str]:
        """Of ``rooms``, those where the bot is known to lack the power to send
        ``event_type``, with what it lacks."""
        ...


class RetentionStatus(Protocol):
    """The retention sweeper, as ``status`` reports it."""

    def status_lines(self) -> list[str]: ...


class AliasResolver(Protocol):
    """The bot's Matrix client, as far as commands use it."""

    async def resolve_room_alias(self, room_alias: RoomAlias) -> RoomAliasInfo: ...


class CommandServices(Protocol):
    """Everything a command handler may use of the running bridge."""

    @property
    def config(self) -> Config: ...

    @property
    def store(self) -> Store: ...

    @property
    def policy(self) -> LivePolicyView: ...

    @property
    def rooms(self) -> RoomRollouts: ...

    @property
    def sweeper(self) -> RetentionStatus: ...

    @property
    def client(self) -> AliasResolver: ...

    @property
    def management_room(self) -> str: ...

    def undecryptable_counts(self) -> Mapping[str, int]:
        """End-to-end encrypted events still undecryptable, by room (e2ee)."""
        ...

    @property
    def overrides(self) -> OverrideBook: ...

    @property
    def started_monotonic(self) -> float: ...

    async def reload(self, who: str) -> tuple[bool, list[str]]:
        """Re-read the config file: (applied?, notes for the reply)."""
        ...

    async def count_expiring(self, scope: str, ms: int) -> tuple[int, int]:
        """(messages, rooms) a retention of ``ms`` at ``scope`` would newly delete."""
        ...

    def start_retroactive_scan(self, engine: PolicyEngine, scan: RetroScan) -> None:
        """Scan the archive with ``engine`` in the background (after the commit)."""
        ...

    async def verify_archive(self, earlier_keys: Sequence[Ed25519PublicKey]) -> VerifyReport:
        """Check the archive's hash chain and signed checkpoints, trusting the current
        signing key and ``earlier_keys`` (what ``audit verify`` does on the command line)."""
        ...


__all__ = [
    "AliasResolver",
    "CommandServices",
    "LivePolicyView",
    "RemovedMembers",
    "RetentionStatus",
    "RetroScan",
    "RoomRollouts",
    "StagedChange",
    "Store",
]
