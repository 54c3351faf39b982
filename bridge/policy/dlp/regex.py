"""Admin regex rules: RE2 only (linear time), with caps on size so every message stays cheap."""

from __future__ import annotations

import re2

__all__ = [
    "MAX_REGEX_PROGRAM_SIZE",
    "MAX_REGEX_RULES",
    "MAX_REGEX_TOTAL_PROGRAM_SIZE",
    "InvalidPattern",
    "compile_regex",
    "compiled",
    "options",
]

#: Regex rules in force in one scope (config and commands, global, space and room together).
MAX_REGEX_RULES = 100
#: RE2 program size of one pattern (``(?i)\btkt-[0-9]{5}\b`` is 18; counted repetitions
#: such as ``[A-Za-z0-9]{32,64}`` cost about 8 per repetition).
MAX_REGEX_PROGRAM_SIZE = 1_000
#: Sum of the RE2 program sizes of the regex rules in force in one scope.
MAX_REGEX_TOTAL_PROGRAM_SIZE = 10_000


class InvalidPattern(ValueError):
    """A pattern RE2 refuses; ``reason`` is RE2's own explanation."""

    def __init__(self, reason: str, pattern: str = "") -> None:
        self.reason = reason
        self.pattern = pattern
        super().__init__(f"invalid pattern {pattern!r}: {reason}" if pattern else reason)


def options(max_mem: int = 8 << 20) -> re2.Options:
    options = re2.Options()
    options.log_errors = False
    options.max_mem = max_mem
    return options


def compile_regex(pattern: str) -> re2._Regexp:
    """Compile an admin-supplied pattern with RE2 (linear time), never Python ``re``.

    Raises :class:`InvalidPattern` with RE2's reason for what RE2 rejects (backreferences,
    lookaround, syntax errors, patterns too large), for patterns whose RE2 program is larger
    than :data:`MAX_REGEX_PROGRAM_SIZE` (they cost the gate time on every message) and for
    patterns that match the empty string, which would match every message.
    """
    if not isinstance(pattern, str) or not pattern:
        raise InvalidPattern("the pattern is empty", "")
    try:
        compiled = re2.compile(pattern, options())
    except re2.error as exc:
        reason = exc.args[0] if exc.args else "rejected by RE2"
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise InvalidPattern(str(reason), pattern) from None
    except (TypeError, UnicodeError) as exc:
        raise InvalidPattern(str(exc), pattern) from None
    if compiled.programsize > MAX_REGEX_PROGRAM_SIZE:
        raise InvalidPattern(
            f"it is too complex (RE2 program size {compiled.programsize}, at most"
            f" {MAX_REGEX_PROGRAM_SIZE} allowed, so that every message stays fast to check);"
            " use smaller repetition counts such as {8,} instead of {32,64}, or split it",
            pattern,
        )
    if compiled.search("") is not None:
        raise InvalidPattern("it matches empty text, so it would match every message", pattern)
    return compiled


_COMPILED: dict[str, re2._Regexp] = {}


def compiled(pattern: str) -> re2._Regexp:
    """A built-in (trusted) pattern compiled once and cached."""
    regex = _COMPILED.get(pattern)
    if regex is None:
        regex = _COMPILED[pattern] = re2.compile(pattern, options())
    return regex
