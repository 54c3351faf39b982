"""Text normalization for DLP matching (pure, no I/O, linear in the text).

Two levels are exposed:

* :func:`clean` -- the *case-preserving* canonical form: right-to-left override runs read in
  display order (:mod:`bridge.policy.bidi`), invisible / format characters removed, every
  Unicode decimal digit mapped to its ASCII digit (Arabic-Indic ``٤١١١``, Devanagari, ... --
  NFKC leaves those alone), every Unicode dash and minus sign mapped to ``-``, Unicode NFKC
  (full-width letters and digits become ASCII, ligatures are split), combining marks
  removed, written combining or precomposed (``s̶e̶c̶r̶e̶t̶`` -> ``secret``), and every
  whitespace run collapsed to one space. Detectors and regex rules run on this.
* :func:`fold` / :func:`normalize` -- the *skeleton* keyword lists are compared on:
  :func:`clean`, then NFKD and case folding, every combining mark removed, look-alike letters
  folded to ASCII with Unicode's TR39 confusables data (:mod:`bridge.policy.confusables`),
  and every run of punctuation, symbols and whitespace made one space, so that phrase words
  joined by ``.``, ``_`` or ``/`` still match. Text written in Cyrillic or Greek keeps its
  letters (see :func:`fold`). :func:`fold_literal` keeps punctuation, for keywords such as
  ``c++``. ``normalize(t) == fold(clean(t))``.

Both take a fast path for pure-ASCII text (the common case in chat), on bytes.

:func:`html_to_text` reduces a Matrix ``formatted_body`` to text: inline tags add nothing (so
``<b>sec</b>ret`` reads ``secret``), block tags and ``<br>`` become whitespace. The text inside
``<mx-reply>`` is kept: a reply fallback is delivered to every recipient and shown by clients
without rich replies, so a secret hidden there still leaks. Link targets and image ``alt`` /
``title`` texts are appended, because a client can put text there that the body lacks.
"""

from __future__ import annotations

import html
import re
import unicodedata
from html.parser import HTMLParser

import re2

from bridge.policy.bidi import display_order
from bridge.policy.confusables import ascii_lookalikes

__all__ = [
    "clean",
    "clean_ascii",
    "fold",
    "fold_ascii",
    "fold_literal",
    "html_to_text",
    "keyword_forms",
    "normalize",
]

# Characters that are invisible or that only steer rendering, beyond category Cf.
_EXTRA_INVISIBLE: tuple[tuple[int, int], ...] = (
    (0x034F, 0x034F),  # combining grapheme joiner
    (0x115F, 0x1160),  # hangul choseong / jungseong fillers
    (0x17B4, 0x17B5),  # khmer inherent vowels
    (0x180B, 0x180F),  # mongolian free variation selectors (+ vowel separator)
    (0x3164, 0x3164),  # hangul filler
    (0xFE00, 0xFE0F),  # variation selectors
    (0xFFA0, 0xFFA0),  # halfwidth hangul filler
    (0xD800, 0xDFFF),  # lone surrogates (category Cs)
    (0xE0100, 0xE01EF),  # variation selectors supplement
)
# Blank-looking symbols that read as a space.
_BLANKS = (0x2800,)  # braille pattern blank
_SKELETON_SIZE = 0x20000
# Dash-like characters outside category Pd that people type between digit groups.
_EXTRA_DASHES = (0x02D7, 0x2043, 0x2212, 0x2796)  # modifier minus, hyphen bullet, minus signs


def _ranges(codepoints: list[int]) -> str:
    """Render sorted code points as an RE2 character-class body (``\\x{..}-\\x{..}``)."""
    spans: list[list[int]] = []
    for cp in codepoints:
        if spans and spans[-1][1] == cp - 1:
            spans[-1][1] = cp
        else:
            spans.append([cp, cp])
    return "".join(
        f"\\x{{{lo:x}}}" if lo == hi else f"\\x{{{lo:x}}}-\\x{{{hi:x}}}" for lo, hi in spans
    )


def _build_tables() -> tuple[dict[int, int | None], dict[int, None], list[int]]:
    """Build the translate tables and the list of combining marks once, at import (~25 ms).

    The first table drops invisibles and maps non-ASCII decimal digits and dashes to ASCII;
    it is applied before NFKC, which maps none of its outputs back to a non-ASCII digit or dash.
    """
    table: dict[int, int | None] = {}
    ascii_ctrl: dict[int, None] = {}
    marks: list[int] = []
    whitespace = {c for c in range(0x100) if chr(c).isspace()}
    for block in (range(0x0000, 0x20000), range(0xE0000, 0xE1000)):
        for cp in block:
            ch = chr(cp)
            cat = unicodedata.category(ch)
            if cat == "Cf" or (cat == "Cc" and cp not in whitespace):
                table[cp] = None
                if cp < 0x80:
                    ascii_ctrl[cp] = None
            elif cat == "Mn":
                marks.append(cp)
            elif cp >= 0x80 and cat == "Nd":
                table[cp] = 0x30 + unicodedata.decimal(ch)
            elif cp >= 0x80 and cat == "Pd":
                table[cp] = 0x2D
    for lo, hi in _EXTRA_INVISIBLE:
        for cp in range(lo, hi + 1):
            table[cp] = None
    for cp in _BLANKS:
        table[cp] = 0x20
    for cp in _EXTRA_DASHES:
        table[cp] = 0x2D
    return table, ascii_ctrl, marks


