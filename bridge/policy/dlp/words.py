"""What counts as a word character for whole-word keyword matching."""

from __future__ import annotations

import unicodedata

__all__ = ["is_word"]

# ``_`` is not a word character: ``_nightingale_`` is Markdown emphasis, shown as the word, and
# a codename inside an identifier (``falcon_prod_db``) is still the codename.
_ASCII_WORD = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
# Scripts written without spaces between words: their letters never form a word boundary.
_NO_SPACE_SCRIPTS = (
    (0x0E00, 0x0EFF),  # Thai, Lao
    (0x1000, 0x109F),  # Myanmar
    (0x1780, 0x17FF),  # Khmer
    (0x3040, 0x30FF),  # Hiragana, Katakana
    (0x3400, 0x4DBF),  # CJK extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0xFF66, 0xFF9F),  # half-width Katakana
    (0x20000, 0x3FFFF),  # CJK extensions B..
)


def is_word(ch: str) -> bool:
    """Whether ``ch`` continues a word (letters, digits, combining marks; not ``_``)."""
    if ch < "\x80":
        return ch in _ASCII_WORD
    cp = ord(ch)
    for lo, hi in _NO_SPACE_SCRIPTS:
        if lo <= cp <= hi:
            return False
    if ch.isalnum():
        return True
    return unicodedata.category(ch)[0] == "M"
