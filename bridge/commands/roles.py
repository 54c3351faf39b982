"""Who may do what: the roles of ``bridge.permissions``.

A role includes every role ranked below it: ``admin`` may do everything ``auditor`` may.
"""

from __future__ import annotations

from enum import StrEnum

from bridge.config import Config


class Role(StrEnum):
    """A role granted in ``bridge.permissions``."""

    AUDITOR = "auditor"  # reads: status, lists, searches, tests
    ADMIN = "admin"  # changes policies, holds, reloads

    @property
    def rank(self) -> int:
        return _RANK[self]

    @classmethod
    def parse(cls, value: str | None) -> Role | None:
        """The role named ``value`` (exactly as configured), or None for no or an unknown role."""
        try:
            return cls(value) if value else None
        except ValueError:
            return None


_RANK = {Role.AUDITOR: 1, Role.ADMIN: 2}


def role_allows(role: Role | None, needed: Role) -> bool:
    """Whether ``role`` may use a command that needs ``needed`` (no role may use nothing)."""
    return role is not None and role.rank >= needed.rank


def role_of(config: Config, user_id: str) -> Role | None:
    """The role ``config`` grants ``user_id`` (exact entry, else ``@*:domain``, else ``*``)."""
    return Role.parse(config.role_of(user_id))
