"""JSON for what the audit store seals and reads back: orjson where it is exact, else the stdlib.

Neutral (standard library and orjson only): the store, decoding and the export workers use it."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

# orjson reads integers outside [-2**63, 2**64) as floats (silently); such an integer has at
# least 19 digits in a row (-9223372036854775809 has 19), while every integer of 18 digits
# fits. Found by mapping every digit to "0" and everything else to a space (C speed,
# ten times faster than a regex here). Card numbers and other long digit strings inside JSON
# strings also match and merely take the stdlib path.
_DIGITS_AS_ZERO = bytes(0x30 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))
_LONG_DIGITS = b"0" * 19


def _json_dumps(obj: Any) -> bytes:
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (JSON allows "\ud800"): keep it escaped
        return json.dumps(obj, separators=(",", ":")).encode("ascii")


def _orjson_dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON through orjson (≈ 5x faster), the stdlib where orjson differs.

    orjson refuses lone surrogates, integers beyond 64 bits and non-string keys (the stdlib
    path then takes them as before) and writes NaN/Infinity as ``null``: any output holding
    ``null`` is redone by the stdlib, so the archive stays lossless.
    """
    try:
        out = _orjson.dumps(obj)
    except TypeError:  # orjson.JSONEncodeError
        return _json_dumps(obj)
    if b"null" in out:
        return _json_dumps(obj)
    return out


def _orjson_loads(data: bytes) -> Any:
    """Parse UTF-8 JSON through orjson (≈ 3x faster), the stdlib where orjson differs.

    orjson refuses NaN, Infinity, out-of-range floats and lone surrogates (the stdlib reads
    them, and the archive may hold them) and turns huge integers into floats, so those take
    the stdlib path: the result is always what ``json.loads`` gives.
    """
    if _LONG_DIGITS not in data.translate(_DIGITS_AS_ZERO):
        try:
            return _orjson.loads(data)
        except _orjson.JSONDecodeError:
            pass
    return json.loads(data)


try:
    import orjson as _orjson
except ImportError:  # pragma: no cover - orjson is a dependency; keep working without it
    dumps = _json_dumps
    loads: Callable[[bytes], Any] = json.loads
else:
    dumps = _orjson_dumps
    loads = _orjson_loads


def str_or_none(value: Any) -> str | None:
    """``value`` if it is a string, else None."""
    return value if isinstance(value, str) else None
