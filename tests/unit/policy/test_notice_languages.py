"""Notices in the recipient's language: the choice, and complete German texts."""

from __future__ import annotations

import re
import string

import pytest

from bridge.policy.dlp import DETECTORS, DetectorRule, DlpEngine, DlpPolicy
from bridge.policy.notices import (
    TEXTS,
    Language,
    Languages,
    Refusal,
    Subject,
    reason_in,
    render,
    render_warning,
)

CARD = "4111 1111 1111 1111"
LANGS = Languages.parse(
    "en", {"@hans:corp.example": "de", "@*:corp.example": "de", "@anna:corp.example": "EN"}
)


def test_the_user_entry_wins_then_the_server_then_the_default() -> None:
    assert LANGS.for_user("@hans:corp.example") is Language.DE
    assert LANGS.for_user("@anna:corp.example") is Language.EN  # her own entry
    assert LANGS.for_user("@bob:corp.example") is Language.DE  # the server's
    assert LANGS.for_user("@eve:other.example") is Language.EN  # the default
    assert Languages.parse("de", None).for_user("@x:y") is Language.DE
    assert Languages().for_user("@x:y") is Language.EN


@pytest.mark.parametrize(
    ("default", "mapping", "error"),
    [
        ("fr", None, "notices.language"),
        ("en", {"@a:b": "xx"}, r"notices.languages.@a:b"),
        ("en", {"alice": "de"}, "not a user ID"),
        ("en", ["@a:b"], "expected a mapping"),
    ],
)
def test_bad_language_settings_are_refused(default: object, mapping: object, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        Languages.parse(default, mapping)


def test_every_text_exists_in_every_language_with_the_same_placeholders() -> None:
    def fields(template: str) -> set[str]:
        return {f for _, f, _, _ in string.Formatter().parse(template) if f}

    english = TEXTS[Language.EN]
    for language in Language:
        assert set(TEXTS[language]) == set(english), language
        for key, template in TEXTS[language].items():
            assert fields(template) == fields(english[key]), (language, key)


def card_refusal(subject: Subject = Subject.MESSAGE, **kw: object) -> Refusal:
    engine = DlpEngine.compile(DlpPolicy(detectors=(DetectorRule("card"),)))
    [finding] = engine.scan([f"my card {CARD}"])
    return Refusal(
        "K7QM-2XPA", finding.rule, "!room:corp.example", 0.0, subject, finding.message,
        finding.excerpt, **kw,  # type: ignore[arg-type]
    )  # fmt: skip


@pytest.mark.parametrize("subject", list(Subject))
def test_a_german_notice_is_german_and_never_has_the_matched_text(subject: Subject) -> None:
    refusal = card_refusal(subject, overridable=True, digest="d" * 64)
    for grouped in (0, 1, 3):
        body, html = render(refusal, grouped, "!policy", 900.0, Language.DE)
        # a new room: no room ID; an upload: not stored, and never overridable
        verb = {Subject.ROOM: "erstellt", Subject.UPLOAD: "gespeichert"}.get(subject, "gesendet")
        assert f"wurde nicht {verb} (Referenz K7QM-2XPA)" in body
        assert "Regel: detector:card" in body and "eine Zahlungskartennummer" in body
        assert "!policy report K7QM-2XPA <Kommentar>" in body
        if subject is Subject.UPLOAD:
            assert "Für abgelehnte Uploads ist keine Ausnahme möglich" in body
        else:
            assert "!policy override K7QM-2XPA <Begründung>" in body and "15 Minuten" in body
        for text in (body, html):
            assert "4111" not in text and "1111 1111" not in text and "****" not in text
            # Nothing of the English texts is left.
            for english in ("Your ", "When:", "Why:", "What to do", "Think this", "blocked"):
                assert english not in text, (english, text)
        assert "&lt;Kommentar&gt;" in html and "<b>" in html
    english, _ = render(refusal, 0, "!policy", 900.0)
    assert "Your" in english and "4111" not in english


def test_german_reasons_for_every_detector_keywords_regexes_and_other_rules() -> None:
    for name in DETECTORS:
        reason = reason_in(Language.DE, f"detector:{name}", "blocked")
        assert "Datenschutzregel" in reason and "blocked" not in reason
    assert "Stichwortliste 'secret'" in reason_in(Language.DE, "keyword:secret", "x")
    assert "Musterregel 'ticket'" in reason_in(Language.DE, "regex:ticket", "x")
    assert reason_in(Language.DE, "federation:deny", "x") == (
        "Die Richtlinienregel 'federation:deny' lässt dies nicht zu."
    )
    assert reason_in(Language.EN, "regex:ticket", "the reason") == "the reason"


def test_a_german_warning_and_the_non_overridable_line() -> None:
    body, html = render_warning("!r:x", "regex:ticket", "matched", 0.0, Language.DE)
    assert body.startswith("⚠️ Ihre Nachricht in !r:x wurde gesendet")
    assert "Warum: Die Datenschutzregel 'regex:ticket'" in body
    assert 'href="https://matrix.to/#/!r:x"' in html
    body, _ = render(card_refusal(), 0, "!policy", 900.0, Language.DE)
    assert "Für diese Regel ist keine Ausnahme möglich." in body
    assert not re.search(r"\{\w*\}", body)  # every placeholder filled in
