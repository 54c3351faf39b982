"""The console's pure parts: charts, rate limiter, CSRF tokens, CSV cells, its config."""

from __future__ import annotations

import pytest

from bridge.config import ConfigError
from bridge.console.charts import build_chart, day_label
from bridge.console.security import RateLimiter, csrf_token, csrf_valid, neutralise_cell
from tests.kit.config import make_config


def test_bars_stack_per_day_and_the_table_holds_the_numbers() -> None:
    chart = build_chart("c", "Findings", 100, 102, {(100, "a"): 2, (100, "b"): 1, (102, "a"): 4})
    assert chart.total == 7 and chart.columns == ("a", "b")
    assert chart.rows == ((day_label(100), (2, 1)), (day_label(102), (4, 0)))
    first_day = [b for b in chart.bars if b.title.startswith(day_label(100))]
    assert len(first_day) == 2
    low, high = sorted(first_day, key=lambda b: -b.y)
    assert abs(low.y - (high.y + high.height)) < 0.01  # stacked, no gap
    assert max(b.height for b in chart.bars) > 0


def test_many_labels_are_folded_into_other() -> None:
    counts = {(1, f"rule{i}"): i + 1 for i in range(12)}
    chart = build_chart("c", "t", 1, 1, counts)
    assert len(chart.columns) == 7 and chart.columns[-1] == "other"
    assert sum(chart.rows[0][1]) == sum(counts.values())


def test_an_empty_range_draws_no_bars() -> None:
    chart = build_chart("c", "t", 1, 30, {})
    assert chart.bars == () and chart.rows == () and chart.total == 0


def test_rate_limiter_sliding_window() -> None:
    limiter = RateLimiter(3, 60)
    for t in (0, 1, 2):
        assert not limiter.blocked("a", t)
        limiter.hit("a", t)
    assert limiter.blocked("a", 3) and not limiter.blocked("b", 3)
    assert limiter.retry_after("a", 30) == pytest.approx(30)
    assert not limiter.blocked("a", 60.5)  # the first attempt left the window


def test_rate_limiter_is_bounded() -> None:
    limiter = RateLimiter(1, 60, max_keys=10)
    for i in range(100):
        limiter.hit(f"k{i}", 0)
    assert len(limiter._hits) == 10


def test_csrf_tokens_are_bound_to_the_session() -> None:
    assert csrf_valid("s1", csrf_token("s1"))
    assert not csrf_valid("s2", csrf_token("s1"))
    assert not csrf_valid("s1", None) and not csrf_valid("s1", "")


@pytest.mark.parametrize("cell", ["=1+1", "+1", "-1", "@SUM(A1)", "\t=1", "\r=1"])
def test_formula_cells_are_neutralised(cell: str) -> None:
    assert neutralise_cell(cell) == "'" + cell


def test_plain_cells_stay() -> None:
    assert neutralise_cell("hello = world") == "hello = world" and neutralise_cell("") == ""


def test_console_config() -> None:
    off = make_config()
    assert not off.console.enabled and off.console.path == "/console"
    assert off.console.secure_cookies
    on = make_config(
        {"console": {"enabled": True, "listen": "127.0.0.1:8090", "session_idle": "10m"}}
    )
    assert on.console.listen == ("127.0.0.1", 8090) and on.console.path == ""
    assert on.console.session_idle_s == 600


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("path", "/_matrix/console"),
        ("path", "/"),
        ("listen", "nowhere"),
        ("session_idle", "soon"),
        ("login_attempts", 0),
        ("public_url", "ftp://x"),
    ],
)
def test_bad_console_config_names_the_key(key: str, value: object) -> None:
    with pytest.raises(ConfigError) as e:
        make_config({"console": {key: value}})
    assert f"console.{key}" in str(e.value)
