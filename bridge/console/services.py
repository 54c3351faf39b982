"""The seam between the console and the running bridge: exactly what the console uses.

The bridge (``bridge.app.Bridge``) satisfies :class:`ConsoleServices`; tests pass a small
fake. The console reads through the store's repositories and changes nothing but legal
holds (through :class:`~bridge.store.holds.HoldRepository`, audited like the command) and
its own sessions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from bridge.audit.chain import VerifyReport
from bridge.commands.services import LivePolicyView
from bridge.config import Config
from bridge.store import Store


class ConsoleServices(Protocol):
    """Everything the console may use of the running bridge."""

    @property
    def config(self) -> Config: ...

    @property
    def store(self) -> Store: ...

    @property
    def policy(self) -> LivePolicyView: ...

    @property
    def ready(self) -> bool: ...

    async def verify_archive(self, earlier_keys: Sequence[Ed25519PublicKey]) -> VerifyReport:
        """Check the archive's hash chain and signed checkpoints (as ``audit verify``)."""
        ...
