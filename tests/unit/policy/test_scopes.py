"""Scoped settings: global → space → room, field by field; runtime over config."""

from __future__ import annotations

from typing import Any

import pytest

from bridge.policy.federation import FederationMode, FederationPolicy
from bridge.policy.retention import RetentionPolicy
from bridge.policy.scopes import (
    GLOBAL,
    ScopedSetting,
    build_federation,
    build_retention,
    federation_setting,
    retention_setting,
)

ROOM = "!room:corp.example"
SPACE = "!space:corp.example"
OUTER = "!outer:corp.example"
DAY = 86_400_000


def test_nothing_configured_means_open_federation_and_no_retention() -> None:
    assert federation_setting(None).resolve(ROOM) == FederationPolicy(FederationMode.OPEN)
    assert retention_setting(None).resolve(ROOM) == RetentionPolicy()
    assert retention_setting({}).resolve(None) == RetentionPolicy()


def test_global_fields_apply_everywhere() -> None:
    s = federation_setting({"mode": "allowlist", "servers": ["partner.example"]})
    expected = FederationPolicy(FederationMode.ALLOWLIST, ("partner.example",))
    assert s.resolve(None) == expected
    assert s.resolve(ROOM) == expected
    assert s.resolve(ROOM, (SPACE,)) == expected


def test_room_overrides_space_overrides_global_field_by_field() -> None:
    s = federation_setting(
        {
            "mode": "allowlist",
            "servers": ["partner.example"],
            "allow_ip_literals": True,
            "spaces": {SPACE: {"servers": ["space-partner.example"]}},
            "rooms": {ROOM: {"mode": "denylist"}},
        }
    )
    # The room sets only the mode; servers come from its space, IP literals from global.
    assert s.resolve(ROOM, (SPACE,)) == FederationPolicy(
        FederationMode.DENYLIST, ("space-partner.example",), allow_ip_literals=True
    )
    # Outside the space, the room's servers come from global.
    assert s.resolve(ROOM) == FederationPolicy(
        FederationMode.DENYLIST, ("partner.example",), allow_ip_literals=True
    )
    # Another room in the space.
    assert s.resolve("!other:corp.example", (SPACE,)) == FederationPolicy(
        FederationMode.ALLOWLIST, ("space-partner.example",), allow_ip_literals=True
    )


def test_the_nearest_space_wins_over_outer_spaces() -> None:
    s = retention_setting(
        {
            "max_lifetime": "90d",
            "spaces": {
                OUTER: {"max_lifetime": "60d", "min_lifetime": "1d"},
                SPACE: {"max_lifetime": "30d"},
            },
        }
    )
    # space_ids go from the nearest parent outwards.
    assert s.resolve(ROOM, (SPACE, OUTER)) == RetentionPolicy(30 * DAY, 1 * DAY)
    assert s.resolve(ROOM, (OUTER,)) == RetentionPolicy(60 * DAY, 1 * DAY)
    assert s.fields_for(ROOM, (SPACE, OUTER)) == {"max_lifetime": "30d", "min_lifetime": "1d"}


def test_runtime_overrides_config_in_the_same_scope_only() -> None:
    s = retention_setting(
        {"max_lifetime": "90d", "rooms": {ROOM: {"max_lifetime": "10d"}}},
        runtime={GLOBAL: {"max_lifetime": "30d"}},
    )
    assert s.resolve(None) == RetentionPolicy(30 * DAY)
    assert s.resolve("!other:corp.example") == RetentionPolicy(30 * DAY)
    # The room's config still beats the global runtime value: the room is more specific.
    assert s.resolve(ROOM) == RetentionPolicy(10 * DAY)

    s2 = retention_setting(
        {"rooms": {ROOM: {"max_lifetime": "10d"}}}, runtime={ROOM: {"max_lifetime": "2d"}}
    )
    assert s2.resolve(ROOM) == RetentionPolicy(2 * DAY)


def test_off_switches_a_bound_off_in_a_narrower_scope() -> None:
    s = retention_setting({"max_lifetime": "30d", "rooms": {ROOM: {"max_lifetime": "off"}}})
    assert s.resolve(ROOM) == RetentionPolicy()
    assert s.resolve("!other:corp.example") == RetentionPolicy(30 * DAY)


