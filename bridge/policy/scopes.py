"""Scoped settings for federation and retention: global, overridden by space, by room.

Each scope holds only the fields it sets. The effective settings of a room are the global
fields, overridden field by field by its parent spaces' fields, then by the room's own;
within a scope, the runtime layer (admin commands) overrides the config file. Pure.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from bridge.policy.durations import DurationError, parse_duration
from bridge.policy.federation import FederationMode, FederationPolicy
from bridge.policy.retention import RetentionPolicy

GLOBAL = "global"
FEDERATION_FIELDS = ("mode", "servers", "allow_ip_literals")
RETENTION_FIELDS = ("max_lifetime", "min_lifetime")

T = TypeVar("T")


def split_section(section: Any, fields: tuple[str, ...], name: str) -> dict[str, dict[str, Any]]:
    """A config section (global fields + ``spaces:`` + ``rooms:``) as scope -> fields.

    Raises ValueError naming the section and scope when its shape is wrong.
    """
    if section is None:
        return {}
    if not isinstance(section, Mapping):
        raise ValueError(f"{name}: expected a mapping")
    out: dict[str, dict[str, Any]] = {GLOBAL: {k: section[k] for k in fields if k in section}}
    for kind in ("spaces", "rooms"):
        scoped = section.get(kind) or {}
        if not isinstance(scoped, Mapping):
            raise ValueError(f"{name}.{kind}: expected a mapping of room ID to settings")
        for room, values in scoped.items():
            if not str(room).startswith("!") or not isinstance(values, Mapping):
                raise ValueError(f"{name}.{kind}.{room}: expected a room ID (!…) with settings")
            unknown = set(values) - set(fields)
            if unknown:
                raise ValueError(
                    f"{name}.{kind}.{room}: unknown option(s) {', '.join(sorted(unknown))}"
                )
            out[str(room)] = dict(values)
    return out


@dataclass(frozen=True)
class ScopedSetting(Generic[T]):
    """Config and runtime field layers per scope, and a builder for the effective value."""

    config: Mapping[str, Mapping[str, Any]]
    runtime: Mapping[str, Mapping[str, Any]]
    build: Callable[[Mapping[str, Any]], T]
    _cache: dict[tuple[tuple[str, Any], ...], T] = field(default_factory=dict, compare=False)

    def fields_for(self, room_id: str | None, space_ids: tuple[str, ...] = ()) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        scopes = [GLOBAL, *reversed(space_ids)]
        if room_id:
            scopes.append(room_id)
        for scope in scopes:
            merged.update(self.config.get(scope, {}))
            merged.update(self.runtime.get(scope, {}))
        return merged

    def resolve(self, room_id: str | None, space_ids: tuple[str, ...] = ()) -> T:
        """The effective value in ``room_id`` (whose parent spaces are ``space_ids``)."""
        merged = self.fields_for(room_id, space_ids)
        key = tuple(sorted((k, _freeze(v)) for k, v in merged.items()))
        if key not in self._cache:
            self._cache[key] = self.build(merged)
        return self._cache[key]

    def scopes(self) -> set[str]:
        return (set(self.config) | set(self.runtime)) - {GLOBAL}

    def validate(self) -> None:
        """Build every scope once so a bad value fails now (ValueError naming the scope)."""
        for scope in {GLOBAL, *self.scopes()}:
            try:
                self.resolve(None if scope == GLOBAL else scope)
            except ValueError as e:
                raise ValueError(f"{scope}: {e}") from None


def _freeze(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def build_federation(fields: Mapping[str, Any]) -> FederationPolicy:
    """Fields -> FederationPolicy (default: open)."""
    servers = fields.get("servers", ())
    return FederationPolicy(
        mode=fields.get("mode", FederationMode.OPEN),
        servers=tuple(servers) if isinstance(servers, list | tuple) else servers,
        allow_ip_literals=fields.get("allow_ip_literals", False),
    )


def _lifetime(value: Any) -> int | None:
    if value in (None, "", "off", False):
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f"expected a duration like 30d, got {value!r}")
    if isinstance(value, int):
        return value
    try:
        return parse_duration(value)
    except DurationError as e:
        raise ValueError(str(e)) from None


def build_retention(fields: Mapping[str, Any]) -> RetentionPolicy:
    """Fields -> RetentionPolicy (durations as text, ``off`` for none)."""
    return RetentionPolicy(
        max_lifetime_ms=_lifetime(fields.get("max_lifetime")),
        min_lifetime_ms=_lifetime(fields.get("min_lifetime")),
    )


def federation_layers(
    config: Mapping[str, Mapping[str, Any]],
    runtime: Mapping[str, Mapping[str, Any]] | None = None,
) -> ScopedSetting[FederationPolicy]:
    """The scoped federation setting from config fields per scope and the runtime layer."""
    return ScopedSetting(dict(config), dict(runtime or {}), build_federation)


def retention_layers(
    config: Mapping[str, Mapping[str, Any]],
    runtime: Mapping[str, Mapping[str, Any]] | None = None,
) -> ScopedSetting[RetentionPolicy]:
    """The scoped retention setting from config fields per scope and the runtime layer."""
    return ScopedSetting(dict(config), dict(runtime or {}), build_retention)


def federation_setting(
    config_section: Any, runtime: Mapping[str, Mapping[str, Any]] | None = None
) -> ScopedSetting[FederationPolicy]:
    """The scoped federation setting from a ``federation:`` section and runtime layer."""
    return federation_layers(
        split_section(config_section, FEDERATION_FIELDS, "federation"), runtime
    )


def retention_setting(
    config_section: Any, runtime: Mapping[str, Mapping[str, Any]] | None = None
) -> ScopedSetting[RetentionPolicy]:
    """The scoped retention setting from a ``retention:`` section and runtime layer."""
    return retention_layers(split_section(config_section, RETENTION_FIELDS, "retention"), runtime)


def rooms_in_scope(
    scope: str,
    managed: Iterable[str],
    room_spaces: Mapping[str, Iterable[str]],
    management_room: str,
) -> list[str]:
    """The managed rooms a scope covers: all for global; else the room and its children."""
    managed = [r for r in managed if r != management_room]
    if scope == GLOBAL:
        return sorted(managed)
    children = {room for room, parents in room_spaces.items() if scope in tuple(parents)}
    return [scope, *sorted(children & set(managed) - {scope})]
