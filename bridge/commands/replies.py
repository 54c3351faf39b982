"""What the bot answers: plain text and the same as escaped HTML."""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Reply:
    """A bot reply: plain text and the same as (escaped) HTML."""

    text: str
    html: str

    @classmethod
    def plain(cls, text: str) -> Reply:
        """A reply whose HTML is the text escaped, line breaks kept."""
        return cls(text, "<br>".join(html.escape(line) for line in text.split("\n")))

    @classmethod
    def lines(cls, title: str, items: Sequence[str]) -> Reply:
        """A title and a bullet list, every part escaped."""
        text = "\n".join([title, *(f"• {i}" for i in items)])
        body = "".join(f"<li>{html.escape(i)}</li>" for i in items)
        return cls(
            text,
            f"<p>{html.escape(title)}</p><ul>{body}</ul>"
            if items
            else f"<p>{html.escape(title)}</p>",
        )
