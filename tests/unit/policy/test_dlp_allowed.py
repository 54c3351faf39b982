"""Allowed phrases: exceptions to one rule, never to a match elsewhere or of another rule."""

from __future__ import annotations

import pytest

from bridge.policy import layers
from bridge.policy.dlp import (
    AllowedPhrase,
    DetectorRule,
    DlpEngine,
    DlpPolicy,
    KeywordList,
    RegexRule,
)
from bridge.policy.scopes import GLOBAL

CARD = "4111 1111 1111 1111"
OTHER_CARD = "5555 5555 5555 4444"
ROOM = "!room:corp.example"


def engine(*allowed: AllowedPhrase) -> DlpEngine:
    return DlpEngine.compile(
        DlpPolicy(
            keyword_lists=(KeywordList("secret", ("kingfisher",)),),
            regex_rules=(RegexRule("project", r"PRJ-\d+"),),
            detectors=(DetectorRule("card"), DetectorRule("iban")),
            allowed_phrases=allowed,
        )
    )


def rules(e: DlpEngine, *texts: str) -> list[str]:
    return [f.rule for f in e.scan(list(texts))]


TEST_CARD = AllowedPhrase("detector:card", f"test card {CARD}")
LANE = AllowedPhrase("keyword:secret", "Kingfisher Lane")
DEMO = AllowedPhrase("regex:project", "PRJ-1 demo")


@pytest.mark.parametrize(
    "text",
    [
        f"please use the test card {CARD} for the demo",
        "Test-Card 4111-1111-1111-1111",  # compared on the normalised form
        f"TEST   CARD\n{CARD}!",
    ],
)
def test_a_detector_match_inside_the_phrase_is_not_flagged(text: str) -> None:
    assert rules(engine(), text) == ["detector:card"]
    assert rules(engine(TEST_CARD), text) == []


def test_a_real_card_elsewhere_in_the_same_text_is_still_flagged() -> None:
    e = engine(TEST_CARD)
    assert rules(e, f"test card {CARD} and mine is {OTHER_CARD}") == ["detector:card"]
    assert rules(e, f"test card {CARD}", OTHER_CARD) == ["detector:card"]
    assert rules(e, CARD) == ["detector:card"]  # the number alone is not the phrase
    # The same number twice: once inside the phrase, once outside it.
    assert rules(e, f"test card {CARD}, and again {CARD}") == ["detector:card"]


def test_a_phrase_does_not_suppress_another_rule() -> None:
    e = engine(TEST_CARD)
    iban = "GB82 WEST 1234 5698 7654 32"
    assert rules(e, f"test card {CARD} {iban}") == ["detector:iban"]
    # A phrase for one rule says nothing about a match of another rule inside it.
    e = engine(AllowedPhrase("detector:iban", f"test card {CARD}"))
    assert rules(e, f"test card {CARD}") == ["detector:card"]


def test_the_phrase_must_stand_as_whole_words() -> None:
    e = engine(AllowedPhrase("detector:card", "card 4111 1111 1111 1111"))
    assert rules(e, f"card {CARD}") == []
    assert rules(e, f"xcard {CARD}") == ["detector:card"]


def test_keyword_hits_inside_the_phrase_are_skipped_others_count() -> None:
    e = engine(LANE)
    assert rules(e, "we live on kingfisher lane") == []
    assert rules(e, "KINGFISHER -- LANE!") == []
    assert rules(e, "kingfisher lane, and project kingfisher") == ["keyword:secret"]
    assert rules(e, "kingfisher") == ["keyword:secret"]
    assert rules(e, "kingfisher lanes") == ["keyword:secret"]  # not the whole phrase


def test_regex_matches_inside_the_phrase_are_skipped_others_count() -> None:
    e = engine(DEMO)
    assert rules(e, "see PRJ-1 demo") == []
    assert rules(e, "see PRJ-1 demo and PRJ-2") == ["regex:project"]
    assert rules(e, "PRJ-1") == ["regex:project"]


def test_phrases_of_rules_not_in_force_are_ignored_empty_ones_refused() -> None:
    assert rules(engine(AllowedPhrase("detector:ssn", "123-45-6789")), CARD) == ["detector:card"]
    with pytest.raises(ValueError, match="no letters or digits"):
        engine(AllowedPhrase("detector:card", "!!!"))
    with pytest.raises(ValueError, match="empty"):
        AllowedPhrase("detector:card", "  ")
    with pytest.raises(ValueError, match="rule must be"):
        AllowedPhrase("card", "x")


def test_runtime_layers_scope_the_exception() -> None:
    doc, added = layers.add_allowed_phrase({}, ROOM, "detector:card", TEST_CARD.phrase, "ABCD-1234")
    assert added
    again, added = layers.add_allowed_phrase(doc, ROOM, "detector:card", TEST_CARD.phrase)
    assert not added and again == doc
    config = layers.parse_config_dlp({"detectors": {"card": "block"}})
    dlp = layers.DlpLayers(config, layers.parse_runtime_dlp(doc))
    text = f"the test card {CARD}"
    assert DlpEngine.compile(dlp.effective(ROOM)).scan([text]) == ()
    assert rules(DlpEngine.compile(dlp.effective(None)), text) == ["detector:card"]
    assert rules(DlpEngine.compile(dlp.effective("!other:corp.example")), text) == ["detector:card"]
    assert layers.allowed_phrase_entries(doc) == [
        (ROOM, "detector:card", TEST_CARD.phrase, "ABCD-1234")
    ]
    doc, found = layers.remove_allowed_phrase(doc, ROOM, "detector:card", TEST_CARD.phrase)
    assert found and layers.allowed_phrase_entries(doc) == []
    _, found = layers.remove_allowed_phrase(doc, GLOBAL, "detector:card", TEST_CARD.phrase)
    assert not found


def test_config_allowed_phrases_are_validated() -> None:
    parsed = layers.parse_config_dlp(
        {"allowed_phrases": [{"rule": "detector:card", "phrase": "test card"}]}
    )
    assert parsed[GLOBAL].allowed_phrases == (AllowedPhrase("detector:card", "test card"),)
    with pytest.raises(ValueError, match=r"dlp.allowed_phrases\[0\]"):
        layers.parse_config_dlp({"allowed_phrases": [{"rule": "card", "phrase": "x"}]})
    with pytest.raises(ValueError, match="expected a list"):
        layers.parse_config_dlp({"allowed_phrases": "test card"})
