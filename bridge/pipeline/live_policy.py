"""The live policy: config rules plus the runtime layers admins change with commands.

Holds the current :class:`PolicyEngine` and rebuilds it when a runtime document, the
management room or the room→space map changes. Runtime documents are persisted in the
store's state table (``policy.dlp``, ``policy.federation``, ``policy.retention``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from bridge.commands.services import StagedChange
from bridge.config import Config
from bridge.policy.engine import PolicyEngine, PolicySet
from bridge.policy.layers import DlpLayers, EngineCache, parse_runtime_dlp
from bridge.policy.scopes import federation_layers, retention_layers
from bridge.policy.spaces import SpaceLinks, SpacePower

log = logging.getLogger(__name__)

SECTIONS = ("dlp", "federation", "retention")
#: The state-table key of the space links (:class:`~bridge.policy.spaces.SpaceLinks`).
SPACES_KEY = "room_spaces"


def stored_room_spaces(value: str | None) -> dict[str, tuple[str, ...]]:
    """The room→spaces map from the stored space links (either stored form)."""
    return SpaceLinks.decode(value).room_spaces()


def runtime_key(section: str) -> str:
    """The state-table key of a section's runtime document."""
    return f"policy.{section}"


def build_engine(
    config: Config,
    runtime: Mapping[str, Mapping[str, Any]] | None = None,
    management_room: str = "",
    room_spaces: Mapping[str, tuple[str, ...]] | None = None,
    cache: EngineCache | None = None,
    space_power: Mapping[str, SpacePower] | None = None,
) -> PolicyEngine:
    """Compile config + runtime rules into an engine. Raises ValueError on bad rules.

    ``cache`` keeps compiled DLP engines across builds, so a change of the room→space map
    or of one room's rules does not recompile the others. ``space_power``: who may add rooms
    to each space (decides which spaces judge a room's creation).
    """
    runtime = runtime or {}
    layers = DlpLayers(config.dlp, parse_runtime_dlp(runtime.get("dlp") or {}))
    dlp_global, dlp_rooms = layers.compile(room_spaces, cache)
    federation = federation_layers(config.federation.scopes, runtime.get("federation"))
    retention = retention_layers(config.retention.scopes, runtime.get("retention"))
    federation.validate()
    retention.validate()
    return PolicyEngine(
        PolicySet(
            own_server=config.homeserver.domain,
            bot_mxid=config.bot_mxid,
            dlp_global=dlp_global,
            dlp_rooms=dlp_rooms,
            management_room=management_room,
            federation=federation,
            retention=retention,
            room_spaces=dict(room_spaces or {}),
            kick_excluded=config.federation.kick_excluded_members,
            encryption_forbidden=layers.encryption_setting(),
            space_power=dict(space_power or {}),
            rule_scopes=frozenset(layers.scopes() | federation.scopes() | retention.scopes()),
        )
    )


class LivePolicy:
    """The engine in force, and the runtime documents it was built from."""

    def __init__(
        self, config: Config, runtime: Mapping[str, Mapping[str, Any]] | None = None
    ) -> None:
        self.config = config
        self.runtime: dict[str, dict[str, Any]] = {k: dict(v) for k, v in (runtime or {}).items()}
        self.management_room = ""
        self.room_spaces: dict[str, tuple[str, ...]] = {}
        self.space_power: dict[str, SpacePower] = {}
        self.dlp_cache = EngineCache()
        self.engine = self._build(self.runtime)

    def _build(self, runtime: Mapping[str, Mapping[str, Any]]) -> PolicyEngine:
        return build_engine(
            self.config,
            runtime,
            self.management_room,
            self.room_spaces,
            self.dlp_cache,
            self.space_power,
        )

    @property
    def runtime_dlp(self) -> dict[str, Any]:
        return self.runtime.get("dlp", {})

    def doc(self, section: str) -> dict[str, Any]:
        """A copy of a section's runtime document."""
        return json.loads(json.dumps(self.runtime.get(section, {})))

    @staticmethod
    def decode(value: str | None) -> dict[str, Any]:
        if not value:
            return {}
        doc = json.loads(value)
        return doc if isinstance(doc, dict) else {}

    def preview(self, doc: Mapping[str, Any], section: str = "dlp") -> PolicyEngine:
        """Compile with a candidate document for ``section`` (raises ValueError)."""
        return self._build({**self.runtime, section: dict(doc)})

    def apply(
        self, doc: Mapping[str, Any], engine: PolicyEngine | None = None, section: str = "dlp"
    ) -> None:
        """Swap in a new runtime document (and its already compiled engine)."""
        runtime = {**self.runtime, section: dict(doc)}
        self.engine = engine or self._build(runtime)
        self.runtime = runtime

    def stage(self, section: str, doc: Mapping[str, Any], engine: PolicyEngine) -> StagedChange:
        """A command's change of a runtime document: stored in the command's commit, then
        ``engine`` (compiled from it by :meth:`preview`) swapped in."""
        candidate = dict(doc)
        return StagedChange(
            state={runtime_key(section): self.encode(candidate)},
            after_commit=(lambda: self.apply(candidate, engine, section=section),),
        )

    def replace(
        self,
        runtime: Mapping[str, Mapping[str, Any]],
        room_spaces: Mapping[str, tuple[str, ...]],
    ) -> bool:
        """Swap in runtime documents and the room→spaces map another replica stored; the
        engine is rebuilt once, and only if something differs. Raises ValueError on bad
        rules (nothing changes then). Returns whether anything changed."""
        docs = {k: dict(v) for k, v in runtime.items() if v}
        mine = {k: v for k, v in self.runtime.items() if v}
        if docs == mine and dict(room_spaces) == self.room_spaces:
            return False
        old_spaces = self.room_spaces
        self.room_spaces = dict(room_spaces)
        try:
            engine = self._build(docs)
        except ValueError:
            self.room_spaces = old_spaces
            raise
        self.engine, self.runtime = engine, docs
        return True

    def set_management_room(self, room_id: str) -> None:
        """Exempt the management room from DLP (rebuilds the engine)."""
        self.management_room = room_id
        self.engine = self._build(self.runtime)

    def set_room_spaces(
        self,
        room_spaces: Mapping[str, tuple[str, ...]],
        space_power: Mapping[str, SpacePower] | None = None,
    ) -> None:
        """Which spaces each room belongs to, and (when given) who may add rooms to each
        space (rebuilds the engine)."""
        self.room_spaces = dict(room_spaces)
        if space_power is not None:
            self.space_power = dict(space_power)
        self.engine = self._build(self.runtime)

    def encode(self, doc: Mapping[str, Any]) -> str:
        return json.dumps(doc, ensure_ascii=False, sort_keys=True)
