"""Look-alike characters folded to ASCII, from Unicode's TR39 confusables data (pure).

The data is the ``confusables.json`` that the maintained ``confusable-homoglyphs`` package
generates from Unicode's ``confusables.txt`` (UTS #39) and ships with its wheel, read once at
import from the installed package (no network). Each of its entries links a character with one
it can be confused with, in both directions; a non-ASCII letter or digit linked to an ASCII
letter or digit string (Cyrillic a U+0430, Latin alpha U+0251, Armenian oh U+0585, Cherokee
go U+13AA, dotless i U+0131, small capital s U+A731 ...) folds to that string, lower-cased.

Latin letters that TR39 leaves out because they differ in size or by a stroke are folded by
their Unicode *name*, not by a hand-written list: ``LATIN LETTER SMALL CAPITAL R`` (U+0280)
and ``LATIN SMALL LETTER O WITH STROKE`` (U+00F8) fold to ``r`` and ``o``.

ASCII characters are never folded (``0``/``O`` and ``1``/``l`` stay apart, as do ``rn``/``m``):
keywords are written in ASCII and folding them would make ordinary words collide.
"""

from __future__ import annotations

import json
import re
import unicodedata
from importlib import resources

__all__ = ["DATA_PACKAGE", "ascii_lookalikes"]

DATA_PACKAGE = "confusable_homoglyphs"
_DATA_FILE = "confusables.json"
_LATIN_NAME = re.compile(
    r"LATIN (?:SMALL |CAPITAL )?LETTER (?:SMALL CAPITAL |SMALL )?([A-Z])(?: WITH .+)?"
)
_FOLDABLE = ("L", "N")  # letters and numbers fold; marks are removed, symbols separate words


def _ascii_target(value: str) -> str | None:
    """``value`` as a lower-case ASCII letter/digit string, if it is one (LRM marks dropped)."""
    value = "".join(ch for ch in value if unicodedata.category(ch) != "Cf")
    value = unicodedata.normalize("NFKD", value).casefold()
    if value and value.isascii() and value.isalnum():
        return value
    return None


def _load_links() -> dict[str, list[str]]:
    raw = resources.files(DATA_PACKAGE).joinpath(_DATA_FILE).read_text(encoding="utf-8")
    data = json.loads(raw)
    links: dict[str, list[str]] = {}
    for key, entries in data.items():
        if isinstance(key, str) and isinstance(entries, list):
            links[key] = [e["c"] for e in entries if isinstance(e, dict) and "c" in e]
    return links


def ascii_lookalikes() -> dict[int, str]:
    """Code point -> ASCII lower-case fold for every non-ASCII letter or digit that has one.

    Built once at import by :mod:`bridge.policy.normalize` (about 50 ms).
    """
    out: dict[int, str] = {}
    for key, neighbours in _load_links().items():
        if len(key) != 1 or key.isascii() or unicodedata.category(key)[0] not in _FOLDABLE:
            continue
        targets = {t for t in map(_ascii_target, neighbours) if t is not None}
        if targets:
            # One prototype per character in TR39; when several ASCII strings are linked,
            # prefer a single letter, then the shortest, then the first in order.
            target = min(targets, key=lambda t: (not t.isalpha(), len(t), t))
            # TR39's prototype of ``I`` is ``l``; once case is folded a capital I-alike
            # (Greek iota U+0399, Cyrillic palochka U+04C0) must read as ASCII ``I`` does.
            out[ord(key)] = "i" if target == "l" and key.isupper() else target
    # Text is case-folded before it is looked up, so a small letter without a look-alike of
    # its own takes its capital's (Cyrillic ka U+043A folds as U+041A does, to ``k``): the
    # skeleton of a word is then the same in any case.
    for cp in range(0x80, 0x20000):
        ch = chr(cp)
        upper = ch.upper()
        if cp not in out and len(upper) == 1 and ord(upper) in out and upper.casefold() == ch:
            out[cp] = out[ord(upper)]
    for cp in range(0x80, 0x20000):
        if cp in out:
            continue
        ch = chr(cp)
        if unicodedata.category(ch)[0] != "L":
            continue
        m = _LATIN_NAME.fullmatch(unicodedata.name(ch, ""))
        if m is not None:
            out[cp] = m.group(1).lower()
    return out
