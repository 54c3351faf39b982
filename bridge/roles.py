"""The roles ``bridge.permissions`` grants (pure: shared by the config and the commands)."""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    """A role granted in ``bridge.permissions``."""

    AUDITOR = "auditor"  # reads: status, lists, searches, tests
    ADMIN = "admin"  # changes policies, holds, reloads

    @property
    def rank(self) -> int:
        """Higher ranks may do everything lower ones may."""
        return _RANK[self]

    @classmethod
    def parse(cls, value: str | None) -> Role | None:
        """The role named ``value`` (exactly as configured), or None for no or an unknown role."""
        try:
            return cls(value) if value else None
        except ValueError:
            return None


_RANK = {Role.AUDITOR: 1, Role.ADMIN: 2}
