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

__all__ = ["BIDI_CONTROLS", "MAX_DEPTH", "RLO", "display_order"]

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


def _close(kind: str, parts: list[str]) -> str:
    # Inside a right-to-left override every unit is laid out right to left: plain text
    # reversed character by character, nested runs kept whole but placed in reverse.
    if kind == RLO:
        parts.reverse()
    return "".join(parts)


def display_order(text: str) -> str:
    """``text`` with right-to-left override runs rewritten in display order.

    The controls themselves are kept out of the result. Text without an override is
    returned unchanged (the same object).
    """
    if RLO not in text:
        return text
    # Parallel stacks of open runs: their kinds and their pieces (the bottom one is the text).
    kinds = [""]
    stack: list[list[str]] = [[]]
    top = stack[0]
    reverse = False  # whether the innermost run is a right-to-left override
    for piece in _SPLIT.split(text):
        if len(piece) != 1 or piece not in _STATE_CHANGES:  # text (the common case)
            if piece:
                top.append(piece[::-1] if reverse else piece)
        elif piece in _OPENERS:
            if len(kinds) <= MAX_DEPTH:
                kinds.append(piece)
                top = []
                stack.append(top)
                reverse = piece == RLO
        elif piece == PDF:
            if len(kinds) > 1 and kinds[-1] not in _ISOLATES:
                closed = _close(kinds.pop(), stack.pop())
                top = stack[-1]
                top.append(closed)
                reverse = kinds[-1] == RLO
        elif piece == PDI:
            # Closes the innermost isolate and every override or embedding opened inside it.
            if any(kind in _ISOLATES for kind in kinds[1:]):
                while True:
                    kind = kinds.pop()
                    closed = _close(kind, stack.pop())
                    stack[-1].append(closed)
                    if kind in _ISOLATES:
                        break
                top = stack[-1]
                reverse = kinds[-1] == RLO
        else:  # paragraph end: close everything
            while len(kinds) > 1:
                closed = _close(kinds.pop(), stack.pop())
                stack[-1].append(closed)
            top = stack[0]
            top.append(piece)
            reverse = False
    while len(kinds) > 1:
        closed = _close(kinds.pop(), stack.pop())
        stack[-1].append(closed)
    return "".join(stack[0])
