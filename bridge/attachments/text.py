"""Plain text: decode with a charset that is sane.

A BOM wins; then strict UTF-8 (most files today); then, for samples long enough to tell
(:data:`GUESS_MIN_BYTES`), ``charset_normalizer`` on a bounded sample; otherwise Windows-1252
(the most common 8-bit charset; short texts are where detectors guess wildly), and Latin-1
when even that fails (every byte decodes). ASCII digits and letters stay themselves in all of
them, so a card number is found whatever the guess.
"""

from __future__ import annotations

import codecs

from charset_normalizer import from_bytes

from bridge.attachments.limits import TextBudget

_SAMPLE = 64 * 1024
#: Shorter non-UTF-8 texts are not handed to the detector (its guesses on a few words are
#: often exotic code pages).
GUESS_MIN_BYTES = 1024
_BOMS = (
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


def charset(data: bytes) -> str:
    """The encoding to decode ``data`` with."""
    for bom, name in _BOMS:
        if data.startswith(bom):
            return name
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    else:
        return "utf-8"
    if len(data) >= GUESS_MIN_BYTES:
        best = from_bytes(data[:_SAMPLE]).best()
        if best is not None:
            return str(best.encoding)
    try:
        data[:_SAMPLE].decode("cp1252")
    except UnicodeDecodeError:
        return "latin-1"
    return "cp1252"


def decode(data: bytes) -> str:
    """``data`` as text (undecodable bytes replaced)."""
    return data.decode(charset(data), "replace")


def extract_text(data: bytes, out: TextBudget) -> None:
    """Add the text of a plain-text file to ``out`` (the charset judged on all of it, only
    as many bytes decoded as the budget can take)."""
    out.add(data[: out.left * 4 + 4].decode(charset(data), "replace"))
