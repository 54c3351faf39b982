"""OpenDocument text, spreadsheets and presentations: ``content.xml`` (and ``styles.xml``,
which holds headers and footers), read through the bounded archive reader and defusedxml."""

from __future__ import annotations

import re

from bridge.attachments import archive
from bridge.attachments.archive import InflateBudget
from bridge.attachments.limits import Limits, TextBudget
from bridge.attachments.xmltext import xml_text

_PARTS = re.compile(r"(content|styles)\.xml")
# text:p and text:h are the paragraphs of all three kinds (cells and slides hold them).
_BREAKS = frozenset({"p", "h"})


def extract_odf(data: bytes, out: TextBudget, limits: Limits, budget: InflateBudget) -> None:
    """Add the text of an OpenDocument file to ``out``."""
    for _name, body in archive.members(data, limits, budget, only=_PARTS):
        xml_text(body, out, _BREAKS)
        if out.full:
            return
