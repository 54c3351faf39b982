"""Space links a room cannot forge: who may claim a link, and who may drop it."""

from __future__ import annotations

import json
from typing import Any

import pytest

from bridge.policy.spaces import Side, SpaceLinks, SpacePower, creator_power, listed

OWN = "corp.example"
SPACE = f"!space:{OWN}"
LAX = f"!lax:{OWN}"
ROOM = f"!room:{OWN}"
ADMIN = f"@admin:{OWN}"
MOD = f"@mod:{OWN}"
USER = f"@user:{OWN}"
VIA = {"via": [OWN]}


def ev(room: str, sender: str, etype: str, key: str, content: dict[str, Any]) -> dict[str, Any]:
    return {"type": etype, "room_id": room, "sender": sender, "state_key": key, "content": content}


def create(space: str, sender: str = ADMIN, version: str = "10", **extra: Any) -> dict[str, Any]:
    content = {"type": "m.space", "room_version": version, **extra}
    return ev(space, sender, "m.room.create", "", content)


def levels(space: str, users: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return ev(space, ADMIN, "m.room.power_levels", "", {"users": users, **extra})


def child(space: str, room: str, content: dict[str, Any] = VIA, sender: str = ADMIN) -> Any:
    return ev(space, sender, "m.space.child", room, content)


def parent(room: str, space: str, sender: str, content: dict[str, Any] = VIA) -> Any:
    return ev(room, sender, "m.space.parent", space, content)


def run(*events: dict[str, Any], links: SpaceLinks | None = None) -> SpaceLinks:
    links = links or SpaceLinks()
    for e in events:
        links = links.apply(e)
    return links


def space_made_by_admin(space: str = SPACE) -> SpaceLinks:
    return run(create(space), levels(space, {ADMIN: 100, MOD: 50}))


def test_a_parent_named_by_a_user_without_power_in_the_space_is_refused() -> None:
    links = run(parent(ROOM, LAX, USER), links=space_made_by_admin(LAX))
    assert links.room_spaces() == {}
    assert not links.claimed(ROOM, LAX, Side.ROOM)


def test_a_parent_named_for_a_space_the_bridge_knows_nothing_of_is_refused() -> None:
    assert run(parent(ROOM, LAX, ADMIN)).room_spaces() == {}


def test_a_parent_named_by_a_space_admin_is_accepted() -> None:
    links = run(parent(ROOM, SPACE, ADMIN), links=space_made_by_admin())
    assert links.room_spaces() == {ROOM: (SPACE,)}
    assert links.claimed(ROOM, SPACE, Side.ROOM)


def test_the_level_needed_is_the_child_event_level_or_the_state_default() -> None:
    base = space_made_by_admin()
    # state_default 50 when not given: the moderator at 50 may.
    assert run(parent(ROOM, SPACE, MOD), links=base).room_spaces() == {ROOM: (SPACE,)}
    strict = run(levels(SPACE, {ADMIN: 100, MOD: 50}, events={"m.space.child": 75}), links=base)
    assert run(parent(ROOM, SPACE, MOD), links=strict).room_spaces() == {}
    high = run(levels(SPACE, {ADMIN: 100, MOD: 50}, state_default=90), links=base)
    assert run(parent(ROOM, SPACE, MOD), links=high).room_spaces() == {}
    low = run(levels(SPACE, {}, users_default=10, events={"m.space.child": 0}), links=base)
    assert run(parent(ROOM, SPACE, USER), links=low).room_spaces() == {ROOM: (SPACE,)}


def test_string_levels_of_old_room_versions_count() -> None:
    base = run(create(SPACE), levels(SPACE, {MOD: "60"}, state_default="55"))
    assert run(parent(ROOM, SPACE, MOD), links=base).room_spaces() == {ROOM: (SPACE,)}


def test_a_child_listed_by_the_space_is_in_it() -> None:
    assert run(child(SPACE, ROOM)).room_spaces() == {ROOM: (SPACE,)}
    assert run(child(SPACE, ROOM)).claimed(ROOM, SPACE, Side.SPACE)


def test_a_claim_without_via_is_no_claim() -> None:
    assert run(child(SPACE, ROOM, {})).room_spaces() == {}
    assert run(child(SPACE, ROOM, {"via": "corp.example"})).room_spaces() == {}
    assert run(child(SPACE, ROOM, {"via": [""]})).room_spaces() == {}
    base = space_made_by_admin()
    assert run(parent(ROOM, SPACE, ADMIN, {"via": []}), links=base).room_spaces() == {}


def test_an_empty_parent_from_the_room_does_not_drop_the_spaces_link() -> None:
    links = run(child(SPACE, ROOM), parent(ROOM, SPACE, USER, {}))
    assert links.room_spaces() == {ROOM: (SPACE,)}


def test_an_empty_child_from_the_space_does_not_drop_the_rooms_claim() -> None:
    links = run(parent(ROOM, SPACE, ADMIN), child(SPACE, ROOM, {}), links=space_made_by_admin())
    assert links.room_spaces() == {ROOM: (SPACE,)}


def test_each_side_drops_its_own_claim() -> None:
    base = run(child(SPACE, ROOM), links=space_made_by_admin())
    assert run(child(SPACE, ROOM, {}), links=base).room_spaces() == {}
    claimed = run(parent(ROOM, SPACE, ADMIN), links=space_made_by_admin())
    assert run(parent(ROOM, SPACE, USER, {}), links=claimed).room_spaces() == {}


def test_with_both_claims_the_remaining_one_keeps_the_link() -> None:
    both = run(child(SPACE, ROOM), parent(ROOM, SPACE, ADMIN), links=space_made_by_admin())
    assert both.claims[ROOM][SPACE] == {Side.SPACE, Side.ROOM}
    room_dropped = run(parent(ROOM, SPACE, USER, {}), links=both)
    assert room_dropped.room_spaces() == {ROOM: (SPACE,)}
    assert run(child(SPACE, ROOM, {}), links=room_dropped).room_spaces() == {}
    space_dropped = run(child(SPACE, ROOM, {}), links=both)
    assert space_dropped.room_spaces() == {ROOM: (SPACE,)}
    assert run(parent(ROOM, SPACE, ADMIN, {}), links=space_dropped).room_spaces() == {}


def test_an_unauthorised_parent_replaces_the_rooms_earlier_claim() -> None:
    """The state event replaces the room's claim: it is now one nobody with power made."""
    claimed = run(parent(ROOM, SPACE, ADMIN), links=space_made_by_admin())
    assert run(parent(ROOM, SPACE, USER), links=claimed).room_spaces() == {}


def test_a_room_in_several_spaces_keeps_the_others() -> None:
    links = run(child(SPACE, ROOM), child(LAX, ROOM))
    assert links.room_spaces() == {ROOM: (SPACE, LAX)}
    assert run(child(LAX, ROOM, {}), links=links).room_spaces() == {ROOM: (SPACE,)}


@pytest.mark.parametrize("version", ["12", "13", "org.matrix.hydra.11"])
def test_creators_of_v12_spaces_have_unlimited_power(version: str) -> None:
    space = run(
        create(SPACE, version=version, additional_creators=[MOD]),
        levels(SPACE, {USER: 100}, events={"m.space.child": 100}),
    )
    for who in (ADMIN, MOD):  # not in users, yet unlimited
        assert run(parent(ROOM, SPACE, who), links=space).room_spaces() == {ROOM: (SPACE,)}
    stranger = f"@other:{OWN}"
    assert run(parent(ROOM, SPACE, stranger), links=space).room_spaces() == {}


def test_creators_of_older_spaces_have_only_their_level() -> None:
    space = run(create(SPACE, version="11"), levels(SPACE, {ADMIN: 0}))
    assert run(parent(ROOM, SPACE, ADMIN), links=space).room_spaces() == {}
    # Before any power levels are known, the spec's default gives the creator 100.
    assert run(parent(ROOM, SPACE, ADMIN), links=run(create(SPACE))).room_spaces() == {
        ROOM: (SPACE,)
    }
    assert run(parent(ROOM, SPACE, USER), links=run(create(SPACE))).room_spaces() == {}


def test_power_level_changes_judge_later_claims_only() -> None:
    base = space_made_by_admin()
    accepted = run(parent(ROOM, SPACE, MOD), links=base)
    demoted = run(levels(SPACE, {ADMIN: 100, MOD: 0}), links=accepted)
    # Judged as of when it was sent: the demotion does not undo the accepted claim ...
    assert demoted.room_spaces() == {ROOM: (SPACE,)}
    other = f"!other:{OWN}"
    # ... but the demoted moderator can make no new one.
    assert run(parent(other, SPACE, MOD), links=demoted).room_spaces() == {ROOM: (SPACE,)}
    promoted = run(levels(SPACE, {ADMIN: 100, USER: 50}), links=base)
    assert run(parent(other, SPACE, USER), links=promoted).room_spaces() == {other: (SPACE,)}


def test_power_levels_of_rooms_that_are_not_spaces_are_not_kept() -> None:
    plain = ev(ROOM, ADMIN, "m.room.create", "", {"room_version": "10"})
    links = run(plain, levels(ROOM, {ADMIN: 100}))
    assert links == SpaceLinks()


def test_a_space_whose_creation_was_not_seen_is_tracked_once_it_lists_a_child() -> None:
    links = run(child(SPACE, ROOM), levels(SPACE, {MOD: 50}))
    assert links.power[SPACE].may_list_children(MOD)
    other = f"!other:{OWN}"
    assert run(parent(other, SPACE, MOD), links=links).room_spaces() == {
        ROOM: (SPACE,),
        other: (SPACE,),
    }


def test_a_redelivered_create_keeps_the_known_levels() -> None:
    links = run(create(SPACE), levels(SPACE, {MOD: 50}), create(SPACE))
    assert links.power[SPACE].levels_known and links.power[SPACE].may_list_children(MOD)


def test_events_that_change_nothing_return_the_same_value() -> None:
    links = run(child(SPACE, ROOM))
    assert links.apply(child(SPACE, ROOM)) is links
    assert links.apply(ev(ROOM, USER, "m.room.message", "", {})) is links
    assert links.apply({"type": "m.space.child", "room_id": SPACE}) is links
    assert links.apply(child(SPACE, "not-a-room")) is links
    assert links.apply(child(SPACE, SPACE)) is links


def test_the_stored_form_round_trips() -> None:
    links = run(
        create(SPACE, version="12", additional_creators=[MOD]),
        levels(SPACE, {USER: 50}, users_default=60),
        child(SPACE, ROOM),
        parent(ROOM, SPACE, USER),
    )
    assert SpaceLinks.decode(links.encode()) == links
    assert SpaceLinks.decode(None) == SpaceLinks()


def test_the_earlier_stored_form_is_read_as_links_the_spaces_made() -> None:
    old = json.dumps({ROOM: [SPACE, LAX], "!x:corp.example": []})
    links = SpaceLinks.decode(old)
    assert links.room_spaces() == {ROOM: (SPACE, LAX)}
    assert links.claims[ROOM][SPACE] == {Side.SPACE}
    # The room cannot shed them; the space can.
    assert run(parent(ROOM, SPACE, USER, {}), links=links).room_spaces() == {ROOM: (SPACE, LAX)}
    assert run(child(SPACE, ROOM, {}), links=links).room_spaces() == {ROOM: (LAX,)}
    # Their spaces' power levels are kept from then on.
    assert set(links.power) == {SPACE, LAX}
    assert run(levels(SPACE, {MOD: 50}), links=links).power[SPACE].may_list_children(MOD)


def test_helpers() -> None:
    assert creator_power("12") and not creator_power("11") and not creator_power("x")
    assert listed({"via": ["a"]}) and not listed({"via": []}) and not listed(None)
    assert not SpacePower().may_list_children(ADMIN)