def _skeleton_tables(
    translate: dict[int, int | None], *, keep_punctuation: bool
) -> tuple[list[int | str | None], bytes]:
    """The :func:`fold` tables: a list indexed by code point (below U+20000), and ASCII bytes.

    A list rather than a dict: ``str.translate`` pays for an exception on every character a
    dict lacks, which made CJK text several times slower. Characters above the list (CJK
    extensions, tags) are left as they are; :func:`clean` has already removed the invisibles.
    """
    lookalikes = ascii_lookalikes()
    table: list[int | str | None] = list(range(_SKELETON_SIZE))
    for cp in range(_SKELETON_SIZE):
        ch = chr(cp)
        cat = unicodedata.category(ch)
        if cp in translate:  # invisibles dropped, digits to ASCII, dashes separate words
            dash = translate[cp] == 0x2D and not keep_punctuation
            table[cp] = 0x20 if dash else translate[cp]
        elif cat in ("Mn", "Me", "Cf", "Cs", "Cc") and not ch.isspace():
            table[cp] = None
        elif ch.isspace() or cat[0] == "Z":
            table[cp] = 0x20
        elif cat[0] in "PS":
            table[cp] = cp if keep_punctuation else 0x20
        elif cp in lookalikes:
            table[cp] = lookalikes[cp]
        elif cp < 0x80:
            table[cp] = ord(ch.lower())
    ascii_table = bytes(t if isinstance(t, int) else 0x20 for t in table[:0x80])
    ascii_table += bytes(range(0x80, 0x100))
    return table, ascii_table


def _re2(pattern: str) -> re2._Regexp:
    options = re2.Options()
    options.log_errors = False
    return re2.compile(pattern, options)


_TRANSLATE, _ASCII_CTRL, _MARKS = _build_tables()
_SKELETON, _ASCII_SKELETON = _skeleton_tables(_TRANSLATE, keep_punctuation=False)
_LITERAL, _ASCII_LITERAL = _skeleton_tables(_TRANSLATE, keep_punctuation=True)

# Text genuinely written in Cyrillic or Greek (it has letters of those scripts that look like
# no Latin letter: Cyrillic be, de, zhe, Greek lambda, psi ...) keeps its own letters, so that
# a real word which happens to look like a keyword (the Russian word for litter, spelt with
# Cyrillic es, o, er, and the English "cop") is not taken for it. Look-alikes are still folded
# when a word of such text mixes the scripts (a Latin word with one Cyrillic letter), and in
# all text without such letters.
_NATIVE_RANGES = ((0x370, 0x400), (0x400, 0x530), (0x1F00, 0x2000))


def _native_tables() -> tuple[list[int | str | None], list[int | str | None], re2._Regexp]:
    skeleton, literal = list(_SKELETON), list(_LITERAL)
    genuine: list[int] = []
    for lo, hi in _NATIVE_RANGES:
        for cp in range(lo, hi):
            if not chr(cp).isalpha():
                continue
            if isinstance(_SKELETON[cp], str):  # a look-alike: kept as it is in native text
                skeleton[cp] = literal[cp] = cp
            elif _SKELETON[cp] == cp and chr(cp).casefold() == chr(cp):
                genuine.append(cp)
    return skeleton, literal, _re2("[" + _ranges(genuine) + "]")


_NATIVE_SKELETON, _NATIVE_LITERAL, _GENUINE_LETTER = _native_tables()
_MIXED_PAIR = _re2(r"\p{Latin}[\p{Cyrillic}\p{Greek}]|[\p{Cyrillic}\p{Greek}]\p{Latin}")
_HAS_ASCII_CTRL = re.compile(r"[\x00-\x08\x0e-\x1b\x7f]")
# RE2 scans a character class in a DFA; Python re is ~20x slower on large classes here.
_HAS_TRANSLATED = _re2(
    "[" + _ranges(sorted(cp for cp in _TRANSLATE if not 0xD800 <= cp <= 0xDFFF)) + "]"
)
# Every nonspacing mark (Mn: accents, "Zalgo", strike-through) deleted, every other character
# kept; a list for the same reason as the skeleton's table. Above it no character is a mark.
_MARKLESS: list[int | None] = list(range(_SKELETON_SIZE))
for _cp in _MARKS:
    if _cp < _SKELETON_SIZE:
        _MARKLESS[_cp] = None


