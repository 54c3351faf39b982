"""The bounds of one extraction, and the exception that reports which one was hit."""

from __future__ import annotations

from dataclasses import dataclass

from bridge.attachments.kinds import Unreadable

MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Limits:
    """Hard bounds on reading one file (everything in it, archives included).

    ``max_ratio`` applies to each compressed member once it has inflated past
    ``ratio_grace_bytes`` (tiny files compress well legitimately); ``max_inflated_bytes`` to
    the bytes inflated from all members at all depths together.
    """

    max_file_bytes: int = 25 * MIB
    max_text_chars: int = 2_000_000
    max_depth: int = 3
    max_members: int = 2_000
    max_ratio: float = 100.0
    ratio_grace_bytes: int = 1 * MIB
    max_inflated_bytes: int = 200 * MIB
    max_member_bytes: int = 50 * MIB
    timeout_s: float = 10.0
    memory_bytes: int = 768 * MIB


class LimitHit(Exception):
    """Reading stopped: ``reason`` is the class, ``detail`` says which bound (no content)."""

    def __init__(self, reason: Unreadable, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class TextBudget:
    """Characters of text still to collect; extraction stops adding once it is spent."""

    def __init__(self, chars: int) -> None:
        self.left = chars
        self.parts: list[str] = []
        self.truncated = False

    @property
    def full(self) -> bool:
        return self.left <= 0

    def add(self, text: str) -> None:
        """Keep ``text`` (cut to what is left of the budget)."""
        if not text or self.left <= 0:
            if text:
                self.truncated = True
            return
        if len(text) > self.left:
            text = text[: self.left]
            self.truncated = True
        self.parts.append(text)
        self.left -= len(text)
