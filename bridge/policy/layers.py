"""DLP policy layers: the config file's rules and the runtime rules set by admin commands.

A layer is plain data (the ``dlp:`` section of the config, or the JSON document the
commands keep in the database). The effective DLP policy of a room merges, in order:
config global, runtime global, config room, runtime room. Later layers override earlier
ones rule by rule (same name replaces; a detector set to ``off`` disables it), so a room
can switch off what applies globally. Pure: no I/O.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .dlp import DETECTORS, DetectorRule, DlpEngine, DlpPolicy, KeywordList, RegexRule
from .model import Action

GLOBAL = "global"
RUNTIME_PREFIX = "admin-"


@dataclass(frozen=True, slots=True)
class DlpLayer:
    """One layer of rules for one scope. ``detectors[name] is None`` means disabled."""

    keyword_lists: Mapping[str, KeywordList] = field(default_factory=dict)
    regexes: Mapping[str, RegexRule] = field(default_factory=dict)
    detectors: Mapping[str, DetectorRule | None] = field(default_factory=dict)
    exempt_users: frozenset[str] = frozenset()
    exempt_rooms: frozenset[str] = frozenset()


def _actions(value: Any, where: str) -> frozenset[Action]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not items:
        raise ValueError(f"{where}: expected an action or a list of actions")
    try:
        return frozenset(Action(str(a)) for a in items)
    except ValueError:
        raise ValueError(
            f"{where}: unknown action in {value!r}; expected {', '.join(a.value for a in Action)}"
        ) from None


def parse_layer(data: Any, where: str) -> DlpLayer:
    """Validate one scope's rules (config or runtime form); errors name ``where``."""
    if data is None:
        return DlpLayer()
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected a mapping")
    lists: dict[str, KeywordList] = {}
    raw_lists = data.get("keywords") or []
    if not isinstance(raw_lists, list):
        raise ValueError(f"{where}.keywords: expected a list of keyword lists")
    for i, item in enumerate(raw_lists):
        w = f"{where}.keywords[{i}]"
        if not isinstance(item, Mapping) or not isinstance(item.get("name"), str):
            raise ValueError(f"{w}: expected {{name, keywords, action}}")
        words = item.get("keywords")
        if not isinstance(words, list) or not all(isinstance(k, str) for k in words):
            raise ValueError(f"{w}.keywords: expected a list of words or phrases")
        lists[item["name"]] = KeywordList(
            name=item["name"],
            keywords=tuple(words),
            actions=_actions(item.get("action", "block"), f"{w}.action"),
            whole_word=bool(item.get("whole_word", True)),
        )
    regexes: dict[str, RegexRule] = {}
    raw_regexes = data.get("regexes") or []
    if not isinstance(raw_regexes, list):
        raise ValueError(f"{where}.regexes: expected a list of {{name, pattern, action}}")
    for i, item in enumerate(raw_regexes):
        w = f"{where}.regexes[{i}]"
        if not isinstance(item, Mapping) or not isinstance(item.get("pattern"), str):
            raise ValueError(f"{w}: expected {{name, pattern, action}}")
        regexes[str(item.get("name"))] = RegexRule(
            name=str(item.get("name")),
            pattern=item["pattern"],
            actions=_actions(item.get("action", "block"), f"{w}.action"),
        )
    detectors: dict[str, DetectorRule | None] = {}
    raw_det = data.get("detectors") or {}
    if not isinstance(raw_det, Mapping):
        raise ValueError(f"{where}.detectors: expected a mapping of detector name to action")
    for name, action in raw_det.items():
        if name not in DETECTORS:
            raise ValueError(
                f"{where}.detectors.{name}: unknown detector; expected one of "
                + ", ".join(sorted(DETECTORS))
            )
        if action in ("off", False, None):
            detectors[name] = None
        else:
            detectors[name] = DetectorRule(name, _actions(action, f"{where}.detectors.{name}"))
    users = data.get("exempt_users") or []
    rooms = data.get("exempt_rooms") or []
    if not isinstance(users, list) or not isinstance(rooms, list):
        raise ValueError(f"{where}: exempt_users and exempt_rooms must be lists")
    return DlpLayer(lists, regexes, detectors, frozenset(users), frozenset(rooms))


def merge_layers(layers: list[DlpLayer]) -> DlpPolicy:
    """Merge layers (least specific first) into one policy."""
    lists: dict[str, KeywordList] = {}
    regexes: dict[str, RegexRule] = {}
    detectors: dict[str, DetectorRule | None] = {}
    users: set[str] = set()
    rooms: set[str] = set()
    for layer in layers:
        lists.update(layer.keyword_lists)
        regexes.update(layer.regexes)
        detectors.update(layer.detectors)
        users |= layer.exempt_users
        rooms |= layer.exempt_rooms
    return DlpPolicy(
        keyword_lists=tuple(v for v in lists.values() if v.keywords),
        regex_rules=tuple(regexes.values()),
        detectors=tuple(d for d in detectors.values() if d is not None),
        exempt_users=frozenset(users),
        exempt_rooms=frozenset(rooms),
    )


