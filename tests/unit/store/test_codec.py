"""The store's JSON codec: orjson where it is exact, always the same result as the stdlib."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.audit import codec


def same(a: Any, b: Any) -> bool:
    """Equal, with NaN equal to NaN and ints never equal to floats (1 vs 1.0 differ here)."""
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and repr(a) == repr(b))
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


@pytest.mark.parametrize(
    "text",
    [
        '{"n": 123456789012345678901234567890}',  # orjson would give a float
        '{"n": -18446744073709551617}',
        '{"n": 18446744073709551615}',  # the largest u64: exact either way
        '{"x": NaN, "y": Infinity, "z": -Infinity}',  # orjson refuses these
        '{"big": 1e400}',
        '{"s": "\\ud800 lone surrogate"}',
        '{"card": "4111111111111111", "long": "00000000000000000000000"}',
        '{"k": 1, "k": 2}',  # a duplicate key: the last one wins in both
        '{"f": -0.0, "g": 1.0, "h": 5e-324, "i": 1.7976931348623157e308}',
        '{"u": "caf\\u00e9 \\ud83d\\ude00 会議"}',
        "[]",
        # just outside orjson's exact range (found by the round-trip property below)
        "[-9223372036854775809]",
        "[-9223372036854775808, 9223372036854775808]",
        "[18446744073709551616]",
    ],
)
def test_reads_what_the_stdlib_reads(text: str) -> None:
    assert same(codec.loads(text.encode()), json.loads(text))


def test_refuses_what_the_stdlib_refuses() -> None:
    for bad in (b"{", b'{"a": }', b"\xff\xfe{}", b""):
        with pytest.raises(ValueError):
            codec.loads(bad)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_round_trip_equals_the_stdlib(value: Any) -> None:
    stored = codec.dumps(value)
    assert same(codec.loads(stored), json.loads(stored))
    assert same(codec.loads(stored), value)
