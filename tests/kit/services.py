"""Stand-ins for the bridge (``app.Bridge``) as the worker and the commands see it.

``Services``: what a Worker gets in the pipeline tests: a real store, live policy and room
enforcer; retroactive scans really run. ``CommandFake``: a small
:class:`~bridge.commands.services.CommandServices` for calling command handlers alone: a
real store and live policy, and recorders for rollouts, scans, reloads and retention
counts.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from mautrix.errors import MNotFound
from mautrix.types import RoomAlias, RoomAliasInfo, RoomID

from bridge.archive.cli import verify_store
from bridge.archive.setup import audit_config
from bridge.audit.chain import VerifyReport
from bridge.commands.catalog import build_registry
from bridge.commands.context import CommandContext
from bridge.commands.roles import Role
from bridge.commands.services import CommandServices, RetroScan, StagedChange
from bridge.config import Config
from bridge.pipeline import retroactive
from bridge.pipeline.enforcement import RoomEnforcer
from bridge.pipeline.live_policy import LivePolicy
from bridge.policy.engine import PolicyEngine
from bridge.policy.federation import FederationPolicy
from bridge.policy.overrides import OverrideBook
from bridge.scheduler import Scheduler
from bridge.store import NewAction, Store


async def _quiet(_reply: Any) -> None:
    return None


class Sweeper:
    """The retention sweeper's status, as ``!policy status`` shows it."""

    def __init__(self, lines: Iterable[str] = ()) -> None:
        self.lines = list(lines)

    def status_lines(self) -> list[str]:
        return list(self.lines)


class Client:
    """Resolves the aliases it was given; any other alias is unknown (M_NOT_FOUND)."""

    def __init__(self, aliases: Mapping[str, str] | None = None) -> None:
        self.aliases = dict(aliases or {})

    async def resolve_room_alias(self, room_alias: RoomAlias) -> RoomAliasInfo:
        if room_alias not in self.aliases:
            raise MNotFound(404, f"Room alias {room_alias} not found")
        return RoomAliasInfo(room_id=RoomID(self.aliases[room_alias]), servers=[])


class _Base:
    """What both stand-ins share: store, config, live policy, management room."""

    def __init__(self, store: Store, config: Config, management_room: str) -> None:
        self.store = store
        self.config = config
        self.management_room = management_room
        self.policy = LivePolicy(config)
        self.policy.set_management_room(management_room)
        self.started_monotonic = time.monotonic()
        self.overrides = OverrideBook()
        self.sweeper = Sweeper()
        self.client = Client()
        #: (messages, rooms) ``count_expiring`` answers, and the (scope, ms) it was asked.
        self.expiring = (0, 0)
        self.expiring_asked: list[tuple[str, int]] = []
        #: what ``reload`` answers, and who asked.
        self.reload_result: tuple[bool, list[str]] = (False, ["reload is not available here"])
        self.reloads: list[str] = []
        #: e2ee: what ``undecryptable_counts`` answers (by room)
        self.undecryptable: dict[str, int] = {}

    def undecryptable_counts(self) -> dict[str, int]:
        """End-to-end encrypted events still undecryptable, by room (set by the test)."""
        return self.undecryptable

    async def reload(self, who: str) -> tuple[bool, list[str]]:
        self.reloads.append(who)
        return self.reload_result

    async def count_expiring(self, scope: str, ms: int) -> tuple[int, int]:
        self.expiring_asked.append((scope, ms))
        return self.expiring

    async def verify_archive(self, earlier_keys: Sequence[Ed25519PublicKey]) -> VerifyReport:
        return await verify_store(
            self.store.db.engine,
            [self.store.signing_key.public_key(), *earlier_keys],
            audit_config(self.config).checkpoint_log,
        )


