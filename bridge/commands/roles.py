"""Who may do what: the roles of ``bridge.permissions``.

A role includes every role ranked below it: ``admin`` may do everything ``auditor`` may.
"""

from __future__ import annotations

from bridge.config import Config
from bridge.roles import Role


def role_allows(role: Role | None, needed: Role) -> bool:
    """Whether ``role`` may use a command that needs ``needed`` (no role may use nothing)."""
    return role is not None and role.rank >= needed.rank


def role_of(config: Config, user_id: str) -> Role | None:
    """The role ``config`` grants ``user_id`` (exact entry, else ``@*:domain``, else ``*``)."""
    return config.role_of(user_id)


__all__ = ["Role", "role_allows", "role_of"]
