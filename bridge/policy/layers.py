"""DLP policy layers: the config file's rules and the runtime rules set by admin commands.

A layer is plain data (the ``dlp:`` section of the config, or the JSON document the
commands keep in the database), keyed by scope: ``global`` or a room ID. A room ID's layer
applies to that room and, when the room is a space, to the rooms in it (its children, as
tracked from ``m.space.child``/``m.space.parent``). The effective DLP policy of a room
merges, in order: config global, runtime global, then for each parent space config space,
runtime space, then config room, runtime room. Later layers override earlier ones rule by
rule (same name replaces; a detector set to ``off`` disables it; ``forbid_encryption``
set in a layer replaces the inherited value), so a room can switch off what its space or
the global scope imposes. Exemptions (users, rooms) accumulate. Pure: no I/O.

Keywords added by ``!policy dlp add-keyword`` (lists named ``admin-<action>``, one per
action and scope) are the exception: they merge *word by word*. A narrower scope adds its
words to the broader scopes' words, and a word it lists again takes the action it has
there (``add-keyword kingfisher`` globally, then ``add-keyword kingfisher --action warn
--scope here``: only a warning in that room). Removing a word at a scope removes what that
scope added; the broader scopes' words still apply.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bridge.policy.dlp import (
    DETECTORS,
    AllowedPhrase,
    DetectorRule,
    DlpEngine,
    DlpPolicy,
    KeywordList,
    RegexRule,
)
from bridge.policy.durations import DurationError, parse_duration
from bridge.policy.model import Action
from bridge.policy.normalize import normalize
from bridge.policy.scopes import GLOBAL, ScopedSetting

RUNTIME_PREFIX = "admin-"
#: Keys of one scope's rules (config and runtime form).
LAYER_KEYS = frozenset(
    {
        "keywords",
        "regexes",
        "detectors",
        "exempt_users",
        "exempt_rooms",
        "forbid_encryption",
        "allowed_phrases",
    }
)
#: Keys of the ``dlp:`` config section that are not global rules.
SECTION_KEYS = frozenset({"spaces", "rooms", "retroactive_window"})
DEFAULT_RETROACTIVE_WINDOW = "30d"


@dataclass(frozen=True, slots=True)
class DlpLayer:
    """One layer of rules for one scope. ``detectors[name] is None`` means disabled."""

    keyword_lists: Mapping[str, KeywordList] = field(default_factory=dict)
    regexes: Mapping[str, RegexRule] = field(default_factory=dict)
    detectors: Mapping[str, DetectorRule | None] = field(default_factory=dict)
    exempt_users: frozenset[str] = frozenset()
    exempt_rooms: frozenset[str] = frozenset()
    # True: the gate refuses m.room.encryption in this scope; None: inherited.
    forbid_encryption: bool | None = None
    # Exceptions to rules (answers to false-positive reports); they accumulate like exemptions.
    allowed_phrases: tuple[AllowedPhrase, ...] = ()


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


def _flag(item: Mapping[str, Any], key: str, where: str, default: bool = True) -> bool:
    """A true/false rule option (``notify_sender``, ``overridable``)."""
    value = item.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"{where}.{key}: expected true or false, got {value!r}")
    return value


def parse_layer(data: Any, where: str) -> DlpLayer:
    """Validate one scope's rules (config or runtime form); errors name ``where``."""
    if data is None:
        return DlpLayer()
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected a mapping")
    unknown = set(data) - LAYER_KEYS
    if unknown:
        raise ValueError(
            f"{where}: unknown option(s) {', '.join(sorted(map(str, unknown)))}; expected "
            + ", ".join(sorted(LAYER_KEYS))
        )
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
            notify_sender=_flag(item, "notify_sender", w),
            overridable=_flag(item, "overridable", w, default=False),
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
            notify_sender=_flag(item, "notify_sender", w),
            overridable=_flag(item, "overridable", w, default=False),
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
        w = f"{where}.detectors.{name}"
        if action in ("off", False, None):
            detectors[name] = None
        elif isinstance(action, Mapping):  # {action: block, overridable: true, ...}
            unknown_opts = set(action) - {"action", "notify_sender", "overridable"}
            if unknown_opts:
                raise ValueError(f"{w}: unknown option(s) {', '.join(sorted(unknown_opts))}")
            detectors[name] = DetectorRule(
                name,
                _actions(action.get("action", "block"), f"{w}.action"),
                notify_sender=_flag(action, "notify_sender", w),
                overridable=_flag(action, "overridable", w, default=False),
            )
        else:
            detectors[name] = DetectorRule(name, _actions(action, w))
    users = data.get("exempt_users") or []
    rooms = data.get("exempt_rooms") or []
    if not isinstance(users, list) or not isinstance(rooms, list):
        raise ValueError(f"{where}: exempt_users and exempt_rooms must be lists")
    forbid = data.get("forbid_encryption")
    if forbid is not None and not isinstance(forbid, bool):
        raise ValueError(f"{where}.forbid_encryption: expected true or false, got {forbid!r}")
    return DlpLayer(
        lists,
        regexes,
        detectors,
        frozenset(users),
        frozenset(rooms),
        forbid,
        _allowed_phrases(data.get("allowed_phrases"), where),
    )