def _translate(text: str) -> str:
    """Drop invisibles; map non-ASCII decimal digits and dashes to ASCII."""
    try:
        if _HAS_TRANSLATED.search(text) is None:
            return text
    except UnicodeEncodeError:  # lone surrogates cannot be UTF-8 encoded for RE2
        pass
    return text.translate(_TRANSLATE)


_ASCII_SPACES = bytes.maketrans(b"\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f", b" " * 9)
_ASCII_CONTROLS = bytes(range(0x00, 0x09)) + bytes(range(0x0E, 0x1C)) + b"\x7f"


def _collapse(data: bytes) -> bytes:
    # bytes.replace costs a third of split() and join() on chat messages (few long runs).
    while b"  " in data:
        data = data.replace(b"  ", b" ")
    return data.strip(b" ")


def clean_ascii(text: str) -> bytes:
    """:func:`clean` of ASCII ``text``, as ASCII bytes (what the detectors read)."""
    return _collapse(text.encode("ascii").translate(_ASCII_SPACES, _ASCII_CONTROLS))


def fold_ascii(cleaned: bytes) -> str:
    """:func:`fold` of the ASCII bytes :func:`clean_ascii` returns."""
    return _collapse(cleaned.translate(_ASCII_SKELETON)).decode("ascii")


def clean(text: str) -> str:
    """Case-preserving canonical form: no invisibles, NFKC, single spaces, stripped.

    Combining marks are dropped too, combining or precomposed (``é`` and ``e`` + U+0301
    become ``e``), so that accents cannot hide a key or an IBAN from the detectors. Regex
    rules also read the original text, so a pattern with accents still matches.
    """
    if text.isascii():
        return clean_ascii(text).decode("ascii")
    # NFKD, every combining mark dropped, composed again (NFKD + NFC is NFKC): an accent,
    # precomposed (``Ẃ``) or combining, cannot hide a key or an IBAN from the detectors.
    text = unicodedata.normalize("NFKD", _translate(display_order(text)))
    text = unicodedata.normalize("NFC", text.translate(_MARKLESS))
    return " ".join(text.split())


def _search(pattern: re2._Regexp, text: str) -> bool:
    try:
        return pattern.search(text) is not None
    except UnicodeEncodeError:  # lone surrogates cannot be UTF-8 encoded for RE2
        return False


def _skeleton(
    cleaned: str,
    table: list[int | str | None],
    ascii_table: bytes,
    native: list[int | str | None] | None,
) -> str:
    if cleaned.isascii():
        return _collapse(cleaned.encode("ascii").translate(ascii_table)).decode("ascii")
    text = unicodedata.normalize("NFKD", unicodedata.normalize("NFKD", cleaned).casefold())
    if native is not None and _search(_GENUINE_LETTER, text):
        kept = text.translate(native)
        if not _search(_MIXED_PAIR, kept):
            return " ".join(kept.split())
    return " ".join(text.translate(table).split())


def fold(cleaned: str) -> str:
    """The skeleton of a :func:`clean` result; ``fold(clean(t)) == normalize(t)``.

    Compatibility decomposition and case folding, combining marks removed, TR39 look-alikes
    and other Latin letter variants folded to ASCII (:mod:`bridge.policy.confusables`), and
    every run of punctuation, symbols and whitespace turned into one space. In text written
    in Cyrillic or Greek (with letters of those scripts that look like no Latin letter) whose
    words do not mix scripts, the letters of those scripts are kept.
    """
    return _skeleton(cleaned, _SKELETON, _ASCII_SKELETON, _NATIVE_SKELETON)


def fold_literal(cleaned: str) -> str:
    """:func:`fold` with punctuation and symbols kept (only whitespace runs collapse).

    For keywords whose punctuation is part of the word (``c++``, ``.env``).
    """
    return _skeleton(cleaned, _LITERAL, _ASCII_LITERAL, _NATIVE_LITERAL)


def keyword_forms(keyword: str) -> tuple[str, ...]:
    """The skeletons a keyword is looked for as: :func:`normalize`, and the form it has in
    Cyrillic or Greek text (its letters of those scripts kept), when that differs."""
    cleaned = clean(keyword)
    text = unicodedata.normalize("NFKD", unicodedata.normalize("NFKD", cleaned).casefold())
    full = fold(cleaned)
    native = " ".join(text.translate(_NATIVE_SKELETON).split())
    return (full,) if native == full or not native else (full, native)


