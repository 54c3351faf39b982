"""Tests for bridge.policy.extract."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.policy.extract import MAX_SCAN_CHARS, extract_texts


def ev(etype: str, content: Any, **extra: Any) -> dict[str, Any]:
    return {"type": etype, "sender": "@a:x.org", "room_id": "!r:x.org", "content": content, **extra}


def test_message_body_and_formatted_body() -> None:
    texts = extract_texts(
        ev(
            "m.room.message",
            {
                "msgtype": "m.text",
                "body": "hello **world**",
                "format": "org.matrix.custom.html",
                "formatted_body": "hello <b>world</b>",
            },
        )
    )
    assert texts == ["hello **world**", "hello world"]


def test_duplicate_texts_once() -> None:
    texts = extract_texts(ev("m.room.message", {"body": "same", "formatted_body": "<p>same</p>"}))
    assert texts == ["same"]


def test_edit_new_content() -> None:
    content = {
        "body": "* fixed",
        "m.new_content": {"body": "fixed secret", "formatted_body": "fixed <i>secret</i>!"},
        "m.relates_to": {"rel_type": "m.replace", "event_id": "$e"},
    }
    texts = extract_texts(ev("m.room.message", content))
    assert "fixed secret" in texts
    assert "fixed secret!" in texts


def test_media_caption_and_filename() -> None:
    content = {"msgtype": "m.file", "body": "see attached", "filename": "payroll-2024.xlsx"}
    assert extract_texts(ev("m.room.message", content)) == ["see attached", "payroll-2024.xlsx"]


def test_sticker_body() -> None:
    assert extract_texts(ev("m.sticker", {"body": "a cat", "url": "mxc://x/y"})) == ["a cat"]


@pytest.mark.parametrize("key", ["m.poll.start", "org.matrix.msc3381.poll.start"])
def test_poll_start(key: str) -> None:
    content = {
        key: {
            "kind": "m.poll.disclosed",
            "question": {"m.text": [{"body": "Which codename?"}], "body": "Which codename (b)?"},
            "answers": [
                {"id": "a", "m.text": [{"body": "Falcon"}]},
                {"id": "b", "org.matrix.msc1767.text": "Eagle"},
                {"id": "c", "body": "Hawk"},
            ],
        },
        "org.matrix.msc1767.text": "Which codename? 1. Falcon 2. Eagle",
    }
    texts = extract_texts(ev(key, content))
    for expected in ("Which codename?", "Which codename (b)?", "Falcon", "Eagle", "Hawk"):
        assert expected in texts
    assert "Which codename? 1. Falcon 2. Eagle" in texts


def test_extensible_text_html_representation() -> None:
    content = {
        "m.text": [
            {"mimetype": "text/html", "body": "<b>sec</b>ret"},
            {"body": "plain one"},
        ]
    }
    assert extract_texts(ev("m.message", content)) == ["secret", "plain one"]


def test_room_name_topic_member() -> None:
    assert extract_texts(ev("m.room.name", {"name": "Project X"}, state_key="")) == ["Project X"]
    topic = {
        "topic": "plain topic",
        "m.topic": {"m.text": [{"body": "rich <b>topic</b>", "mimetype": "text/html"}]},
    }
    assert extract_texts(ev("m.room.topic", topic, state_key="")) == ["plain topic", "rich topic"]
    member = {"membership": "join", "displayname": "Mallory 4111", "avatar_url": "mxc://a/b"}
    assert extract_texts(ev("m.room.member", member, state_key="@a:x.org")) == ["Mallory 4111"]
    kick = {"membership": "leave", "reason": "leaked the key"}
    assert extract_texts(ev("m.room.member", kick, state_key="@b:x.org")) == ["leaked the key"]


def test_redaction_reason() -> None:
    # Clients show why a message was removed; the reason is sent to every member.
    content = {"redacts": "$e", "reason": "it had the card 4111 1111 1111 1111"}
    texts = extract_texts(ev("m.room.redaction", content, redacts="$e"))
    assert texts == ["it had the card 4111 1111 1111 1111"]
    # Room versions before 11 carry ``redacts`` at the top level only.
    assert extract_texts(ev("m.room.redaction", {"reason": "codename"}, redacts="$e")) == [
        "codename"
    ]


@pytest.mark.parametrize("key", ["m.location", "org.matrix.msc3488.location"])
def test_location_description(key: str) -> None:
    content = {
        "msgtype": "m.location",
        "body": "Location: Site Falcon",
        "geo_uri": "geo:51.5,-0.1",
        key: {"uri": "geo:51.5,-0.1", "description": "Project Falcon HQ"},
    }
    texts = extract_texts(ev("m.room.message", content))
    assert texts == ["Location: Site Falcon", "Project Falcon HQ"]


@pytest.mark.parametrize("etype", ["m.beacon_info", "org.matrix.msc3672.beacon_info"])
def test_live_location_description(etype: str) -> None:
    content = {"description": "Falcon convoy", "live": True, "timeout": 60_000}
    assert extract_texts(ev(etype, content, state_key="@a:x.org")) == ["Falcon convoy"]


@pytest.mark.parametrize("key", ["m.caption", "org.matrix.msc1767.caption"])
def test_extensible_media_caption(key: str) -> None:
    content = {
        "m.file": {"url": "mxc://x/y", "name": "report.pdf"},
        key: {"m.text": [{"body": "the <b>Falcon</b> numbers", "mimetype": "text/html"}]},
    }
    # The file name inside ``m.file`` is text too (every string value is read).
    assert extract_texts(ev("m.file", content)) == ["the Falcon numbers", "report.pdf"]
    bare = {key: [{"body": "bare caption"}]}
    assert extract_texts(ev("m.image", bare)) == ["bare caption"]


def test_media_body_filename_and_caption_all_scanned() -> None:
    content = {
        "msgtype": "m.image",
        "body": "caption with the codename",
        "filename": "falcon.png",
        "format": "org.matrix.custom.html",
        "formatted_body": "caption with <i>the</i> codename!",
    }
    texts = extract_texts(ev("m.room.message", content))
    assert texts == ["caption with the codename", "caption with the codename!", "falcon.png"]


def test_reaction_key() -> None:
    content = {"m.relates_to": {"rel_type": "m.annotation", "event_id": "$e", "key": "secret"}}
    assert extract_texts(ev("m.reaction", content)) == ["secret"]


@pytest.mark.parametrize(
    ("etype", "content"),
    [
        ("m.room.encrypted", {"algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "AwgA"}),
        ("m.room.pinned_events", {"pinned": ["$secret"]}),
        ("m.room.message", "not a dict"),
        ("m.room.message", None),
        ("m.room.name", {"name": None}),
        ("m.reaction", {"m.relates_to": {"rel_type": "m.annotation", "event_id": "$e"}}),
        ("m.sticker", {"url": "mxc://x/y", "info": {"mimetype": "image/png", "w": 5}}),
    ],
)
def test_yields_nothing_for_identifiers_or_no_text(etype: str, content: Any) -> None:
    assert extract_texts(ev(etype, content)) == []


@pytest.mark.parametrize(
    ("etype", "content"),
    [
        ("m.room.message", {"body": 42, "formatted_body": ["x"], "filename": {"a": 1}}),
        ("m.reaction", {"m.relates_to": "x"}),
        ("m.poll.start", {"m.poll.start": {"question": 5, "answers": "nope"}}),
        ("m.poll.start", {"m.poll.start": {"answers": [None, 3, {"m.text": "x"}]}}),
        ("m.room.message", {"m.location": "x", "m.caption": 5, "reason": ["y"]}),
        ("m.file", {"m.caption": {"m.text": 7}, "org.matrix.msc3488.location": [1]}),
    ],
)
def test_malformed_fields_are_still_read_as_plain_strings(etype: str, content: Any) -> None:
    # A field of an unexpected shape is not parsed, but every string in it is still scanned.
    texts = extract_texts(ev(etype, content))
    assert set(texts) <= {"x", "y", "nope", "a"}  # "a": a key of the content, read as text
    assert set(texts) == {v for v in ("x", "y", "nope", "a") if repr(v) in repr(content)}


@pytest.mark.parametrize("event", [None, 3, "str", [], {}, {"type": 5, "content": {"body": "x"}}])
def test_odd_events(event: Any) -> None:
    assert isinstance(extract_texts(event), list)


def test_encrypted_yields_nothing_even_with_body() -> None:
    assert extract_texts(ev("m.room.encrypted", {"body": "plaintext?"})) == []


def test_total_length_is_bounded() -> None:
    big = "a" * (MAX_SCAN_CHARS + 10)
    texts = extract_texts(ev("m.room.message", {"body": big, "formatted_body": "b" * 100}))
    assert sum(map(len, texts)) <= MAX_SCAN_CHARS
    texts = extract_texts(ev("m.room.message", {"body": "x" * 100}), max_chars=10)
    assert texts == ["x" * 10]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "body",
                    "formatted_body",
                    "m.new_content",
                    "m.text",
                    "question",
                    "answers",
                    "m.poll.start",
                    "m.relates_to",
                    "key",
                    "name",
                    "topic",
                    "m.topic",
                    "mimetype",
                    "displayname",
                    "filename",
                    "org.matrix.msc1767.text",
                    "reason",
                    "description",
                    "m.location",
                    "m.caption",
                    "x",
                ]
            )
            | st.text(max_size=5),
            children,
            max_size=5,
        )
    ),
    max_leaves=30,
)
event_types = st.sampled_from(
    ["m.room.message", "m.sticker", "m.poll.start", "m.room.name", "m.room.topic",
     "m.room.member", "m.reaction", "m.room.encrypted", "m.room.redaction", "m.beacon_info",
     "custom.type"]
)  # fmt: skip


@given(event_types, json_values)
@settings(max_examples=400)
def test_never_raises_on_arbitrary_content(etype: str, content: Any) -> None:
    texts = extract_texts({"type": etype, "content": content})
    assert all(isinstance(t, str) and t for t in texts)


def test_every_string_of_the_content_is_read_in_order_after_the_known_fields() -> None:
    content = {
        "com.example.note": "first custom",
        "body": "the body",
        "nested": {"a": ["x", {"b": "deep"}], "url": "mxc://not/read", "msgtype": "m.text"},
    }
    texts = extract_texts(ev("com.example.thing", content))
    # Keys other than the protocol's are text too, read where the walk meets them.
    assert texts == [
        "the body",
        "com.example.note",
        "first custom",
        "nested",
        "a",
        "x",
        "b",
        "deep",
    ]


def test_a_media_url_key_holding_no_mxc_uri_is_read_as_text() -> None:
    content = {"msgtype": "m.text", "body": "hi", "url": "https://x.example/project falcon"}
    assert extract_texts(ev("m.room.message", content)) == [
        "hi",
        "https://x.example/project falcon",
    ]
    hidden = {"body": "hi", "info": {"thumbnail_url": "4111 1111 1111 1111", "w": 5}}
    assert extract_texts(ev("m.room.message", hidden)) == ["hi", "4111 1111 1111 1111"]
    media = {"body": "cat.png", "url": "mxc://x/4111111111111111", "avatar_url": "mxc://a/b"}
    assert extract_texts(ev("m.room.message", media)) == ["cat.png"]


def test_state_keys_of_custom_state_events_are_read_but_not_user_ids() -> None:
    assert extract_texts(ev("com.example.s", {}, state_key="project falcon")) == ["project falcon"]
    assert extract_texts(ev("com.example.s", {}, state_key="@a:x.org")) == []  # the sender's
    # Another "user ID" is whatever the sender wrote: a card fits a valid localpart.
    card_key = "@4111-1111-1111-1111:x.org"
    assert extract_texts(ev("com.example.s", {}, state_key=card_key)) == [card_key]
    assert extract_texts(ev("m.room.member", {}, state_key="falcon")) == []


def test_the_walk_is_bounded_in_depth_and_count() -> None:
    from bridge.policy.extract import MAX_DEPTH, MAX_NODES

    deep: Any = "too deep"
    for _ in range(MAX_DEPTH + 5):
        deep = {"n": deep}
    assert "too deep" not in extract_texts(ev("x.y", {"d": deep}))
    shallow: Any = "found"
    for _ in range(MAX_DEPTH - 2):
        shallow = {"n": shallow}
    assert extract_texts(ev("x.y", {"d": shallow})) == ["d", "n", "found"]
    many = {"list": [f"s{i}" for i in range(MAX_NODES + 100)]}
    assert len(extract_texts(ev("x.y", many))) < MAX_NODES


def test_canonical_alias_names_are_read_not_their_servers() -> None:
    """An alias is a name a user chose, shown to the room and the directory: an alias made
    through the directory API (no callback) and published as an alt alias is text."""
    event = {
        "type": "m.room.canonical_alias",
        "state_key": "",
        "content": {
            "alias": "#general:corp.example",
            "alt_aliases": ["#kingfisher-launch:corp.example", 5, "no-hash:corp.example"],
        },
    }
    assert extract_texts(event) == ["general", "kingfisher-launch"]


def test_content_keys_and_long_integers_are_read_as_text() -> None:
    """A card written as a JSON integer (canonical JSON allows up to 2**53) or as a key, and a
    keyword as a key, are text a script on the other side reads; protocol keys and short
    numbers (sizes, millisecond timestamps) are not."""
    content = {
        "msgtype": "m.text",
        "body": "hi",
        "info": {"size": 4111, "w": 5, "ts": 1733364000006},
        "n": 4111111111111111,
        "com.example": {"4111 1111 1111 1111": True, "kingfisher launch": None},
        "flag": True,
    }
    texts = extract_texts(ev("m.room.message", content))
    assert texts == [
        "hi", "ts", "n", "4111111111111111", "com.example", "4111 1111 1111 1111",
        "kingfisher launch", "flag",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "markup",
    [
        '<font data-mx-spoiler="kingfisher">x</font>',  # Element shows the reason
        '<span data-mx-maths="kingfisher">x</span>',  # and renders the maths source
        "<!-- kingfisher -->x",  # shown by no client, read by any script
    ],
)
def test_html_spoiler_reasons_maths_and_comments_are_read(markup: str) -> None:
    content = {"msgtype": "m.text", "body": "x", "format": "org.matrix.custom.html"}
    for padded in (markup, markup + "<p>" + "y " * 3000 + "</p>"):  # the parser and the fast path
        texts = extract_texts(ev("m.room.message", {**content, "formatted_body": padded}))
        assert any("kingfisher" in t for t in texts)
