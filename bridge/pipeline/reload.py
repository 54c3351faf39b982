"""Loading the live policy: at start from the runtime documents kept in the store, and on a
reload (``!policy reload``, SIGHUP) from the config file.

A reload re-reads and validates the file; an invalid one is rejected with its problems and
the running config stays. Otherwise the new config and policy are swapped in, the reload is
audited, options that only take effect at start are named, and a changed room-level policy
is rolled out.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from bridge.audit.kinds import AuditKind
from bridge.commands import Reply
from bridge.config import Config, ConfigError, load_config
from bridge.logs import setup_logging
from bridge.pipeline.live_policy import (
    SECTIONS,
    SPACES_KEY,
    LivePolicy,
    runtime_key,
)
from bridge.pipeline.rollout import ROOM_SECTIONS
from bridge.policy.spaces import SpaceLinks
from bridge.store import AuditEntry, Store, StoreUnavailable

log = logging.getLogger(__name__)

RESTART_SECTIONS = ("appservice", "gate", "database", "homeserver", "metrics")  # read at start only
LIVE_SECTIONS = ("bridge", "executor", "logging", "dlp", "federation", "retention")


async def load_runtime_policy(store: Store, policy: LivePolicy) -> None:
    """Apply the runtime policy documents and room→space map kept in the store."""
    links = SpaceLinks.decode(await store.state.get(SPACES_KEY))
    policy.room_spaces = links.room_spaces()
    policy.space_power = dict(links.power)
    for section in SECTIONS:
        doc = LivePolicy.decode(await store.state.get(runtime_key(section)))
        try:
            policy.apply(doc, section=section)
        except ValueError as e:
            log.error("the runtime %s rules in the database are invalid, ignored: %s", section, e)


@dataclass(frozen=True)
class ConfigChange:
    """What differs between two configs: sections applied live, and those needing a restart."""

    changed: tuple[str, ...]
    needs_restart: tuple[str, ...]

    @classmethod
    def between(cls, old: Config, new: Config) -> ConfigChange:
        restart = [name for name in RESTART_SECTIONS if getattr(old, name) != getattr(new, name)]
        if old.data_dir != new.data_dir:
            restart.append("data_dir")
        changed = [name for name in LIVE_SECTIONS if getattr(old, name) != getattr(new, name)]
        return cls(tuple(changed), tuple(restart))

    @property
    def needs_rollout(self) -> bool:
        return any(c in self.changed for c in ROOM_SECTIONS)

    def notes(self) -> list[str]:
        """The lines a reload reports."""
        notes = [f"changed: {', '.join(self.changed) or 'nothing'}"]
        if self.needs_restart:
            notes.append(f"these take effect only after a restart: {', '.join(self.needs_restart)}")
        return notes


class Reloader:
    """Re-reads the config file and swaps the new config and policy in.

    ``config``/``policy``/``management_room`` read what is in force now; ``install`` puts a
    new config and policy in force everywhere; ``audit`` records an entry (never lost);
    ``rollout`` brings the rooms in line after a room-level change; ``notify`` posts in the
    management room.
    """

    def __init__(
        self,
        path: Path | None,
        *,
        config: Callable[[], Config],
        policy: Callable[[], LivePolicy],
        management_room: Callable[[], str],
        install: Callable[[Config, LivePolicy], None],
        audit: Callable[[AuditEntry], Awaitable[None]],
        rollout: Callable[[], Awaitable[object]],
        notify: Callable[[Reply], Awaitable[None]],
    ) -> None:
        self.path = path
        self.config = config
        self.policy = policy
        self.management_room = management_room
        self.install = install
        self.audit = audit
        self.rollout = rollout
        self.notify = notify

    async def reload(self, who: str) -> tuple[bool, list[str]]:
        """Re-read the config file; apply policies, roles and rules without a restart.

        Returns whether it was applied, and the problems or the changes (options that only
        take effect at start are named).
        """
        if self.path is None:
            return False, ["the bridge was started without a config file"]
        current = self.policy()
        try:
            new = await asyncio.to_thread(load_config, self.path)
            policy = LivePolicy(new, current.runtime)
            policy.management_room = self.management_room()
            policy.set_room_spaces(current.room_spaces, current.space_power)
        except ConfigError as e:
            log.error("reload by %s rejected; the old config stays: %s", who, e)
            return False, list(e.problems)
        except ValueError as e:
            log.error("reload by %s rejected; the old config stays: %s", who, e)
            return False, [str(e)]
        change = ConfigChange.between(self.config(), new)
        self.install(new, policy)
        setup_logging(new.logging.level, new.logging.format)
        await self.audit(
            AuditEntry(
                kind=AuditKind.CONFIG,
                sender=who if who.startswith("@") else None,
                data={
                    "event": "reload",
                    "by": who,
                    "changed": list(change.changed),
                    "needs_restart": list(change.needs_restart),
                },
            )
        )
        notes = change.notes()
        log.info("config reloaded by %s (%s)", who, "; ".join(notes))
        if change.needs_rollout:
            await self.rollout()
        return True, notes

    async def reload_and_report(self, who: str) -> None:
        """:meth:`reload`, then post its outcome in the management room (SIGHUP)."""
        ok, notes = await self.reload(who)
        if self.management_room():
            text = ("✅ configuration reloaded: " if ok else "⚠️ reload rejected: ") + "; ".join(
                notes
            )
            try:
                await self.notify(Reply.plain(text))
            except StoreUnavailable as e:  # the reload itself took effect; only the notice is lost
                log.warning("could not post the reload result to the management room: %s", e)
