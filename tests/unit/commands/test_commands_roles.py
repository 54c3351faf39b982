"""Roles: ranks, parsing, and the roles the config grants."""

from __future__ import annotations

from pathlib import Path

from bridge.commands.roles import Role, role_allows, role_of
from bridge.config import ROLES
from tests.kit.config import make_config


def test_roles() -> None:
    admin, auditor = Role.parse("admin"), Role.parse("auditor")
    assert (admin, auditor) == (Role.ADMIN, Role.AUDITOR)
    assert role_allows(admin, Role.ADMIN) and role_allows(admin, Role.AUDITOR)
    assert role_allows(auditor, Role.AUDITOR) and not role_allows(auditor, Role.ADMIN)
    for nobody in (None, "", "root", "Admin"):
        assert Role.parse(nobody) is None
        assert not role_allows(Role.parse(nobody), Role.AUDITOR)
        assert not role_allows(Role.parse(nobody), Role.ADMIN)


def test_the_roles_are_the_ones_the_config_accepts() -> None:
    assert set(ROLES) == {r.value for r in Role}


def test_role_of_reads_the_permissions_with_their_wildcards(tmp_path: Path) -> None:
    config = make_config(
        {
            "bridge": {
                "permissions": {"@boss:corp.example": "admin", "@*:corp.example": "auditor"}
            },
        },
        base_dir=tmp_path,
    )
    assert role_of(config, "@boss:corp.example") is Role.ADMIN
    assert role_of(config, "@joe:corp.example") is Role.AUDITOR
    assert role_of(config, "@joe:elsewhere.example") is None
