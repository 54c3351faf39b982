"""Bidirectional overrides read in display order (pure, linear).

Text inside a right-to-left override (U+202E ... U+202C) is *shown* reversed: a leaker types
``terces`` between the two controls and every reader sees ``secret``. :func:`display_order`
rewrites such runs in the order they are displayed, so that DLP reads what people see.

Only overrides reorder characters of left-to-right scripts; embeddings (RLE, LRE) and isolates
(RLI, LRI, FSI) change the direction of the *surrounding* run, not the order of Latin letters
inside it, so their content is kept in logical order (their controls are dropped later with the
other format characters). An override ends at its PDF, at the end of the paragraph (a line
break) or at the end of the text, as in the Unicode bidi algorithm. Nesting is followed up to
:data:`MAX_DEPTH` levels (the algorithm allows 125); deeper controls are ignored, which keeps
the cost at most ``MAX_DEPTH`` copies of the text.
"""

from __future__ import annotations

import re

__all__ = ["BIDI_CONTROLS", "MAX_DEPTH", "display_order"]

RLO, LRO, RLE, LRE, PDF = "\u202e", "\u202d", "\u202b", "\u202a", "\u202c"
RLI, LRI, FSI, PDI = "\u2067", "\u2066", "\u2068", "\u2069"
BIDI_CONTROLS = frozenset({RLO, LRO, RLE, LRE, PDF, RLI, LRI, FSI, PDI})
MAX_DEPTH = 16

_OPENERS = frozenset({RLO, LRO, RLE, LRE, RLI, LRI, FSI})
_ISOLATES = frozenset({RLI, LRI, FSI})
# Controls and paragraph separators: the only places where the state changes.
_STATE_CHANGES = frozenset(
    "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\n\r\u2029\x1c\x1d\x1e\x85"
)
_SPLIT = re.compile("([" + "".join(sorted(_STATE_CHANGES)) + "])")


class _Run:
    __slots__ = ("kind", "parts")

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.parts: list[str] = []

    def close(self) -> str:
        # Inside a right-to-left override every unit is laid out right to left: plain text
        # reversed character by character, nested runs kept whole but placed in reverse.
        if self.kind == RLO:
            return "".join(reversed(self.parts))
        return "".join(self.parts)


def display_order(text: str) -> str:
    """``text`` with right-to-left override runs rewritten in display order.

    The controls themselves are kept out of the result. Text without an override is
    returned unchanged (the same object).
    """
    if RLO not in text:
        return text
    stack = [_Run("")]
    top = stack[0]
    for piece in _SPLIT.split(text):
        if len(piece) != 1 or piece not in _STATE_CHANGES:  # text (the common case)
            if piece:
                top.parts.append(piece[::-1] if top.kind == RLO else piece)
        elif piece in _OPENERS:
            if len(stack) <= MAX_DEPTH:
                top = _Run(piece)
                stack.append(top)
        elif piece == PDF:
            if len(stack) > 1 and top.kind not in _ISOLATES:
                stack.pop()
                stack[-1].parts.append(top.close())
                top = stack[-1]
        elif piece == PDI:
            # Closes the innermost isolate and every override or embedding opened inside it.
            if any(run.kind in _ISOLATES for run in stack[1:]):
                while True:
                    run = stack.pop()
                    stack[-1].parts.append(run.close())
                    if run.kind in _ISOLATES:
                        break
                top = stack[-1]
        else:  # paragraph end: close everything
            while len(stack) > 1:
                run = stack.pop()
                stack[-1].parts.append(run.close())
            top = stack[0]
            top.parts.append(piece)
    while len(stack) > 1:
        run = stack.pop()
        stack[-1].parts.append(run.close())
    return stack[0].close()
