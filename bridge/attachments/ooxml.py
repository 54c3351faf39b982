"""Word, Excel and PowerPoint files (Office Open XML): their XML parts read directly.

Why not python-docx, openpyxl and python-pptx: they inflate the package's members with
``zipfile`` on their own (declared sizes trusted, no ratio or total bound), parse with lxml
or their own readers (entity handling differs between them), and build whole object models
(openpyxl: styles, every cell) that cost far more time and memory than the text. Reading the
parts that hold text through :mod:`bridge.attachments.archive` (every inflated byte
counted) and :mod:`bridge.attachments.xmltext` (defusedxml) gives one bounded path for all
three formats. The libraries build the test files.

What is read: Word body, headers, footers, footnotes, endnotes, comments (deleted tracked
changes and field codes too); Excel shared strings, inline strings and cell values of every
sheet, and comments; PowerPoint slides, notes and comments.
"""

from __future__ import annotations

import re

from bridge.attachments import archive
from bridge.attachments.archive import InflateBudget
from bridge.attachments.kinds import FileType
from bridge.attachments.limits import Limits, TextBudget
from bridge.attachments.xmltext import xml_text

_PARTS = {
    FileType.DOCX: re.compile(
        r"word/(document|header\d*|footer\d*|footnotes|endnotes|comments)\.xml"
    ),
    FileType.XLSX: re.compile(r"xl/(sharedStrings|worksheets/sheet\d+|comments\d*)\.xml"),
    FileType.PPTX: re.compile(
        r"ppt/(slides/slide\d+|notesSlides/notesSlide\d+|comments/comment\d+)\.xml"
    ),
}
# Paragraphs (w:p, a:p), shared strings (si), cells (c), comments' text.
_BREAKS = {
    FileType.DOCX: frozenset({"p"}),
    FileType.XLSX: frozenset({"si", "c", "text"}),
    FileType.PPTX: frozenset({"p"}),
}


def extract_ooxml(
    kind: FileType, data: bytes, out: TextBudget, limits: Limits, budget: InflateBudget
) -> None:
    """Add the text of an OOXML package (``kind``: DOCX, XLSX or PPTX) to ``out``."""
    wanted = _PARTS[kind]
    for _name, body in archive.members(data, limits, budget, only=wanted):
        xml_text(body, out, _BREAKS[kind])
        if out.full:
            return
