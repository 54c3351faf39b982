"""Durations: parsing, refusing bad input with a helpful message, formatting back."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.policy.durations import (
    MAX_DURATION_MS,
    DurationError,
    format_duration,
    parse_duration,
)

S = 1000
M = 60 * S
H = 60 * M
D = 24 * H


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("30d", 30 * D),
        ("12h", 12 * H),
        ("1y", 365 * D),
        ("2w", 14 * D),
        ("90m", 90 * M),
        ("45s", 45 * S),
        ("250ms", 250),
        ("1d12h", D + 12 * H),
        ("1h 30m", H + 30 * M),
        ("  7d ", 7 * D),
        ("30 d", 30 * D),
        ("1y2w3d4h5m6s7ms", 365 * D + 17 * D + 4 * H + 5 * M + 6 * S + 7),
        ("0d12h", 12 * H),
        ("1000y", MAX_DURATION_MS),
    ],
)
def test_parse(text: str, ms: int) -> None:
    assert parse_duration(text) == ms


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("-3d", "negative"),
        ("+3d", "negative"),
        ("10x", "unknown unit 'x'"),
        ("30", "unit is missing"),
        ("0d", "longer than zero"),
        ("0h0m", "longer than zero"),
        ("1M", "months"),
        ("3mo", "months"),
        ("30D", "unknown unit 'D'"),
        ("1.5d", "whole number"),
        ("d", "whole number"),
        ("12h1d", "largest to smallest"),
        ("1d1d", "largest to smallest"),
        ("1001y", "too long"),
        ("9" * 30 + "d", "too large"),
        ("99999999999999999999s", "too long"),
    ],
)
def test_parse_refuses(text: str, why: str) -> None:
    with pytest.raises(DurationError) as info:
        parse_duration(text)
    message = str(info.value)
    assert why in message
    assert "expected a duration like 30d, 12h or 1y" in message


def test_parse_refuses_non_text() -> None:
    with pytest.raises(DurationError, match="must be text"):
        parse_duration(30)  # type: ignore[arg-type]


def test_duration_error_is_value_error() -> None:
    assert issubclass(DurationError, ValueError)


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (0, "0s"),
        (1, "1ms"),
        (30 * D, "30d"),
        (14 * D, "2w"),
        (21 * D, "3w"),
        (10 * D, "10d"),
        (365 * D, "1y"),
        (366 * D, "1y1d"),
        (D + 12 * H, "1d12h"),
        (90 * M, "1h30m"),
        (45 * S + 5, "45s5ms"),
    ],
)
def test_format(ms: int, text: str) -> None:
    assert format_duration(ms) == text


def test_format_refuses_negative_and_non_int() -> None:
    with pytest.raises(ValueError, match="negative"):
        format_duration(-1)
    with pytest.raises(TypeError):
        format_duration(1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        format_duration(True)


@given(st.integers(min_value=1, max_value=MAX_DURATION_MS))
def test_format_then_parse_round_trips(ms: int) -> None:
    assert parse_duration(format_duration(ms)) == ms


@given(st.text(max_size=12))
def test_parse_never_raises_anything_but_duration_error(text: str) -> None:
    try:
        ms = parse_duration(text)
    except DurationError as exc:
        assert "expected a duration like 30d" in str(exc)
    else:
        assert 0 < ms <= MAX_DURATION_MS
