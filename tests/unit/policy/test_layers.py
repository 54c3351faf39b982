"""DLP layers: scopes (global → space → room), config vs runtime, engine cache, encryption."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bridge.config import ConfigError
from bridge.pipeline.live_policy import LivePolicy
from bridge.policy import layers
from bridge.policy.engine import ENCRYPTION_RULE
from bridge.policy.layers import DlpLayers, EngineCache, parse_config_dlp, parse_runtime_dlp
from bridge.policy.model import Action
from tests.kit.config import make_config

SPACE = "!space:corp.example"
OTHER_SPACE = "!other:corp.example"
ROOM = "!room:corp.example"
CHILD = "!child:corp.example"
LONER = "!loner:corp.example"
CARD = "4111 1111 1111 1111"


def event(body: str, room: str, sender: str = "@joe:corp.example") -> dict[str, Any]:
    return {
        "type": "m.room.message",
        "room_id": room,
        "sender": sender,
        "event_id": "$e",
        "content": {"msgtype": "m.text", "body": body},
    }


def encryption(room: str) -> dict[str, Any]:
    return {
        "type": "m.room.encryption",
        "state_key": "",
        "room_id": room,
        "sender": "@joe:corp.example",
        "content": {"algorithm": "m.megolm.v1.aes-sha2"},
    }


def config(tmp_path: Path, dlp: dict[str, Any]) -> Any:
    return make_config(
        {
            "homeserver": {"domain": "corp.example"},
            "dlp": dlp,
        },
        base_dir=tmp_path,
    )


def rules(policy: Any) -> set[str]:
    names = {f"keyword:{k.name}" for k in policy.keyword_lists}
    names |= {f"regex:{r.name}" for r in policy.regex_rules}
    return names | {f"detector:{d.name}" for d in policy.detectors}


SECTION = {
    "keywords": [{"name": "codenames", "keywords": ["nightingale"], "action": "block"}],
    "detectors": {"card": "block"},
    "spaces": {
        SPACE: {
            "keywords": [{"name": "finance", "keywords": ["payroll"], "action": "notify"}],
            "detectors": {"iban": ["block", "notify"]},
            "exempt_users": ["@cfo:corp.example"],
        }
    },
    "rooms": {ROOM: {"detectors": {"card": "off", "iban": "off"}}},
}


def test_space_rules_apply_to_children_and_rooms_override_them() -> None:
    dlp = DlpLayers(parse_config_dlp(SECTION), {})
    assert rules(dlp.effective(None)) == {"keyword:codenames", "detector:card"}
    assert rules(dlp.effective(LONER)) == {"keyword:codenames", "detector:card"}
    in_space = dlp.effective(CHILD, (SPACE,))
    assert rules(in_space) == {
        "keyword:codenames",
        "keyword:finance",
        "detector:card",
        "detector:iban",
    }
    assert in_space.exempt_users == {"@cfo:corp.example"}
    # The room's own layer switches off what the space and the global scope impose.
    assert rules(dlp.effective(ROOM, (SPACE,))) == {"keyword:codenames", "keyword:finance"}
    # The space room itself follows its own rules.
    assert "keyword:finance" in rules(dlp.effective(SPACE))


def test_runtime_overrides_config_within_a_scope_rule_by_rule() -> None:
    runtime = parse_runtime_dlp(
        {
            SPACE: {"detectors": {"iban": "audit"}},
            layers.GLOBAL: {"keywords": [{"name": "codenames", "keywords": ["x"]}]},
        }
    )
    dlp = DlpLayers(parse_config_dlp(SECTION), runtime)
    policy = dlp.effective(CHILD, (SPACE,))
    [iban] = [d for d in policy.detectors if d.name == "iban"]
    assert iban.actions == {Action.AUDIT}
    [codenames] = [k for k in policy.keyword_lists if k.name == "codenames"]
    assert codenames.keywords == ("x",)  # same name: the runtime list replaces the file's


def test_first_parent_space_wins_a_conflict() -> None:
    dlp = DlpLayers(
        parse_config_dlp(
            {
                "spaces": {
                    SPACE: {"detectors": {"card": "notify"}},
                    OTHER_SPACE: {"detectors": {"card": "audit"}},
                }
            }
        ),
        {},
    )
    [card] = dlp.effective(CHILD, (SPACE, OTHER_SPACE)).detectors
    assert card.actions == {Action.NOTIFY}


def test_compile_builds_engines_only_for_rooms_that_differ_and_shares_them() -> None:
    dlp = DlpLayers(parse_config_dlp(SECTION), {})
    spaces = {CHILD: (SPACE,), "!child2:corp.example": (SPACE,), LONER: (OTHER_SPACE,)}
    global_engine, rooms = dlp.compile(spaces)
    assert set(rooms) == {SPACE, ROOM, CHILD, "!child2:corp.example"}
    assert rooms[CHILD] is rooms["!child2:corp.example"]
    assert rooms[CHILD].check(event("payroll run", CHILD)).findings
    assert not global_engine.check(event("payroll run", LONER)).findings


def test_the_cache_keeps_engines_across_rebuilds() -> None:
    dlp = DlpLayers(parse_config_dlp(SECTION), {})
    cache = EngineCache()
    dlp.compile({}, cache)
    compiled = cache.compiled
    _, rooms = dlp.compile({CHILD: (SPACE,)}, cache)  # the space map changed
    assert cache.compiled == compiled  # the child shares the space's policy: nothing new
    assert CHILD in rooms
    dlp.compile({CHILD: (SPACE,), LONER: (SPACE,)}, cache)
    assert cache.compiled == compiled
    # Unused entries are dropped after a few builds.
    small = DlpLayers(parse_config_dlp({"detectors": {"card": "block"}}), {})
    for _ in range(3):
        small.compile({}, cache)
    assert len(cache) == 1


def test_live_policy_does_not_recompile_on_space_changes(tmp_path: Path) -> None:
    live = LivePolicy(config(tmp_path, SECTION))
    compiled = live.dlp_cache.compiled
    live.set_room_spaces({CHILD: (SPACE,)})
    assert live.dlp_cache.compiled == compiled
    engine = live.engine
    assert engine.check_event(event("payroll is late", CHILD)).wants(Action.NOTIFY)
    assert not engine.check_event(event("payroll is late", LONER)).findings
    assert engine.check_event(event(f"card {CARD}", LONER)).blocked
    live.set_room_spaces({})
    assert not live.engine.check_event(event("payroll is late", CHILD)).findings


def test_runtime_rule_keyed_by_a_space_applies_to_its_rooms(tmp_path: Path) -> None:
    live = LivePolicy(config(tmp_path, {}))
    live.set_room_spaces({CHILD: (SPACE,)})
    doc = layers.add_keyword(live.runtime_dlp, SPACE, "bluefin", "block")
    live.apply(doc, live.preview(doc))
    assert live.engine.check_event(event("bluefin", CHILD)).blocked
    assert live.engine.check_event(event("bluefin", SPACE)).blocked
    assert not live.engine.check_event(event("bluefin", LONER)).findings


def test_command_keywords_at_narrower_scopes_add_to_the_global_ones(tmp_path: Path) -> None:
    # The layering the commands use: add-keyword, then add-keyword --scope here.
    live = LivePolicy(config(tmp_path, {}))
    live.set_room_spaces({CHILD: (SPACE,)})
    doc = layers.add_keyword(live.runtime_dlp, layers.GLOBAL, "kingfisher", "block")
    doc = layers.add_keyword(doc, ROOM, "marlin", "block")
    doc = layers.add_keyword(doc, SPACE, "bluefin", "block")
    live.apply(doc, live.preview(doc))
    engine = live.engine
    for room in (ROOM, CHILD, SPACE, LONER):
        assert engine.check_event(event("the kingfisher flies", room)).blocked, room
    assert engine.check_event(event("marlin", ROOM)).blocked
    assert not engine.check_event(event("marlin", LONER)).findings
    assert engine.check_event(event("bluefin", CHILD)).blocked
    assert engine.check_event(event("bluefin", SPACE)).blocked
    assert not engine.check_event(event("bluefin", ROOM)).findings
    [room_list] = engine.dlp_for(ROOM).policy.keyword_lists
    assert room_list.name == "admin-block"
    assert set(room_list.keywords) == {"kingfisher", "marlin"}
    [child_list] = engine.dlp_for(CHILD).policy.keyword_lists
    assert set(child_list.keywords) == {"kingfisher", "bluefin"}


def test_a_narrower_scope_may_change_the_action_of_a_command_keyword(tmp_path: Path) -> None:
    live = LivePolicy(config(tmp_path, {}))
    live.set_room_spaces({CHILD: (SPACE,)})
    doc = layers.add_keyword(live.runtime_dlp, layers.GLOBAL, "kingfisher", "block")
    doc = layers.add_keyword(doc, layers.GLOBAL, "heron", "block")
    doc = layers.add_keyword(doc, SPACE, "Kingfisher", "warn")  # same word, other case
    live.apply(doc, live.preview(doc))
    child = live.engine.check_event(event("kingfisher and heron", CHILD))
    assert {f.rule: f.actions for f in child.findings} == {
        "keyword:admin-block": {Action.BLOCK},  # heron
        "keyword:admin-warn": {Action.WARN},
    }
    assert not live.engine.check_event(event("kingfisher", CHILD)).blocked
    assert live.engine.check_event(event("kingfisher", LONER)).blocked
    # Removing it at the space brings the global action back there.
    doc, found = layers.remove_keyword(doc, SPACE, "Kingfisher")
    assert found
    live.apply(doc, live.preview(doc))
    assert live.engine.check_event(event("kingfisher", CHILD)).blocked
    # An explicit removal at the scope that added a word still removes it.
    doc, found = layers.remove_keyword(doc, layers.GLOBAL, "kingfisher")
    assert found
    live.apply(doc, live.preview(doc))
    assert not live.engine.check_event(event("kingfisher", CHILD)).findings
    assert not live.engine.check_event(event("kingfisher", LONER)).findings
    assert live.engine.check_event(event("heron", CHILD)).blocked


def test_same_word_with_two_actions_in_one_scope_keeps_both() -> None:
    doc = layers.add_keyword({}, layers.GLOBAL, "osprey", "block")
    doc = layers.add_keyword(doc, layers.GLOBAL, "osprey", "notify")
    doc = layers.add_keyword(doc, ROOM, "kite", "block")
    policy = DlpLayers({}, parse_runtime_dlp(doc)).effective(ROOM)
    assert {k.name: set(k.keywords) for k in policy.keyword_lists} == {
        "admin-block": {"osprey", "kite"},
        "admin-notify": {"osprey"},
    }


def test_encryption_can_be_forbidden_per_scope(tmp_path: Path) -> None:
    live = LivePolicy(
        config(
            tmp_path,
            {
                "spaces": {SPACE: {"forbid_encryption": True}},
                "rooms": {ROOM: {"forbid_encryption": False}},
            },
        )
    )
    live.set_room_spaces({CHILD: (SPACE,), ROOM: (SPACE,)})
    engine = live.engine
    verdict = engine.check_event(encryption(CHILD))
    assert verdict.blocked and verdict.findings[0].rule == ENCRYPTION_RULE
    assert "not allowed in this room by company policy" in verdict.findings[0].message
    assert "must be inspectable" in verdict.findings[0].message
    assert not engine.check_event(encryption(ROOM)).findings  # the room allows it
    assert not engine.check_event(encryption(LONER)).findings
    # Encrypted messages carry nothing readable: they pass content checks.
    encrypted = {**event("", CHILD), "type": "m.room.encrypted", "content": {"ciphertext": "x"}}
    assert not engine.check_event(encrypted).findings
    # A runtime global rule; the room's config layer still allows it.
    doc = layers.set_encryption(live.runtime_dlp, layers.GLOBAL, True)
    live.apply(doc)
    assert live.engine.check_event(encryption(LONER)).blocked
    assert not live.engine.check_event(encryption(ROOM)).findings
    doc = layers.set_encryption(doc, layers.GLOBAL, None)
    assert "forbid_encryption" not in doc[layers.GLOBAL]


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"keywordz": []}, "unknown option(s) keywordz"),
        ({"spaces": {"space": {}}}, "dlp.spaces.space: expected a room ID"),
        ({"spaces": {ROOM: {}}, "rooms": {ROOM: {}}}, "listed under both"),
        ({"rooms": {ROOM: {"forbid_encryption": "yes"}}}, "forbid_encryption: expected true"),
        ({"retroactive_window": "1 month"}, "dlp.retroactive_window"),
        ({"retroactive_window": 30}, "dlp.retroactive_window"),
    ],
)
def test_bad_sections_are_refused_with_the_key(section: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=None) as e:
        parse_config_dlp(section)
    assert message in str(e.value)


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        config(tmp_path, {"spaces": {SPACE: {"detectors": {"cards": "block"}}}})
    assert f"dlp.spaces.{SPACE}.detectors.cards" in str(e.value)


def test_retroactive_window_default_and_value() -> None:
    assert layers.retroactive_window_ms({}) == 30 * 86_400_000
    assert layers.retroactive_window_ms({"retroactive_window": "7d"}) == 7 * 86_400_000