class Services(_Base):
    """Store, config, live policy, management room and a real room enforcer."""

    def __init__(
        self,
        store: Store,
        config: Config,
        management_room: str,
        *,
        notify: Callable[[Any], Awaitable[None]] = _quiet,
        own_server: str = "",
        bot: str = "",
        submit: Callable[[list[NewAction]], Awaitable[None]] | None = None,
    ) -> None:
        super().__init__(store, config, management_room)
        self.scheduler = Scheduler()
        self.rooms = RoomEnforcer(
            store,
            lambda: 1000.0,
            notify,
            own_server=own_server,
            bot=bot,
            submit=submit,
            scheduler=self.scheduler,
        )

    def start_retroactive_scan(self, engine: PolicyEngine, scan: RetroScan) -> None:
        retroactive.start(self, engine, retroactive.RetroJob.from_scan(scan))


@dataclass
class Removed:
    """The members a federation change would remove (what ``affected`` answers)."""

    rooms: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.rooms)

    def describe(self) -> str:
        return "this change would remove " + ", ".join(
            f"{len(users)} member(s) from {room}" for room, users in sorted(self.rooms.items())
        )


class Rollouts:
    """Records the rollouts commands stage; ``removed`` is what ``affected`` answers."""

    def __init__(self) -> None:
        self.staged: list[tuple[list[str], str]] = []
        self.started: list[str] = []
        self.removed = Removed()
        #: (room, event type) -> the lack ``known_lacks`` answers.
        self.lacks: dict[tuple[str, str], str] = {}

    def stage_rollout(self, rooms: Iterable[str], reason: str) -> StagedChange:
        rooms = sorted(rooms)
        self.staged.append((rooms, reason))
        return StagedChange(
            state={"rollout": reason},
            actions=tuple(NewAction("reconcile", {"reason": reason}, room_id=r) for r in rooms),
            after_commit=(lambda: self.started.append(reason),),
        )

    async def affected(
        self,
        current: Callable[[str], FederationPolicy],
        candidate: Callable[[str], FederationPolicy],
        own_server: str,
        rooms: Iterable[str] | None = None,
    ) -> Removed:
        wanted = None if rooms is None else set(rooms)
        return Removed(
            {r: u for r, u in self.removed.rooms.items() if wanted is None or r in wanted}
        )

    async def known_lacks(self, rooms: Iterable[str], event_type: str) -> dict[str, str]:
        """What ``lacks`` holds for ``event_type`` in ``rooms``."""
        wanted = set(rooms)
        return {r: lack for (r, t), lack in self.lacks.items() if r in wanted and t == event_type}


class CommandFake(_Base):
    """The services a command handler needs, for calling it alone (see module doc)."""

    def __init__(self, store: Store, config: Config, management_room: str = "") -> None:
        super().__init__(store, config, management_room)
        self.rooms = Rollouts()
        self.scans: list[tuple[PolicyEngine, RetroScan]] = []

    def start_retroactive_scan(self, engine: PolicyEngine, scan: RetroScan) -> None:
        self.scans.append((engine, scan))

    def context(
        self,
        *,
        sender: str = "@admin:corp.example",
        room_id: str | None = None,
        role: Role = Role.ADMIN,
        args: Mapping[str, Any] | None = None,
        flags: Mapping[str, Any] | None = None,
    ) -> CommandContext:
        """A context for calling a handler directly (default: an admin in the management
        room)."""
        room = room_id or self.management_room
        return CommandContext(
            sender=sender,
            room_id=room,
            event_id="$command",
            role=role,
            in_management_room=room == self.management_room,
            args=dict(args or {}),
            flags=dict(flags or {}),
            services=self,
            registry=build_registry(),
        )

    def commit(self, ctx: CommandContext) -> None:
        """What the worker does after the command's commit: run its callbacks."""
        for callback in ctx.after_commit:
            callback()


def _satisfies(fake: CommandFake, services: Services) -> tuple[CommandServices, CommandServices]:
    return fake, services  # mypy (when run on tests/kit) checks both stand-ins fit the protocol


class ConsoleFake(_Base):
    """What the compliance console uses (``bridge.console.services.ConsoleServices``)."""

    def __init__(self, store: Store, config: Config, *, ready: bool = True) -> None:
        super().__init__(store, config, "")
        self.ready = ready
