"""Human-friendly durations (``30d``, ``12h``, ``1y``) as used in policy and commands.

Grammar: one or more ``<number><unit>`` parts, units from largest to smallest, each
at most once, optional spaces between parts: ``30d``, ``1d12h``, ``1h 30m``, ``2w``.

Units: ``y`` (365 days), ``w`` (7 days), ``d``, ``h``, ``m`` (minutes), ``s``,
``ms``. Units are lower case; months are refused because they have no fixed length
(and ``1M`` read as one minute would purge a room's history almost at once).

A duration is positive and at most :data:`MAX_DURATION_MS` (1000 years), which keeps
every value a safe integer in Matrix's canonical JSON.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

__all__ = [
    "MAX_DURATION_MS",
    "UNITS_MS",
    "DurationError",
    "format_duration",
    "parse_duration",
]

_SECOND = 1000
_MINUTE = 60 * _SECOND
_HOUR = 60 * _MINUTE
_DAY = 24 * _HOUR
_WEEK = 7 * _DAY
_YEAR = 365 * _DAY

#: Milliseconds per unit, largest first (the order units must appear in).
UNITS_MS: dict[str, int] = {
    "y": _YEAR,
    "w": _WEEK,
    "d": _DAY,
    "h": _HOUR,
    "m": _MINUTE,
    "s": _SECOND,
    "ms": 1,
}

#: The longest duration accepted: 1000 years, far below 2**53 - 1.
MAX_DURATION_MS = 1000 * _YEAR

_HINT = "expected a duration like 30d, 12h or 1y (units: y, w, d, h, m, s, ms)"
_PART = re.compile(r"\s*([0-9]+)\s*([A-Za-z]+)")
_SHAPE = re.compile(r"(?:\s*[0-9]+\s*[A-Za-z]+)+\s*")


class DurationError(ValueError):
    """A text that is not a valid duration; the message shows the expected form."""


def _fail(text: str, why: str) -> DurationError:
    return DurationError(f"{text!r} is not a valid duration: {why}; {_HINT}")


def parse_duration(text: str) -> int:
    """Parse a duration like ``30d``, ``12h``, ``1y`` or ``1d12h`` into milliseconds.

    Raises :class:`DurationError` for empty, negative, zero, unit-less, unknown-unit,
    out-of-order and too-long durations; the message says which and shows the form.
    """
    if not isinstance(text, str):
        raise DurationError(f"a duration must be text, got {text!r}; {_HINT}")
    stripped = text.strip()
    if not stripped:
        raise DurationError(f"empty duration; {_HINT}")
    if stripped.startswith(("-", "+")):
        raise _fail(text, "durations have no sign and cannot be negative")
    if _SHAPE.fullmatch(stripped) is None:
        if stripped.isdigit():
            raise _fail(text, "the unit is missing (30 what? write 30d, 30m or 30s)")
        raise _fail(text, "write a whole number followed by a unit")
    total = 0
    previous_rank = -1
    ranks = list(UNITS_MS)
    for match in _PART.finditer(stripped):
        digits, unit = match.group(1), match.group(2)
        if unit not in UNITS_MS:
            if unit in {"M", "mo", "mon", "month", "months"}:
                raise _fail(text, "months have no fixed length: write 30d")
            raise _fail(text, f"unknown unit {unit!r}")
        rank = ranks.index(unit)
        if rank <= previous_rank:
            raise _fail(text, "units must go from largest to smallest, each once (like 1d12h)")
        previous_rank = rank
        if len(digits) > 20:
            raise _fail(text, "the number is far too large (at most 1000y)")
        total += int(digits) * UNITS_MS[unit]
    if total == 0:
        raise _fail(text, "a duration must be longer than zero")
    if total > MAX_DURATION_MS:
        raise _fail(text, "it is too long (at most 1000y)")
    return total


def format_duration(ms: int) -> str:
    """Format milliseconds as a duration :func:`parse_duration` reads back exactly.

    Largest units first, zero parts left out: ``2592000000`` -> ``30d``,
    ``129600000`` -> ``1d12h``, ``1209600000`` -> ``2w`` (weeks only when the days
    divide evenly). ``0`` -> ``0s``. Raises ``ValueError`` for negative values.
    """
    if isinstance(ms, bool) or not isinstance(ms, int):
        raise TypeError(f"milliseconds must be an int, got {ms!r}")
    if ms < 0:
        raise ValueError(f"a duration cannot be negative, got {ms} ms")
    if ms == 0:
        return "0s"
    years, rest = divmod(ms, _YEAR)
    days, rest = divmod(rest, _DAY)
    weeks = 0
    if days and days % 7 == 0:
        weeks, days = days // 7, 0
    hours, rest = divmod(rest, _HOUR)
    minutes, rest = divmod(rest, _MINUTE)
    seconds, millis = divmod(rest, _SECOND)
    parts = zip(
        (years, weeks, days, hours, minutes, seconds, millis),
        UNITS_MS,
        strict=True,
    )
    return "".join(f"{count}{unit}" for count, unit in parts if count)


def parse_instant(text: str) -> int:
    """An ISO 8601 date or date/time (``2025-01-31``, ``2025-01-31T08:00:00Z``) as ms since
    the epoch; without a zone it is UTC. Raises ValueError for anything else."""
    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)
