"""Tests for bridge.policy.normalize."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.policy import bidi
from bridge.policy.normalize import clean, fold, fold_literal, html_to_text, normalize

# Any code point, lone surrogates included (they reach us through JSON "\ud800" escapes).
any_text = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF))


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Hello World", "hello world"),
        ("  lots \t of\n\n  space  ", "lots of space"),
        ("se\u200bcr\u200cet", "secret"),  # zero-width space / non-joiner
        ("se\u00adcret", "secret"),  # soft hyphen
        ("se\u2060cr\ufeffet", "secret"),  # word joiner, BOM
        ("sec\u034fret\ufe0f", "secret"),  # combining grapheme joiner, variation selector
        ("s\U000e0041ecret", "secret"),  # tag character
        ("ＳＥＣＲＥＴ", "secret"),  # full-width
        ("ﬁle", "file"),  # ligature
        ("STRASSE Straße", "strasse strasse"),  # full case folding
        ("s\u0336e\u0336c\u0336r\u0336e\u0336t\u0336", "secret"),  # strike-through marks
        ("café", "cafe"),  # the skeleton has no accents, precomposed ...
        ("cafe\u0301", "cafe"),  # ... or combining
        ("Łódź søster", "lodz soster"),  # Latin letters with a stroke: by Unicode name
        ("project...nightingale", "project nightingale"),  # punctuation runs separate words
        ("project_-_/nightingale!", "project nightingale"),
        ("a\u00a0b\u3000c\u2028d", "a b c d"),  # unicode spaces
        ("sec\x00ret\x07", "secret"),  # control characters
        ("ab\ud800cd", "abcd"),  # lone surrogate
        ("\u2800x\u2800y", "x y"),  # braille blank reads as a space
        ("", ""),
    ],
)
def test_normalize_examples(raw: str, expected: str) -> None:
    assert normalize(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("4111\u20131111\u20141111\u22121111", "4111-1111-1111-1111"),  # en/em dash, minus
        ("a\u2010b\u2011c\u2012d\u2015e\ufe63f\uff0dg", "a-b-c-d-e-f-g"),  # hyphens, dashes
        ("\u0664\u0661\u0661\u0661", "4111"),  # Arabic-Indic digits
        ("\u06f4\u06f1", "41"),  # Extended Arabic-Indic (Persian)
        ("\u096a\u0967 \u09ea\u09e7 \u0e54\u0e51", "41 41 41"),  # Devanagari, Bengali, Thai
        ("\U0001d7d2\U0001d7cf", "41"),  # mathematical bold digits (NFKC)
    ],
)
def test_clean_maps_unicode_digits_and_dashes_to_ascii(raw: str, expected: str) -> None:
    assert clean(raw) == expected
    assert normalize(raw) == expected.replace("-", " ")  # dashes separate words there


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("nightingal\u0435", "nightingale"),  # Cyrillic е at the end of a Latin word
        ("\u0420assword", "password"),  # Cyrillic Р
        ("\u0399\u039a\u0395 \u039c\u0391\u03a4\u0397", "ike math"),  # Greek capitals
        ("kingfish\u0435r and \u0455ecret", "kingfisher and secret"),
        ("nightingalе in привет", "nightingale in пpиbet"),  # TR39 folds in every word
        ("ꜱᴇᴄʀᴇᴛ ʀᴇᴅ", "secret red"),  # small capitals (TR39, then by Unicode name)
        ("ѕесгеt", "secret"),  # Cyrillic dze, ie, es, ghe
        ("ꮪꭼꮯꭱꭼꭲ", "secret"),  # Cherokee small letters
        ("ѕесrеt 𝐬𝐞𝐜𝐫𝐞𝐭", "secret secret"),
        ("ԁɑtɑ", "data"),  # Cyrillic komi de, Latin alpha
    ],
)
def test_look_alike_letters_become_latin(raw: str, expected: str) -> None:
    assert normalize(raw) == expected


@pytest.mark.parametrize(
    "text",
    [
        "сор рос сесс",  # Cyrillic words that look like Latin ones: real Russian text
        "ορος",  # Greek
        "Ελληνικά κείμενα",
        "kız ılık",  # Turkish dotless ı
        "Москва привет",
    ],
)
def test_other_scripts_compare_without_case(text: str) -> None:
    # Folded to the same skeleton whatever the case, so keyword lists in these scripts work.
    assert normalize(text.upper()) == normalize(text) == normalize(text.lower())


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("\u202eterces\u202c", "secret"),  # right-to-left override, shown reversed
        ("top \u202elaitnedifnoc\u202c plan", "top confidential plan"),
        ("\u202ea\u202db c\u202cd\u202c", "db ca"),  # a nested left-to-right run stays whole
        ("\u202eterces", "secret"),  # an unclosed override ends with the text
        ("\u202eab\ncd", "ba cd"),  # ... or with the paragraph
        ("\u2067secret\u2069 \u202bplan\u202c", "secret plan"),  # isolates, embeddings
    ],
)
def test_overrides_are_read_in_display_order(raw: str, expected: str) -> None:
    assert normalize(raw) == expected


mixed_text = st.text(
    alphabet=st.sampled_from(list("abcxyzABCXYZ а е о р с у х і АВЕКМНОРСТХ αονρΑΒΕΗΙΚΝΟΡΤΧ-_٤"))
)


@given(mixed_text)
@settings(max_examples=300)
def test_look_alike_folding_is_idempotent(text: str) -> None:
    once = normalize(text)
    assert normalize(once) == once
    assert fold(clean(text)) == once


def test_clean_keeps_case() -> None:
    assert clean("ＡＫＩＡ\u200b  X") == "AKIA X"
    assert clean("4111\u200b1111") == "41111111"


@given(any_text)
@settings(max_examples=500)
def test_normalize_is_idempotent_and_total(text: str) -> None:
    once = normalize(text)
    assert normalize(once) == once
    assert once == once.strip()
    assert "  " not in once


@given(any_text)
@settings(max_examples=500)
def test_fold_of_clean_is_normalize(text: str) -> None:
    cleaned = clean(text)
    assert clean(cleaned) == cleaned
    assert fold(cleaned) == normalize(text)


@given(st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x7F)))
def test_ascii_fast_path_matches_definition(text: str) -> None:
    kept = "".join(c if c.isalnum() else " " for c in text if c.isprintable() or c.isspace())
    assert normalize(text) == " ".join(kept.split()).lower()


# --- html_to_text ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("markup", "expected"),
    [
        ("<b>sec</b>ret", "secret"),  # inline tags add no space
        ("<p>one</p><p>two</p>", "one two"),  # block tags do
        ("line<br>break<br/>here", "line break here"),
        ("<ul><li>a</li><li>b</li></ul>", "a b"),
        ("<code>AKIA</code> &amp; &lt;tag&gt; &#x41;", "akia tag a"),
        ("<mx-reply><blockquote>quoted secret</blockquote></mx-reply>reply", "quoted secret reply"),
        ('<a href="https://x.example/?t=tok">link</a>', "link https x example t tok"),
        ('<img alt="hidden text" src="mxc://a/b">', "hidden text"),
        ("<table><tr><td>a</td><td>b</td></tr></table>", "a b"),
        ("no markup &amp; entity", "no markup entity"),
        ("plain", "plain"),
    ],
)
def test_html_to_text(markup: str, expected: str) -> None:
    assert normalize(html_to_text(markup)) == expected


@pytest.mark.parametrize(
    "markup",
    ["<b>unclosed <i", "<<<>>>", "<!-- open comment", "<p attr='x", "</p></div>", "<script>x"],
)
def test_html_to_text_malformed(markup: str) -> None:
    assert isinstance(html_to_text(markup), str)


def test_html_to_text_keeps_text_of_unclosed_tags() -> None:
    assert "secret" in html_to_text("<b>secret")
    assert "secret" in html_to_text("<div><span>secret")


@given(any_text)
@settings(max_examples=300)
def test_html_to_text_never_raises(markup: str) -> None:
    assert isinstance(html_to_text(markup), str)


@given(st.lists(st.sampled_from(["<b>", "</b>", "<p>", "</p>", "<br>", "x", "&amp;", "<", ">"])))
def test_html_to_text_never_raises_on_tag_soup(parts: list[str]) -> None:
    assert isinstance(html_to_text("".join(parts)), str)


def test_html_to_text_non_string() -> None:
    assert html_to_text(None) == ""  # type: ignore[arg-type]


# --- properties of the skeleton --------------------------------------------------------------

# NFKD of U+FDFA (ARABIC LIGATURE SALLALLAHOU ALAYHE WASALLAM) is 18 characters, the most any
# character becomes; nothing in the skeleton grows text further.
MAX_EXPANSION = 18


@given(any_text)
@settings(max_examples=500)
def test_the_skeleton_is_bounded_and_idempotent(text: str) -> None:
    for skeleton in (normalize(text), fold_literal(clean(text))):
        assert len(skeleton) <= MAX_EXPANSION * len(text)
    literal = fold_literal(clean(text))
    assert fold_literal(literal) == literal


def test_the_largest_expansion_of_one_character() -> None:
    assert len(normalize("\ufdfa")) == MAX_EXPANSION


bidi_text = st.text(
    alphabet=st.sampled_from(list("ab \n\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"))
)


@given(bidi_text)
@settings(max_examples=500)
def test_display_order_copies_each_character_a_bounded_number_of_times(text: str) -> None:
    # Linear: every character is copied at most once per nesting level, and nesting is capped.
    copied = 0
    close = bidi._close

    def counting_close(kind: str, parts: list[str]) -> str:
        nonlocal copied
        out = close(kind, parts)
        copied += len(out)
        return out

    bidi._close = counting_close  # type: ignore[assignment]
    try:
        shown = bidi.display_order(text)
    finally:
        bidi._close = close  # type: ignore[assignment]
    assert copied <= (bidi.MAX_DEPTH + 2) * len(text)
    # The same characters, reordered (the controls are dropped later, by clean()).
    visible = [ch for ch in shown if ch not in bidi.BIDI_CONTROLS]
    assert sorted(visible) == sorted(ch for ch in text if ch not in bidi.BIDI_CONTROLS)


def test_deep_nesting_is_capped() -> None:
    text = "\u202e\u202d" * 1000 + "ab"
    assert bidi.display_order(text) == "ab"