def _allowed_phrases(raw: Any, where: str) -> tuple[AllowedPhrase, ...]:
    """``allowed_phrases: [{rule: detector:card, phrase: "test card 4111 …"}, …]``."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ValueError(f"{where}.allowed_phrases: expected a list of {{rule, phrase}}")
    out: list[AllowedPhrase] = []
    for i, item in enumerate(raw):
        w = f"{where}.allowed_phrases[{i}]"
        if (
            not isinstance(item, Mapping)
            or set(item) - {"rule", "phrase", "report"}
            or not isinstance(item.get("phrase"), str)
        ):
            raise ValueError(f"{w}: expected {{rule, phrase}}")
        try:
            out.append(AllowedPhrase(str(item.get("rule")), str(item["phrase"])))
        except ValueError as e:
            raise ValueError(f"{w}: {e}") from None
    return tuple(out)


def merge_layers(layers: list[DlpLayer]) -> DlpPolicy:
    """Merge layers (least specific first) into one policy.

    Rules replace same-named rules of earlier layers, except the command-added keyword
    lists (``admin-<action>``), which merge word by word (see the module docstring).
    """
    lists: dict[str, KeywordList] = {}
    regexes: dict[str, RegexRule] = {}
    detectors: dict[str, DetectorRule | None] = {}
    users: set[str] = set()
    rooms: set[str] = set()
    allowed: dict[AllowedPhrase, None] = {}
    # Command-added words: normalized word -> {list name: word as typed}, narrowest scope's.
    words: dict[str, dict[str, str]] = {}
    for layer in layers:
        scope_words: dict[str, dict[str, str]] = {}
        for name, klist in layer.keyword_lists.items():
            if not name.startswith(RUNTIME_PREFIX):
                lists[name] = klist
                continue
            lists[name] = klist  # settings (action) of the narrowest list of that name
            for word in klist.keywords:
                scope_words.setdefault(normalize(word) or word, {})[name] = word
        words.update(scope_words)
        regexes.update(layer.regexes)
        detectors.update(layer.detectors)
        users |= layer.exempt_users
        rooms |= layer.exempt_rooms
        allowed.update(dict.fromkeys(layer.allowed_phrases))
    for name, klist in lists.items():
        if name.startswith(RUNTIME_PREFIX):
            merged = tuple(lists_[name] for lists_ in words.values() if name in lists_)
            lists[name] = dataclasses.replace(klist, keywords=merged)
    return DlpPolicy(
        keyword_lists=tuple(v for v in lists.values() if v.keywords),
        regex_rules=tuple(regexes.values()),
        detectors=tuple(d for d in detectors.values() if d is not None),
        exempt_users=frozenset(users),
        exempt_rooms=frozenset(rooms),
        allowed_phrases=tuple(allowed),
    )


class EngineCache:
    """Compiled engines by policy, kept across rebuilds.

    The engine set is rebuilt whenever the runtime rules, the management room or the
    room→space map change; a policy that did not change must not be compiled again (100k
    keywords take seconds). Entries not used by the last ``keep`` builds are dropped.
    """

    def __init__(self, keep: int = 2) -> None:
        self.keep = keep
        self.generation = 0
        self.compiled = 0  # engines compiled so far (tests and metrics)
        self._entries: dict[DlpPolicy, tuple[DlpEngine, int]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def begin(self) -> None:
        """Start a build: later, :meth:`prune` drops what the last builds did not use."""
        self.generation += 1

    def get(self, policy: DlpPolicy) -> DlpEngine:
        hit = self._entries.get(policy)
        engine = hit[0] if hit is not None else DlpEngine.compile(policy)
        if hit is None:
            self.compiled += 1
        self._entries[policy] = (engine, self.generation)
        return engine

    def prune(self) -> None:
        oldest = self.generation - self.keep + 1
        for policy in [p for p, (_, gen) in self._entries.items() if gen < oldest]:
            del self._entries[policy]


@dataclass(frozen=True, slots=True)
class DlpLayers:
    """Config and runtime layers per scope (``global`` or a room/space ID)."""

    config: Mapping[str, DlpLayer]
    runtime: Mapping[str, DlpLayer]

    def scopes(self) -> set[str]:
        return (set(self.config) | set(self.runtime)) - {GLOBAL}

    def _chain(self, room_id: str | None, space_ids: Iterable[str] = ()) -> tuple[str, ...]:
        """The scopes with layers that apply in ``room_id``, least specific first.

        ``space_ids`` are the room's parent spaces, most significant first (as in
        :class:`~bridge.policy.scopes.ScopedSetting`): the first one wins a conflict.
        """
        scopes = self.scopes()
        chain = [s for s in reversed(tuple(space_ids)) if s in scopes and s != room_id]
        if room_id is not None and room_id != GLOBAL and room_id in scopes:
            chain.append(room_id)
        return tuple(dict.fromkeys(chain))

    def _layers(self, chain: tuple[str, ...]) -> list[DlpLayer]:
        empty = DlpLayer()
        layers = [self.config.get(GLOBAL, empty), self.runtime.get(GLOBAL, empty)]
        for scope in chain:
            layers += [self.config.get(scope, empty), self.runtime.get(scope, empty)]
        return layers

    def effective(self, room_id: str | None, space_ids: Iterable[str] = ()) -> DlpPolicy:
        """The merged policy in ``room_id`` (global for None) with parent spaces ``space_ids``."""
        return merge_layers(self._layers(self._chain(room_id, space_ids)))

    def encryption_setting(self) -> ScopedSetting[bool]:
        """``forbid_encryption`` of every layer as a scoped setting (resolved like federation)."""

        def fields(layers: Mapping[str, DlpLayer]) -> dict[str, dict[str, Any]]:
            return {
                scope: {"forbid": layer.forbid_encryption}
                for scope, layer in layers.items()
                if layer.forbid_encryption is not None
            }

        return ScopedSetting(
            fields(self.config), fields(self.runtime), lambda f: bool(f.get("forbid", False))
        )

    def compile(
        self,
        room_spaces: Mapping[str, Iterable[str]] | None = None,
        cache: EngineCache | None = None,
    ) -> tuple[DlpEngine, dict[str, DlpEngine]]:
        """Engines for the global scope and each room whose rules differ from it.

        A room differs when it, or one of its parent spaces (``room_spaces``: room → parent
        spaces), has a layer. Rooms with the same chain of scopes share one policy, and equal
        policies share one engine; with ``cache``, engines survive from earlier builds.
        """
        cache = cache if cache is not None else EngineCache(keep=1)
        cache.begin()
        global_engine = cache.get(self.effective(None))
        by_chain: dict[tuple[str, ...], DlpEngine] = {}
        rooms: dict[str, DlpEngine] = {}
        candidates: dict[str, tuple[str, ...]] = {room: () for room in self.scopes()}
        scopes = self.scopes()
        for room, parents in (room_spaces or {}).items():
            parents = tuple(parents)
            if room in scopes or any(p in scopes for p in parents):
                candidates[room] = parents
        for room, parents in candidates.items():
            chain = self._chain(room, parents)
            if not chain:
                continue
            engine = by_chain.get(chain)
            if engine is None:
                engine = by_chain[chain] = cache.get(merge_layers(self._layers(chain)))
            rooms[room] = engine
        cache.prune()
        return global_engine, rooms


def parse_config_dlp(section: Any) -> dict[str, DlpLayer]:
    """The ``dlp:`` config section.

    Global rules at top level, space rules under ``spaces`` and room rules under ``rooms``
    (both keyed by room ID: a space's rules also apply in the rooms it contains), and
    ``retroactive_window``.
    """
    if section is None:
        return {}
    if not isinstance(section, Mapping):
        raise ValueError("dlp: expected a mapping")
    retroactive_window_ms(section)  # validated here, read where it is used
    out = {GLOBAL: parse_layer({k: v for k, v in section.items() if k not in SECTION_KEYS}, "dlp")}
    for kind in ("spaces", "rooms"):
        scoped = section.get(kind) or {}
        if not isinstance(scoped, Mapping):
            raise ValueError(f"dlp.{kind}: expected a mapping of room ID to rules")
        for room, rules in scoped.items():
            if not str(room).startswith("!"):
                raise ValueError(f"dlp.{kind}.{room}: expected a room ID (!…)")
            if str(room) in out:
                raise ValueError(
                    f"dlp.{kind}.{room}: listed under both dlp.spaces and dlp.rooms; a space's"
                    " rules apply to the space room itself too, so list it once"
                )
            out[str(room)] = parse_layer(rules, f"dlp.{kind}.{room}")
    return out


def retroactive_window_ms(section: Any) -> int:
    """``dlp.retroactive_window`` (default 30d) in milliseconds: how far back
    ``--retroactive`` scans the archive."""
    value = section.get("retroactive_window") if isinstance(section, Mapping) else None
    if value in (None, ""):
        value = DEFAULT_RETROACTIVE_WINDOW
    if not isinstance(value, str):
        raise ValueError(f"dlp.retroactive_window: expected a duration like 30d, got {value!r}")
    try:
        return parse_duration(value)
    except DurationError as e:
        raise ValueError(f"dlp.retroactive_window: {e}") from None


def parse_runtime_dlp(doc: Mapping[str, Any]) -> dict[str, DlpLayer]:
    """The runtime document (same shape per scope) kept by the commands."""
    return {scope: parse_layer(rules, f"runtime dlp[{scope}]") for scope, rules in doc.items()}


# -- editing the runtime document (pure: returns a new document) -------------------------


def _scope_doc(doc: Mapping[str, Any], scope: str) -> tuple[dict[str, Any], dict[str, Any]]:
    new = copy.deepcopy(dict(doc))
    return new, new.setdefault(scope, {})


def _action_value(action: str) -> str | list[str]:
    """``block`` stays a string; ``block+notify`` (several actions) becomes a list."""
    return action.split("+") if "+" in action else action


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
    lists.append({"name": name, "keywords": [word], "action": _action_value(action)})
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
    doc: Mapping[str, Any],
    scope: str,
    name: str,
    pattern: str,
    action: str,
    options: Mapping[str, bool] | None = None,
) -> dict[str, Any]:
    """Add or replace the named regex rule in ``scope`` (``options``: ``notify_sender``,
    ``overridable``)."""
    new, rules = _scope_doc(doc, scope)
    regexes = [r for r in rules.get("regexes", []) if r.get("name") != name]
    regexes.append(
        {"name": name, "pattern": pattern, "action": _action_value(action), **(options or {})}
    )
    rules["regexes"] = regexes
    return new


def set_detector(
    doc: Mapping[str, Any],
    scope: str,
    name: str,
    action: str | None,
    options: Mapping[str, bool] | None = None,
) -> dict[str, Any]:
    """Enable a detector with ``action`` in ``scope``, or disable it (``None``); with
    ``options`` (``notify_sender``, ``overridable``) it is written as a mapping."""
    new, rules = _scope_doc(doc, scope)
    value: Any = _action_value(action) if action is not None else "off"
    if action is not None and options:
        value = {"action": value, **options}
    rules.setdefault("detectors", {})[name] = value
    return new


def add_allowed_phrase(
    doc: Mapping[str, Any], scope: str, rule: str, phrase: str, report: str | None = None
) -> tuple[dict[str, Any], bool]:
    """Allow ``phrase`` for ``rule`` in ``scope`` (``report``: the reference it answers);
    returns (doc, added) -- False when that scope already allows it."""
    new, rules = _scope_doc(doc, scope)
    items = rules.setdefault("allowed_phrases", [])
    if any(i.get("rule") == rule and i.get("phrase") == phrase for i in items):
        return new, False
    items.append({"rule": rule, "phrase": phrase, **({"report": report} if report else {})})
    return new, True


def remove_allowed_phrase(
    doc: Mapping[str, Any], scope: str, rule: str, phrase: str
) -> tuple[dict[str, Any], bool]:
    """Remove the exception ``phrase`` of ``rule`` from ``scope``; returns (doc, found)."""
    new, rules = _scope_doc(doc, scope)
    items = rules.get("allowed_phrases", [])
    kept = [i for i in items if not (i.get("rule") == rule and i.get("phrase") == phrase)]
    rules["allowed_phrases"] = kept
    return new, len(kept) != len(items)


def allowed_phrase_entries(doc: Mapping[str, Any]) -> list[tuple[str, str, str, str | None]]:
    """Every command-added exception as (scope, rule, phrase, report reference)."""
    out: list[tuple[str, str, str, str | None]] = []
    for scope, rules in doc.items():
        for item in (rules or {}).get("allowed_phrases", []) if isinstance(rules, Mapping) else []:
            out.append((scope, str(item.get("rule")), str(item.get("phrase")), item.get("report")))
    return out


def set_encryption(doc: Mapping[str, Any], scope: str, forbid: bool | None) -> dict[str, Any]:
    """Forbid (True) or allow (False) encryption in ``scope``; None: inherit again."""
    new, rules = _scope_doc(doc, scope)
    if forbid is None:
        rules.pop("forbid_encryption", None)
    else:
        rules["forbid_encryption"] = forbid
    return new
