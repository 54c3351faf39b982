"""Text out of the XML parts of office documents, parsed with ``defusedxml``.

defusedxml refuses entity declarations (billion laughs, quadratic blowup), external
entities and DTD retrieval. Text is read per paragraph-like element (all of its text, in
document order: runs, spans, deleted tracked changes, field codes), followed by a line
break, so words of adjacent paragraphs do not run together while a number split over the
runs of one paragraph is whole again. Each element is dropped once read, so memory stays
proportional to one paragraph.
"""

from __future__ import annotations

import io
from collections.abc import Collection
from xml.etree.ElementTree import ParseError

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import iterparse

from bridge.attachments.kinds import Unreadable
from bridge.attachments.limits import LimitHit, TextBudget


def xml_text(data: bytes, out: TextBudget, break_tags: Collection[str]) -> None:
    """Add the text of each element whose local name is in ``break_tags`` to ``out``."""
    try:
        for _event, elem in iterparse(io.BytesIO(data), events=("end",)):
            if elem.tag.rpartition("}")[2] in break_tags:
                out.add("".join(elem.itertext()) + "\n")
                elem.clear()
                if out.full:
                    return
    except DefusedXmlException as e:
        raise LimitHit(Unreadable.LIMIT, f"XML refused ({e.__class__.__name__})") from None
    except (ParseError, ValueError) as e:
        raise LimitHit(Unreadable.MALFORMED, f"XML unreadable ({e.__class__.__name__})") from None