@dataclass(frozen=True, slots=True)
class DlpLayers:
    """Config and runtime layers per scope (``global`` or a room ID)."""

    config: Mapping[str, DlpLayer]
    runtime: Mapping[str, DlpLayer]

    def scopes(self) -> set[str]:
        return (set(self.config) | set(self.runtime)) - {GLOBAL}

    def effective(self, room_id: str | None) -> DlpPolicy:
        layers = [self.config.get(GLOBAL, DlpLayer()), self.runtime.get(GLOBAL, DlpLayer())]
        if room_id is not None and room_id != GLOBAL:
            layers += [self.config.get(room_id, DlpLayer()), self.runtime.get(room_id, DlpLayer())]
        return merge_layers(layers)

    def compile(self) -> tuple[DlpEngine, dict[str, DlpEngine]]:
        """Engines for the global scope and each room with its own rules (shared if equal)."""
        cache: dict[DlpPolicy, DlpEngine] = {}

        def engine_for(policy: DlpPolicy) -> DlpEngine:
            if policy not in cache:
                cache[policy] = DlpEngine.compile(policy)
            return cache[policy]

        global_engine = engine_for(self.effective(None))
        return global_engine, {room: engine_for(self.effective(room)) for room in self.scopes()}


def parse_config_dlp(section: Any) -> dict[str, DlpLayer]:
    """The ``dlp:`` config section: global rules at top level, room rules under ``rooms``."""
    if section is None:
        return {}
    if not isinstance(section, Mapping):
        raise ValueError("dlp: expected a mapping")
    out = {GLOBAL: parse_layer({k: v for k, v in section.items() if k != "rooms"}, "dlp")}
    rooms = section.get("rooms") or {}
    if not isinstance(rooms, Mapping):
        raise ValueError("dlp.rooms: expected a mapping of room ID to rules")
    for room, rules in rooms.items():
        if not str(room).startswith("!"):
            raise ValueError(f"dlp.rooms.{room}: expected a room ID (!…)")
        out[str(room)] = parse_layer(rules, f"dlp.rooms.{room}")
    return out


def parse_runtime_dlp(doc: Mapping[str, Any]) -> dict[str, DlpLayer]:
    """The runtime document (same shape per scope) kept by the commands."""
    return {scope: parse_layer(rules, f"runtime dlp[{scope}]") for scope, rules in doc.items()}


# -- editing the runtime document (pure: returns a new document) -------------------------


def _scope_doc(doc: Mapping[str, Any], scope: str) -> tuple[dict[str, Any], dict[str, Any]]:
    new = copy.deepcopy(dict(doc))
    return new, new.setdefault(scope, {})


def add_keyword(doc: Mapping[str, Any], scope: str, word: str, action: str) -> dict[str, Any]:
    """Add ``word`` to the runtime list for ``action`` in ``scope``."""
    new, rules = _scope_doc(doc, scope)
    lists = rules.setdefault("keywords", [])
    name = RUNTIME_PREFIX + action
    for item in lists:
        if item["name"] == name:
            if word not in item["keywords"]:
                item["keywords"].append(word)
            return new
    lists.append({"name": name, "keywords": [word], "action": action})
    return new


def remove_keyword(doc: Mapping[str, Any], scope: str, word: str) -> tuple[dict[str, Any], bool]:
    """Remove ``word`` from every runtime list in ``scope``; returns (doc, found)."""
    new, rules = _scope_doc(doc, scope)
    found = False
    for item in rules.get("keywords", []):
        if word in item["keywords"]:
            item["keywords"].remove(word)
            found = True
    return new, found


def add_regex(
    doc: Mapping[str, Any], scope: str, name: str, pattern: str, action: str
) -> dict[str, Any]:
    """Add or replace the named regex rule in ``scope``."""
    new, rules = _scope_doc(doc, scope)
    regexes = [r for r in rules.get("regexes", []) if r.get("name") != name]
    regexes.append({"name": name, "pattern": pattern, "action": action})
    rules["regexes"] = regexes
    return new


def set_detector(
    doc: Mapping[str, Any], scope: str, name: str, action: str | None
) -> dict[str, Any]:
    """Enable a detector with ``action`` in ``scope``, or disable it (``None``)."""
    new, rules = _scope_doc(doc, scope)
    rules.setdefault("detectors", {})[name] = action if action is not None else "off"
    return new
