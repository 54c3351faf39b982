"""Rooms judged before they exist (createRoom bodies) and state sent through the state API:
encryption, DLP, federation, which scope applies to a new room, server ACL consistency."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bridge.pipeline.live_policy import build_engine
from bridge.policy.creation import read_new_room
from bridge.policy.engine import PolicyEngine
from bridge.policy.spaces import SpacePower
from tests.kit.config import make_config

OWN = "corp.example"
ALICE = f"@alice:{OWN}"
MALLORY = f"@mallory:{OWN}"
BOT = f"@policybot:{OWN}"
STRICT = f"!strict:{OWN}"  # a space forbidding encryption, with its own keyword
PARTNER_SPACE = f"!partners:{OWN}"
OLD_ROOM = f"!old:{OWN}"
ENCRYPTION = {"type": "m.room.encryption", "state_key": "", "content": {"algorithm": "x"}}


def engine(
    tmp_path: Path, settings: dict[str, Any], *, power: dict[str, SpacePower] | None = None
) -> PolicyEngine:
    config = make_config({"homeserver": {"domain": OWN}, **settings}, base_dir=tmp_path)
    return build_engine(
        config,
        room_spaces={OLD_ROOM: (STRICT,)},
        space_power=power
        if power is not None
        else {STRICT: SpacePower(creators=frozenset({ALICE}))},
    )


def parent(space: str, via: list[str] | None = None) -> dict[str, Any]:
    return {
        "type": "m.space.parent",
        "state_key": space,
        "content": {"via": [OWN] if via is None else via},
    }


def dm(*extra: dict[str, Any], invite: str = f"@bob:{OWN}") -> dict[str, Any]:
    """What Element sends for a new DM."""
    return {
        "preset": "trusted_private_chat",
        "is_direct": True,
        "invite": [invite],
        "initial_state": [ENCRYPTION, *extra],
    }


def rules(verdict: Any) -> list[str]:
    return [f.rule for f in verdict.findings]


SPACE_RULES = {
    "dlp": {
        "spaces": {
            STRICT: {
                "forbid_encryption": True,
                "keywords": [{"name": "strict-words", "keywords": ["heron"]}],
            }
        },
        "keywords": [{"name": "codenames", "keywords": ["kingfisher"]}],
    }
}


def test_encrypted_dm_refused_where_forbidden_globally(tmp_path: Path) -> None:
    eng = engine(tmp_path, {"dlp": {"forbid_encryption": True}})
    verdict = eng.check_create_room(ALICE, dm())
    assert verdict.blocked
    finding = verdict.first_block
    assert finding is not None and finding.rule == "encryption:forbidden"
    assert "Create the room without encryption" in finding.message
    # The same DM without encryption is fine; and the bot's own rooms are never judged.
    assert not eng.check_create_room(ALICE, {"is_direct": True, "invite": [f"@b:{OWN}"]}).blocked
    assert not eng.check_create_room(BOT, dm()).blocked


def test_encrypted_dm_allowed_where_only_a_space_forbids(tmp_path: Path) -> None:
    eng = engine(tmp_path, SPACE_RULES)
    assert not eng.check_create_room(ALICE, dm()).blocked


def test_a_counted_space_parent_brings_the_space_rules(tmp_path: Path) -> None:
    eng = engine(tmp_path, SPACE_RULES)
    body = {"name": "x", "initial_state": [ENCRYPTION, parent(STRICT)]}
    assert rules(eng.check_create_room(ALICE, body)) == ["encryption:forbidden"]
    # The space's keyword applies there, not elsewhere.
    topic = {"topic": "about heron", "initial_state": [parent(STRICT)]}
    assert rules(eng.check_create_room(ALICE, topic)) == ["keyword:strict-words"]
    assert rules(eng.check_create_room(ALICE, {"topic": "about heron"})) == []


def test_a_parent_claim_that_would_not_count_is_ignored(tmp_path: Path) -> None:
    eng = engine(tmp_path, SPACE_RULES)
    # Mallory has no power in the space: the link would not count, the global scope applies.
    body = {"initial_state": [ENCRYPTION, parent(STRICT)], "topic": "heron"}
    assert rules(eng.check_create_room(MALLORY, body)) == []
    # An empty via is no claim at all; an unknown space gives nobody power.
    assert (
        rules(eng.check_create_room(ALICE, {"initial_state": [ENCRYPTION, parent(STRICT, [])]}))
        == []
    )
    unknown = engine(tmp_path, SPACE_RULES, power={})
    assert (
        rules(unknown.check_create_room(ALICE, {"initial_state": [ENCRYPTION, parent(STRICT)]}))
        == []
    )
    # Power from the space's power levels counts like a creator's.
    levels = SpacePower(levels_known=True, senders=frozenset({MALLORY}))
    eng = engine(tmp_path, SPACE_RULES, power={STRICT: levels})
    assert rules(eng.check_create_room(MALLORY, body)) == [
        "encryption:forbidden",
        "keyword:strict-words",
    ]


def test_an_upgrade_keeps_the_old_room_scope(tmp_path: Path) -> None:
    eng = engine(tmp_path, SPACE_RULES)
    upgrade = {
        "creation_content": {"predecessor": {"room_id": OLD_ROOM, "event_id": "$x"}},
        "initial_state": [ENCRYPTION],
    }
    assert rules(eng.check_create_room(MALLORY, upgrade)) == ["encryption:forbidden"]


def test_a_named_predecessor_cannot_lend_its_laxer_scope(tmp_path: Path) -> None:
    """createRoom lets the client write any ``creation_content.predecessor``: naming a room
    with an exception (encryption allowed, a keyword off, open federation) must not carry
    the exception into a room that will live in the global scope."""
    lax_room = f"!lax:{OWN}"
    settings = {
        "dlp": {
            "forbid_encryption": True,
            "keywords": [{"name": "codenames", "keywords": ["kingfisher"]}],
            "rooms": {
                lax_room: {
                    "forbid_encryption": False,
                    "keywords": [{"name": "codenames", "keywords": ["unrelated"]}],
                }
            },
        },
        "federation": {"mode": "allowlist", "servers": ["partner.example"]},
    }
    eng = engine(tmp_path, settings)
    spoof = {"predecessor": {"room_id": lax_room}}
    assert (
        rules(
            eng.check_event(
                {"type": "m.room.encryption", "state_key": "", "room_id": lax_room, "content": {}}
            )
        )
        == []
    )
    body = {"creation_content": spoof, "initial_state": [ENCRYPTION]}
    # The named room has rules of its own: no member may upgrade it anyway (below).
    assert rules(eng.check_create_room(MALLORY, body)) == [
        "upgrade:room-rules",
        "encryption:forbidden",
    ]
    topic = {"creation_content": spoof, "topic": "kingfisher"}
    assert "keyword:codenames" in rules(eng.check_create_room(MALLORY, topic))
    invite = {"creation_content": spoof, "invite": ["@eve:evil.example"]}
    assert "federation:allowlist" in rules(eng.check_create_room(MALLORY, invite))


def test_a_room_with_rules_of_its_own_is_not_upgraded_by_its_members(tmp_path: Path) -> None:
    """Rules are keyed by room ID: after an upgrade the new room would live under the global
    rules only, so a room owner could shed a strict room rule by upgrading."""
    strict_room = f"!strict-room:{OWN}"
    settings = {
        "dlp": {"rooms": {strict_room: {"keywords": [{"name": "deal", "keywords": ["heron"]}]}}},
        "retention": {"rooms": {f"!kept:{OWN}": {"max_lifetime": "30d"}}},
    }
    eng = engine(tmp_path, settings)
    for old in (strict_room, f"!kept:{OWN}"):
        upgrade = {"creation_content": {"predecessor": {"room_id": old}}}
        verdict = eng.check_create_room(ALICE, upgrade)
        assert rules(verdict) == ["upgrade:room-rules"]
        assert verdict.first_block is not None
        assert "ask a policy administrator" in verdict.first_block.message
    # A room without rules of its own (only its spaces' or the global ones) is upgraded.
    plain = {"creation_content": {"predecessor": {"room_id": f"!plain:{OWN}"}}}
    assert rules(eng.check_create_room(ALICE, plain)) == []


@pytest.mark.parametrize(
    "body",
    [
        {"name": "Kingfisher launch"},
        {"topic": "all about kingfisher"},
        {"room_alias_name": "kingfisher"},
        {"initial_state": [{"type": "m.room.topic", "content": {"topic": "kingfisher"}}]},
        {
            "initial_state": [
                {"type": "org.example.note", "state_key": "a", "content": {"x": "kingfisher"}}
            ]
        },
        {"creation_content": {"org.example.note": "kingfisher"}},
    ],
)
def test_dlp_reads_every_text_of_the_body(tmp_path: Path, body: dict[str, Any]) -> None:
    eng = engine(tmp_path, SPACE_RULES)
    verdict = eng.check_create_room(ALICE, body)
    assert rules(verdict) == ["keyword:codenames"]
    assert verdict.blocked is False or verdict.first_block is not None


def test_dlp_exemptions_apply(tmp_path: Path) -> None:
    settings = {"dlp": {**SPACE_RULES["dlp"], "exempt_users": [ALICE]}}
    eng = engine(tmp_path, settings)
    assert (
        rules(
            eng.check_create_room(ALICE, {"topic": "kingfisher", "room_alias_name": "kingfisher"})
        )
        == []
    )


def test_invites_in_the_body_follow_the_federation_policy(tmp_path: Path) -> None:
    eng = engine(tmp_path, {"federation": {"mode": "allowlist", "servers": ["partner.example"]}})
    refused = eng.check_create_room(ALICE, dm(invite="@eve:evil.example"))
    assert rules(refused) == ["federation:allowlist"]
    assert refused.first_block is not None
    assert "evil.example" in refused.first_block.message
    assert not eng.check_create_room(ALICE, {"invite": ["@p:partner.example", f"@b:{OWN}"]}).blocked
    # Creators of room version 12 cannot be removed: an excluded one is refused too.
    extra = {"creation_content": {"additional_creators": ["@eve:evil.example"]}}
    assert rules(eng.check_create_room(ALICE, extra)) == ["federation:allowlist"]
    # A 3pid invite hands the address to the identity server it names.
    third = {"invite_3pid": [{"id_server": "id.evil.example", "medium": "email", "address": "a@b"}]}
    verdict = eng.check_create_room(ALICE, third)
    assert verdict.first_block is not None
    assert "identity server id.evil.example" in verdict.first_block.message
    fine = {"invite_3pid": [{"id_server": "partner.example", "medium": "email", "address": "a@b"}]}
    assert not eng.check_create_room(ALICE, fine).blocked


def test_m_federate_false_rooms_hold_local_users_only(tmp_path: Path) -> None:
    eng = engine(tmp_path, {})
    body = {"creation_content": {"m.federate": False}, "invite": ["@p:partner.example"]}
    verdict = eng.check_create_room(ALICE, body)
    assert verdict.first_block is not None
    assert "m.federate: false" in verdict.first_block.message
    local = {"creation_content": {"m.federate": False}, "invite": [f"@b:{OWN}"]}
    assert not eng.check_create_room(ALICE, local).blocked
    # Open federation: remote invites in an ordinary room are fine.
    assert not eng.check_create_room(ALICE, {"invite": ["@p:partner.example"]}).blocked


def test_malformed_bodies_never_raise(tmp_path: Path) -> None:
    eng = engine(tmp_path, SPACE_RULES)
    for body in (
        {"initial_state": "x"},
        {
            "initial_state": [
                1,
                None,
                {"type": 5},
                {"type": "m.room.topic", "content": "kingfisher"},
            ]
        },
        {"invite": "@a:b", "invite_3pid": [1], "creation_content": []},
        {"name": 5, "topic": None, "room_alias_name": 3},
    ):
        eng.check_create_room(ALICE, body)
    assert read_new_room(ALICE, {"invite_3pid": [{}]}).identity_servers == ("",)


def test_state_events_through_the_state_api(tmp_path: Path) -> None:
    eng = engine(tmp_path, SPACE_RULES)
    room = f"!r:{OWN}"
    assert rules(
        eng.check_state_event(ALICE, room, "m.room.topic", "", {"topic": "kingfisher"})
    ) == ["keyword:codenames"]
    assert rules(eng.check_state_event(ALICE, room, "m.room.name", "", {"name": "fine"})) == []
    # forbid_encryption: where the room's scope forbids it.
    assert rules(
        eng.check_state_event(ALICE, OLD_ROOM, "m.room.encryption", "", {"algorithm": "a"})
    ) == ["encryption:forbidden"]
    assert (
        rules(eng.check_state_event(ALICE, room, "m.room.encryption", "", {"algorithm": "a"})) == []
    )


def test_server_acl_must_follow_the_policy(tmp_path: Path) -> None:
    eng = engine(tmp_path, {"federation": {"mode": "allowlist", "servers": ["partner.example"]}})
    room = f"!r:{OWN}"
    wanted = {"allow": [OWN, "partner.example"], "deny": [], "allow_ip_literals": False}
    assert rules(eng.check_state_event(ALICE, room, "m.room.server_acl", "", wanted)) == []
    loose = {"allow": ["*"], "deny": [], "allow_ip_literals": False}
    verdict = eng.check_state_event(ALICE, room, "m.room.server_acl", "", loose)
    assert rules(verdict) == ["federation:acl"]
    assert verdict.first_block is not None
    assert "federation mode allowlist" in verdict.first_block.message
    lockout = {"allow": ["partner.example"], "deny": []}
    verdict = eng.check_state_event(ALICE, room, "m.room.server_acl", "", lockout)
    assert verdict.first_block is not None
    assert f"lock {OWN} out" in verdict.first_block.message
    # The bot writes the ACL the policy wants (any content it sends is its own decision).
    assert rules(eng.check_state_event(BOT, room, "m.room.server_acl", "", loose)) == []


def test_an_alias_is_judged_by_its_name_in_the_global_scope(tmp_path: Path) -> None:
    """``PUT /directory/room/{alias}`` (no callback judged it before): the name is read, the
    server part is not; exempt users and the bot pass."""
    eng = engine(tmp_path, {**SPACE_RULES, "dlp": {**SPACE_RULES["dlp"], "exempt_users": [BOT]}})
    assert rules(eng.check_room_alias(ALICE, f"#kingfisher-launch:{OWN}")) == ["keyword:codenames"]
    assert rules(eng.check_room_alias(ALICE, "#launch:kingfisher.example")) == []
    assert rules(eng.check_room_alias(BOT, f"#kingfisher:{OWN}")) == []
    exempt = engine(tmp_path, {"dlp": {**SPACE_RULES["dlp"], "exempt_users": [ALICE]}})
    assert rules(exempt.check_room_alias(ALICE, f"#kingfisher:{OWN}")) == []


def test_refusals_name_what_was_refused_not_a_message(tmp_path: Path) -> None:
    """The gate's answer reaches the client: a new room, a room setting or an alias refused
    by a DLP rule is named as such (never the matched word), a message stays a message."""
    blocking = {
        "dlp": {"keywords": [{"name": "codenames", "keywords": ["kingfisher"], "action": "block"}]}
    }
    eng = engine(tmp_path, blocking)
    room = eng.check_create_room(ALICE, {"topic": "the kingfisher launch"}).first_block
    assert room is not None and room.message.startswith("Your new room was not created")
    assert "create the room again" in room.message
    state = eng.check_state_event(
        ALICE, f"!r:{OWN}", "m.room.topic", "", {"topic": "kingfisher"}
    ).first_block
    assert state is not None and state.message.startswith("This room setting")
    alias = eng.check_room_alias(ALICE, f"#kingfisher:{OWN}").first_block
    assert alias is not None and alias.message.startswith("This room address was not created")
    message = eng.check_event(
        {"type": "m.room.message", "sender": ALICE, "room_id": f"!r:{OWN}",
         "content": {"msgtype": "m.text", "body": "kingfisher"}}
    ).first_block  # fmt: skip
    assert message is not None and message.message.startswith("Your message was blocked")
    for finding in (room, state, alias, message):
        assert "kingfisher" not in finding.message.lower()
        assert "'keyword:codenames'" in finding.message