def test_scopes_lists_every_non_global_scope() -> None:
    s = federation_setting(
        {"mode": "internal", "spaces": {SPACE: {"mode": "open"}}},
        runtime={ROOM: {"mode": "open"}, GLOBAL: {"mode": "internal"}},
    )
    assert s.scopes() == {SPACE, ROOM}


def test_resolve_builds_each_distinct_policy_once() -> None:
    built: list[dict[str, Any]] = []

    def build(fields: Any) -> dict[str, Any]:
        built.append(dict(fields))
        return dict(fields)

    s = ScopedSetting({GLOBAL: {"servers": ["a.example"]}}, {}, build)
    first = s.resolve("!a:x")
    assert s.resolve("!b:x") is first  # same effective fields: same object
    assert built == [{"servers": ["a.example"]}]


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("internal", "federation: expected a mapping"),
        ({"rooms": ["!a:x"]}, "federation.rooms: expected a mapping of room ID to settings"),
        (
            {"rooms": {"#alias:x": {"mode": "open"}}},
            "federation.rooms.#alias:x: expected a room ID",
        ),
        ({"spaces": {SPACE: "open"}}, f"federation.spaces.{SPACE}: expected a room ID"),
        ({"rooms": {ROOM: {"mdoe": "open"}}}, f"federation.rooms.{ROOM}: unknown option(s) mdoe"),
    ],
)
def test_malformed_sections_name_the_place(section: Any, message: str) -> None:
    with pytest.raises(ValueError) as e:
        federation_setting(section)
    assert str(e.value).startswith(message)


@pytest.mark.parametrize(
    ("make", "section", "scope", "detail"),
    [
        (federation_setting, {"mode": "sometimes"}, GLOBAL, "unknown federation mode 'sometimes'"),
        (
            federation_setting,
            {"rooms": {ROOM: {"mode": "sometimes"}}},
            ROOM,
            "unknown federation mode",
        ),
        (
            federation_setting,
            {"spaces": {SPACE: {"servers": "evil.example"}}},
            SPACE,
            "servers must be a list",
        ),
        (retention_setting, {"max_lifetime": "forever"}, GLOBAL, "forever"),
        (
            retention_setting,
            {"rooms": {ROOM: {"max_lifetime": [1]}}},
            ROOM,
            "expected a duration like 30d",
        ),
        (
            retention_setting,
            {"rooms": {ROOM: {"max_lifetime": True}}},
            ROOM,
            "expected a duration like 30d",
        ),
        (
            retention_setting,
            {"max_lifetime": "1d", "rooms": {ROOM: {"min_lifetime": "7d"}}},
            ROOM,
            "min_lifetime (1w) is longer than max_lifetime (1d)",
        ),
    ],
)
def test_bad_values_fail_validation_naming_the_scope(
    make: Any, section: dict[str, Any], scope: str, detail: str
) -> None:
    s = make(section)
    with pytest.raises(ValueError) as e:
        s.validate()
    assert str(e.value).startswith(f"{scope}: ")
    assert detail in str(e.value)


def test_bad_runtime_values_are_caught_by_validate_too() -> None:
    s = retention_setting({"max_lifetime": "30d"}, runtime={ROOM: {"max_lifetime": "-5d"}})
    with pytest.raises(ValueError, match=f"^{ROOM}: "):
        s.validate()


def test_good_settings_validate() -> None:
    federation_setting(
        {"mode": "denylist", "servers": ["*.evil.example"], "rooms": {ROOM: {"mode": "internal"}}}
    ).validate()
    retention_setting(
        {"max_lifetime": "30d", "spaces": {SPACE: {"max_lifetime": 3600000}}}
    ).validate()


def test_builders() -> None:
    assert build_federation({}) == FederationPolicy(FederationMode.OPEN)
    assert build_federation({"mode": "denylist", "servers": ("a.example",)}).servers == (
        "a.example",
    )
    assert build_retention({"max_lifetime": "", "min_lifetime": None}) == RetentionPolicy()
    assert build_retention({"max_lifetime": 5000}) == RetentionPolicy(5000)
    assert build_retention({"max_lifetime": "1h", "min_lifetime": "30m"}) == RetentionPolicy(
        3_600_000, 1_800_000
    )
