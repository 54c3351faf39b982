"""HTML files: the text only (tags dropped, entities unescaped), as for ``formatted_body``."""

from __future__ import annotations

from bridge.attachments.limits import TextBudget
from bridge.attachments.text import decode
from bridge.policy.normalize import html_to_text


def extract_html(data: bytes, out: TextBudget) -> None:
    """Add the text of an HTML file to ``out``."""
    out.add(html_to_text(decode(data)))
