"""Text normalization for DLP matching (pure, no I/O, fast).

Two levels are exposed:

* :func:`clean` -- the *case-preserving* canonical form: invisible / format characters
  removed, every Unicode decimal digit mapped to its ASCII digit (Arabic-Indic ``٤١١١``,
  Devanagari, Bengali, ... -- NFKC leaves those alone), every Unicode dash and minus sign
  (en/em dash, non-breaking hyphen, the minus sign U+2212, ...) mapped to ``-``, Unicode
  NFKC (full-width letters and digits become ASCII, ligatures are split), combining marks
  stacked on ASCII characters removed (``s̶e̶c̶r̶e̶t̶`` -> ``secret``), and every whitespace
  run collapsed to one space. Detectors and regex rules run on this.
* :func:`normalize` -- :func:`clean` followed by case folding (and NFKC again, since case
  folding can denormalize), and Cyrillic/Greek look-alike letters inside *mixed-script* words
  mapped to Latin (``nightingale`` spelt with a Cyrillic U+0435 for its last ``e``). Keyword
  lists run on this. ``normalize(t) == fold(clean(t))``.

Both take a fast path for pure-ASCII text (the common case in chat), which costs about as much
as ``" ".join(text.lower().split())``.

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

__all__ = ["clean", "fold", "html_to_text", "normalize"]

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


def _re2(pattern: str) -> re2._Regexp:
    options = re2.Options()
    options.log_errors = False
    return re2.compile(pattern, options)


_TRANSLATE, _ASCII_CTRL, _MARKS = _build_tables()
_HAS_ASCII_CTRL = re.compile(r"[\x00-\x08\x0e-\x1b\x7f]")
# RE2 scans a character class in a DFA; Python re is ~20x slower on large classes here.
_HAS_TRANSLATED = _re2(
    "[" + _ranges(sorted(cp for cp in _TRANSLATE if not 0xD800 <= cp <= 0xDFFF)) + "]"
)
# Combining marks stacked on an ASCII character ("Zalgo", strike-through, underline tricks).
_MARKS_ON_ASCII = _re2("([\\x00-\\x7f])[" + _ranges(_MARKS) + "]+")


def _translate(text: str) -> str:
    """Drop invisibles; map non-ASCII decimal digits and dashes to ASCII."""
    try:
        if _HAS_TRANSLATED.search(text) is None:
            return text
    except UnicodeEncodeError:  # lone surrogates cannot be UTF-8 encoded for RE2
        pass
    return text.translate(_TRANSLATE)


# Cyrillic and Greek letters that look like Latin ones. Only used inside words that mix
# Latin with Cyrillic or Greek letters: real Russian, Ukrainian, Greek ... words never contain
# Latin letters, so their text is left alone, and a keyword list in those scripts still
# matches (keywords are normalized the same way).
_LOOKALIKE_PAIRS = (
    # Cyrillic
    "\u0410A \u0430a \u0412B \u0432b \u0415E \u0435e \u0405S \u0455s \u0406I \u0456i "
    "\u0408J \u0458j \u041aK \u043ak \u041cM \u043cm \u041dH \u043dh \u041eO \u043eo "
    "\u0420P \u0440p \u0421C \u0441c \u0422T \u0442t \u0423Y \u0443y \u0425X \u0445x "
    "\u04bah \u04bbh \u0501d \u051aQ \u051bq \u051cW \u051dw \u04c0l \u04cfl \u04aeY "
    "\u04afy "
    # Greek
    "\u0391A \u03b1a \u0392B \u03b2b \u0395E \u03b5e \u0396Z \u03b6z \u0397H \u03b7n "
    "\u0399I \u03b9i \u039aK \u03bak \u039cM \u03bcu \u039dN \u03bdv \u039fO \u03bfo "
    "\u03a1P \u03c1p \u03a4T \u03c4t \u03a5Y \u03c5u \u03a7X \u03c7x"
)


def _lookalike_table() -> dict[int, int]:
    table = {ord(pair[0]): ord(pair[1]) for pair in _LOOKALIKE_PAIRS.split()}
    # Closed under case folding, so that fold() stays idempotent: a letter whose folded form
    # is mapped is mapped too (to the same letter, case aside).
    for cp in list(range(0x370, 0x400)) + list(range(0x400, 0x530)):
        folded = chr(cp).casefold()
        if cp not in table and len(folded) == 1 and ord(folded) in table:
            table[cp] = table[ord(folded)]
    return table


_LOOKALIKES = _lookalike_table()
# A Latin letter next to a Cyrillic or Greek one: the only texts that need a closer look.
_MIXED_PAIR = _re2(r"\p{Latin}[\p{Cyrillic}\p{Greek}]|[\p{Cyrillic}\p{Greek}]\p{Latin}")
_WORD_LETTERS = _re2(r"[\p{Latin}\p{Cyrillic}\p{Greek}]+")


def _unmix_lookalikes(text: str) -> str:
    """Map Cyrillic/Greek look-alikes to Latin inside words that mix the scripts."""
    try:
        if _MIXED_PAIR.search(text) is None:
            return text
    except UnicodeEncodeError:
        return text
    parts: list[str] = []
    pos = 0
    for m in _WORD_LETTERS.finditer(text):
        word = m.group()
        if _MIXED_PAIR.search(word) is not None:
            parts.append(text[pos : m.start()])
            parts.append(word.translate(_LOOKALIKES))
            pos = m.end()
    parts.append(text[pos:])
    return "".join(parts)


def _drop_marks_on_ascii(text: str) -> str:
    if text.isascii() or _MARKS_ON_ASCII.search(text) is None:
        return text
    return str(_MARKS_ON_ASCII.sub(r"\1", text))


def clean(text: str) -> str:
    """Case-preserving canonical form: no invisibles, NFKC, single spaces, stripped.

    Combining marks that sit on an ASCII character are dropped too (after NFKC, so
    precomposed letters such as ``é`` are unaffected).
    """
    if text.isascii():
        if _HAS_ASCII_CTRL.search(text) is not None:
            text = text.translate(_ASCII_CTRL)
        return " ".join(text.split())
    text = _drop_marks_on_ascii(unicodedata.normalize("NFKC", _translate(text)))
    return " ".join(text.split())


def fold(cleaned: str) -> str:
    """Case-fold a :func:`clean` result; ``fold(clean(t)) == normalize(t)``."""
    if cleaned.isascii():
        return cleaned.lower()
    text = _unmix_lookalikes(cleaned)
    text = _drop_marks_on_ascii(unicodedata.normalize("NFKC", text.casefold()))
    return " ".join(text.split())


def normalize(text: str) -> str:
    """Normalize text for keyword matching.

    Unicode NFKC, case folding, invisible/format characters removed (category Cf, soft
    hyphen, zero-width characters, variation selectors, combining grapheme joiner, hangul
    fillers, control characters, lone surrogates), combining marks on ASCII characters
    removed, whitespace runs collapsed to a single space, leading/trailing space stripped.
    Idempotent and never raises on any ``str``.
    """
    if text.isascii():
        if _HAS_ASCII_CTRL.search(text) is not None:
            text = text.translate(_ASCII_CTRL)
        return " ".join(text.lower().split())
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
# Attributes whose values are human-readable or can carry data the body does not show.
_TEXT_ATTRS = frozenset({"href", "alt", "title"})


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


_TAG = re.compile(r"<[^>]*>?")


def html_to_text(markup: str) -> str:
    """Reduce Matrix ``formatted_body`` HTML to plain text. Never raises.

    Tags are dropped and the text of every element is kept (including ``<code>``, ``<a>``
    and ``<mx-reply>``); entities are unescaped; block elements and ``<br>`` become
    whitespace, inline elements do not (``<b>sec</b>ret`` -> ``secret``); the result is
    stripped. Values of
    ``href``/``alt``/``title`` attributes are appended after the text. Malformed markup is
    handled leniently; if the parser fails, tags are stripped with a simple pattern.
    """
    if not isinstance(markup, str):
        return ""
    if "<" not in markup:
        return html.unescape(markup) if "&" in markup else markup
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
