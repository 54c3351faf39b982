"""The live policy: config rules plus the runtime layer admins change with commands.

Holds the current :class:`PolicyEngine` and rebuilds it when the runtime document changes.
The runtime document is persisted in the store's state table under ``policy.dlp``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from .config import Config
from .policy.engine import PolicyEngine, PolicySet
from .policy.layers import DlpLayers, parse_runtime_dlp

log = logging.getLogger(__name__)

RUNTIME_DLP_KEY = "policy.dlp"


def build_engine(
    config: Config, runtime_dlp: Mapping[str, Any] | None = None, management_room: str = ""
) -> PolicyEngine:
    """Compile config + runtime rules into an engine. Raises ValueError on bad rules."""
    layers = DlpLayers(config.dlp, parse_runtime_dlp(runtime_dlp or {}))
    dlp_global, dlp_rooms = layers.compile()
    return PolicyEngine(
        PolicySet(
            own_server=config.homeserver.domain,
            bot_mxid=config.bot_mxid,
            dlp_global=dlp_global,
            dlp_rooms=dlp_rooms,
            management_room=management_room,
        )
    )


class LivePolicy:
    """The engine in force, and the runtime document it was built from."""

    def __init__(self, config: Config, runtime_dlp: Mapping[str, Any] | None = None) -> None:
        self.config = config
        self.runtime_dlp: dict[str, Any] = dict(runtime_dlp or {})
        self.management_room = ""
        self.engine = build_engine(config, self.runtime_dlp)

    @staticmethod
    def decode(value: str | None) -> dict[str, Any]:
        if not value:
            return {}
        doc = json.loads(value)
        return doc if isinstance(doc, dict) else {}

    def preview(self, runtime_dlp: Mapping[str, Any]) -> PolicyEngine:
        """Compile a candidate document without applying it (raises ValueError)."""
        return build_engine(self.config, runtime_dlp, self.management_room)

    def apply(self, runtime_dlp: Mapping[str, Any], engine: PolicyEngine | None = None) -> None:
        """Swap in a new runtime document (and its already compiled engine)."""
        self.engine = engine or build_engine(self.config, runtime_dlp, self.management_room)
        self.runtime_dlp = dict(runtime_dlp)

    def set_management_room(self, room_id: str) -> None:
        """Exempt the management room from DLP (rebuilds the engine)."""
        self.management_room = room_id
        self.engine = build_engine(self.config, self.runtime_dlp, room_id)

    def encoded(self) -> str:
        return json.dumps(self.runtime_dlp, ensure_ascii=False, sort_keys=True)