def normalize(text: str) -> str:
    """The skeleton that keyword lists are compared on.

    :func:`clean` (invisible and format characters removed, right-to-left overrides read in
    display order, decimal digits and dashes to ASCII, NFKC), then :func:`fold`: NFKD, case
    folding, combining marks removed, TR39 confusables and Latin letter variants folded to
    ASCII, punctuation, symbols and whitespace runs collapsed to a single space, stripped.
    Idempotent and never raises on any ``str``.
    """
    if text.isascii():
        if _HAS_ASCII_CTRL.search(text) is not None:
            text = text.translate(_ASCII_CTRL)
        return fold(text)
    return fold(clean(text))


# --- HTML ---------------------------------------------------------------------------------

# Elements whose boundaries separate words. Everything else is inline and adds nothing.
_BLOCK_TAGS = frozenset(
    {
        "address", "article", "aside", "blockquote", "body", "br", "caption", "dd", "details",
        "div", "dl", "dt", "figcaption", "figure", "footer", "h1", "h2", "h3", "h4", "h5", "h6",
        "head", "header", "hr", "html", "img", "li", "main", "mx-reply", "nav", "ol", "p",
        "pre", "section", "summary", "table", "tbody", "td", "tfoot", "th", "thead", "title",
        "tr", "ul", "video", "audio", "iframe", "object",
    }
)  # fmt: skip
# Attributes whose values are human-readable or can carry data the body does not show:
# Element shows a spoiler's reason beside it and renders the source of maths.
_TEXT_ATTRS = frozenset({"href", "alt", "title", "data-mx-spoiler", "data-mx-maths"})


class _TextExtractor(HTMLParser):
    """Collects character data; block boundaries become spaces."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.attrs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _BLOCK_TAGS:
            self.parts.append(" ")
        for name, value in attrs:
            if name in _TEXT_ATTRS and value:
                self.attrs.append(value)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        if tag in _BLOCK_TAGS:
            self.parts.append(" ")

    def handle_data(self, data: str) -> None:
        self.parts.append(data)

    def handle_comment(self, data: str) -> None:
        # Shown by no client, read by any script: data hidden like an unknown content key.
        if data.strip():
            self.attrs.append(data)


_TAG = re.compile(r"<[^>]*>?")
#: Markup longer than this is reduced by regular expressions (linear, in C) instead of the
#: stdlib parser, which costs about a microsecond per tag in Python.
FAST_HTML_CHARS = 4096
_BLOCK_TAG = re.compile(
    r"</?(?:" + "|".join(sorted(_BLOCK_TAGS, key=len, reverse=True)) + r")(?![\w-])[^>]*>?",
    re.IGNORECASE,
)
_TEXT_ATTR = re.compile(
    r"""(?<![\w-])(?:href|alt|title|data-mx-spoiler|data-mx-maths)\s*=\s*"""
    r"""(?:"([^"]*)"|'([^']*)'|([^\s"'>]+))""",
    re.IGNORECASE,
)
_COMMENT = re.compile(r"<!--(.*?)-->", re.DOTALL)


def _fast_html_to_text(markup: str) -> str:
    """:func:`html_to_text` for long markup: the same rules, applied by regular expressions."""
    attrs = [
        "".join(groups)
        for groups in _TEXT_ATTR.findall(" ".join(_TAG.findall(markup)))
        if "".join(groups)
    ]
    if "<!--" in markup:
        attrs += [c for c in _COMMENT.findall(markup) if c.strip()]
        markup = _COMMENT.sub("", markup)
    text = _TAG.sub("", _BLOCK_TAG.sub(" ", markup))
    if attrs:
        text = text + " " + " ".join(attrs)
    return html.unescape(text).strip()


def html_to_text(markup: str) -> str:
    """Reduce Matrix ``formatted_body`` HTML to plain text. Never raises.

    Tags are dropped and the text of every element is kept (including ``<code>``, ``<a>``
    and ``<mx-reply>``); entities are unescaped; block elements and ``<br>`` become
    whitespace, inline elements do not (``<b>sec</b>ret`` -> ``secret``); the result is
    stripped. Values of
    ``href``/``alt``/``title``/``data-mx-spoiler``/``data-mx-maths`` attributes and the text
    of comments are appended after the text. Malformed markup is
    handled leniently; if the parser fails, tags are stripped with a simple pattern.
    """
    if not isinstance(markup, str):
        return ""
    if "<" not in markup:
        return html.unescape(markup) if "&" in markup else markup
    if len(markup) > FAST_HTML_CHARS:
        return _fast_html_to_text(markup)
    parser = _TextExtractor()
    try:
        parser.feed(markup)
        parser.close()
    except Exception:  # the stdlib parser is lenient, but never let markup break the gate
        return html.unescape(_TAG.sub(" ", markup))
    text = "".join(parser.parts)
    if parser.attrs:
        text = text + " " + " ".join(parser.attrs)
    return text.strip()
